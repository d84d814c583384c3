"""An embedding rank on real vLLM (issue 30): models/tiny-embed (scripts/tools/build_model.py
tiny-embed, a tiny BERT, random weights) through a per-rank engine: the vectors have the
model's size, come in input order, and are identical to vLLM's offline LLM.embed of the same
inputs with the same engine arguments. The shapes on the echo engine:
tests/test_batch_fields.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from test_chat import answers, per_rank, write_rank
from test_infer import VLLM_ENV, settings

REPO = Path(__file__).resolve().parent.parent
TINY_EMBED = REPO / "models" / "tiny-embed"
TEXTS = ["The sky is blue.", "Grass is green.", "To be or not to be", "Hello"]
LINES = [
    {"custom_id": "pair", "method": "POST", "url": "/v1/embeddings",
     "body": {"model": "tiny-embed", "input": TEXTS[:2]}},
    {"id": "one", "input": TEXTS[2]},
    {"custom_id": "last", "method": "POST", "url": "/v1/embeddings", "body": {"input": TEXTS[3]}},
]  # fmt: skip
# vLLM's offline embed, in a process of its own, with the rank's engine arguments
REFERENCE = """
import json, sys
from rank import checks, offline
from vllm import LLM
settings = checks.parse_settings(sys.argv[1])
llm = LLM(**offline.llm_args(settings, ""), runner="pooling")
vectors = [list(o.outputs.embedding) for o in llm.embed(json.loads(sys.argv[2]), use_tqdm=False)]
print(json.dumps(vectors))
"""


@pytest.fixture(scope="module")
def tiny_embed() -> Path:
    """The tiny embedding model (`make test` builds it), built here if missing."""
    if not (TINY_EMBED / "config.json").exists():
        build = [sys.executable, str(REPO / "scripts" / "tools" / "build_model.py"),
                 "tiny-embed", str(TINY_EMBED)]  # fmt: skip
        subprocess.run(build, check=True, timeout=600)
    return TINY_EMBED


@pytest.mark.vllm
def test_an_embedding_rank_matches_vllms_offline_embed(tiny_embed, tmp_path):
    config = settings(tiny_embed)
    run = per_rank(tmp_path, write_rank(tmp_path, 4, LINES), config)
    reference = subprocess.run(
        [sys.executable, "-c", REFERENCE, json.dumps(config), json.dumps(TEXTS)],
        env={**os.environ, **VLLM_ENV, "VLLM_CPU_KVCACHE_SPACE": "1",
             "PYTHONPATH": str(REPO / "scripts")},
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert reference.returncode == 0, reference.stderr[-3000:]
    expected = json.loads(reference.stdout.splitlines()[-1])
    _, err = run.communicate(timeout=600)
    assert run.returncode == 0, err[-3000:]
    pair, one, last = answers(tmp_path / "results" / "4.jsonl")
    size = json.loads((tiny_embed / "config.json").read_text())["hidden_size"]
    got = [d["embedding"] for d in pair["response"]["body"]["data"]]
    got += [one["data"][0]["embedding"], last["response"]["body"]["data"][0]["embedding"]]
    assert [len(v) for v in got] == [size] * 4
    assert got == expected
    assert [d["index"] for d in pair["response"]["body"]["data"]] == [0, 1]
    assert one["usage"]["prompt_tokens"] > 0 and pair["custom_id"] == "pair"
