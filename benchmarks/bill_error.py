"""Benchmark: the bill's estimate against what the run spent (issue 35; goal: within 25 %).

The real OpenPBS test cluster (tests/pbs_cluster.py) runs profiles/aurora with warm echo
engines, 4 engines a node, 5 ranks each (20 ranks at once on a node), one node a
submission. A sample dataset runs first and leaves the history; then a dataset of
``requests`` requests in ranks of 200 runs, billed from it, and its end prints
"Bill against spending: estimated X node-hours, used Y". Two samples: 2 ranks (a node
far less busy than the run's) and 20 ranks (as busy: the bill's advice).
"""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path

from common import log, markdown_table

NAME = "bill_error"
RANK_SIZE = 200
AGAINST = re.compile(r"Bill against spending: estimated ([0-9.]+) node-hours, used ([0-9.]+)")


def write_dataset(path: Path, count: int) -> None:
    with open(path, "w") as handle:
        handle.writelines(json.dumps({"prompt": f"q {i}"}) + "\n" for i in range(count))


def one(cluster, folder: Path, sample_ranks: int, requests: int) -> dict:
    import workflow as wf
    from pbs_runs import delete_our_jobs, output_of, run_aurora, warm_folder, yaml_config

    work = warm_folder(
        folder,
        {},
        tiles={"per_node": 4},
        warm={"ranks_per_engine": 5, "start_minutes": None, "rank_minutes": None},
        pbs={"nodes_per_submission": 1},
        dataset={"input": "inputs/sample.jsonl", "rank_size": RANK_SIZE},
    )
    (work / "inputs").mkdir()
    write_dataset(work / "inputs" / "sample.jsonl", sample_ranks * RANK_SIZE)
    write_dataset(work / "inputs" / "big.jsonl", requests)
    try:
        for name in ("sample", "big"):
            if name == "big":
                config = yaml_config(work)
                wf.write_config(
                    work, wf.deep_merge(config, {"dataset": {"input": "inputs/big.jsonl"}})
                )
            run = run_aurora(cluster, work)
            if run.returncode != 0:
                raise RuntimeError(f"the {name} run failed:\n{output_of(run)[-5000:]}")
        found = AGAINST.search(run.stderr)
        if not found:
            raise RuntimeError(f"no 'Bill against spending' line:\n{run.stderr[-3000:]}")
    finally:
        delete_our_jobs(cluster, work)
    estimated, used = float(found.group(1)), float(found.group(2))
    return {"sample_ranks": sample_ranks, "estimated": estimated, "used": used}


def run(quick: bool = False, repeats: int = 1, shared: dict | None = None) -> dict:
    from pbs_cluster import PbsCluster

    requests = 2_000 if quick else 10_000
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-bill-") as tmp, PbsCluster() as cluster:
        for repeat in range(repeats):
            for sample_ranks in (2, 20):
                log(f"bill_error: a sample of {sample_ranks} ranks, then {requests:,} requests")
                folder = Path(tmp) / f"{repeat}-{sample_ranks}"
                folder.mkdir()
                results.append(one(cluster, folder, sample_ranks, requests))
    rows = [
        [f"sample of {r['sample_ranks']} ranks: estimated / used node-hours",
         f"{r['estimated']:.4f} / {r['used']:.4f}", f"**{r['estimated'] / r['used']:.2f}**"]
        for r in results
    ]  # fmt: skip
    busy = [r["estimated"] / r["used"] for r in results if r["sample_ranks"] == 20]
    worst = max(busy, key=lambda x: abs(x - 1))
    return {
        "name": NAME,
        "title": (
            f"The bill's estimate against spending: {requests:,} echo requests in ranks of "
            f"{RANK_SIZE}, 20 ranks at once on a node, OpenPBS test cluster"
        ),
        "table": markdown_table(["run", "node-hours", "estimate / used"], rows),
        "runs": results,
        "summary": {
            "goal_met": abs(worst - 1) <= 0.25,
            "goal": [
                "bill estimate / node-hours used, a sample as busy as the run",
                f"{worst:.2f}",
                "0.75-1.25",
            ],
        },
    }
