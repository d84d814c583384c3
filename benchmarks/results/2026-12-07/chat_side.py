"""One chat_batch run of the tree it is run in (cwd: its benchmarks/), as one JSON line."""

import json
import sys

sys.path.insert(0, ".")
import chat_batch  # noqa: E402

result = chat_batch.run()
events = result["warm"]["time_breakdown"]
line = {
    "warm_s": round(result["warm"]["wall_s"], 2),
    "run_batch_s": round(result["run_batch"]["wall_s"], 2),
    "ratio": round(result["summary"]["ratio"], 3),
    "ready": round(events["first_engine_ready"], 1),
    "last_rank": round(events["last_rank_written"], 1),
    "exit": round(events["exit"], 1),
}
print(json.dumps(line))
