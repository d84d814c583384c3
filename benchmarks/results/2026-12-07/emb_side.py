"""batch_fields' per-rank embeddings (2 ranks of 10,240 texts) and its offline LLM.embed,
of the tree it is run in (cwd: its benchmarks/), as one JSON line."""

import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, ".")
import batch_fields  # noqa: E402
from common import bench_prompts  # noqa: E402

texts = bench_prompts(20480)
with tempfile.TemporaryDirectory(prefix="side-") as tmp:
    ranks = batch_fields.embed_ranks(Path(tmp) / "embed", texts, len(texts) // 2, False)
    offline = batch_fields.embed_offline(Path(tmp) / "offline", texts)
line = {
    "per_rank_s": round(ranks["wall_s"], 2),
    "offline_s": round(offline["wall_s"], 2),
    "ratio": round(offline["wall_s"] / ranks["wall_s"], 3),
}
print(json.dumps(line))
