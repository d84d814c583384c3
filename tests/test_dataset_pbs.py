"""A dataset through the OpenPBS test cluster (profiles/aurora, warm echo engines): a
sample run leaves the history; the 10,000-request dataset's bill rests on it and sets
each submission's walltime; a budget below the bill stops before any qsub, one that
covers a single submission sends no more, and a rerun with a larger budget picks up."""

from __future__ import annotations

import json
import re

import pytest

import workflow as wf
from pbs_runs import delete_our_jobs, output_of, run_aurora, submissions, warm_folder, yaml_config

REQUESTS, RANK_SIZE = 10_000, 200  # 50 ranks: submissions of 20, 20 and 10


def write_dataset(path, count: int) -> None:
    with open(path, "w") as handle:
        handle.writelines(json.dumps({"prompt": f"q {i}"}) + "\n" for i in range(count))


def bill_line(res) -> str:
    (line,) = [x for x in (res.stdout + res.stderr).splitlines() if x.startswith("Bill: ")]
    return line


def configure(work, **changes) -> None:
    wf.write_config(work, wf.deep_merge(yaml_config(work), changes))


@pytest.mark.pbs
def test_a_dataset_in_several_submissions_billed_before_qsub_within_a_budget(pbs_cluster, tmp_path):
    work = warm_folder(
        tmp_path,
        {},
        tiles={"per_node": 4},
        warm={"ranks_per_engine": 5, "start_minutes": None, "rank_minutes": None},
        pbs={"nodes_per_submission": 1},
        dataset={"input": "inputs/sample.jsonl", "rank_size": RANK_SIZE},
    )
    (work / "inputs").mkdir()
    write_dataset(work / "inputs" / "sample.jsonl", 2 * RANK_SIZE)
    write_dataset(work / "inputs" / "big.jsonl", REQUESTS)
    try:
        # a small sample first: no history yet, the bill says so and what to do
        sample = run_aurora(pbs_cluster, work)
        assert sample.returncode == 0, output_of(sample)
        assert "No estimate: no earlier run" in bill_line(sample)
        assert len((work / "results" / "sample.jsonl").read_text().splitlines()) == 2 * RANK_SIZE

        configure(work, dataset={"input": "inputs/big.jsonl"})
        dry = run_aurora(pbs_cluster, work, "-n")
        assert dry.returncode == 0, output_of(dry)
        text = bill_line(dry)
        assert text.startswith(
            f"Bill: {REQUESTS:,} requests in 50 ranks; to run: {REQUESTS:,} requests in 50"
        )
        assert "3 submission(s) (3 x 1 node(s))" in text
        assert "resting on the run of" in text and f"(pbs, {2 * RANK_SIZE:,} requests" in text
        estimate = float(re.search(r"Estimate ([0-9.e+-]+) node-hours", text).group(1))
        walltimes = re.search(r"walltime ([0-9:, ]+), at most", text).group(1).split(", ")
        asks = [int(w[:2]) + int(w[3:5]) / 60 for w in walltimes]  # 1 node each
        assert estimate < sum(asks) and len(submissions(work)) == 1

        # a budget below the bill: nothing submitted, and by how much it is over
        spent = sum(float(s.get("node_hours_used") or 0) for s in summary_rows(work))
        configure(work, pbs={"budget_node_hours": round(spent + estimate / 2, 6)})
        stopped = run_aurora(pbs_cluster, work)
        assert stopped.returncode != 0
        said = output_of(stopped)
        assert "Stopped before any qsub: the estimate of" in said and ") by " in said, said
        assert len(submissions(work)) == 1

        # a budget that covers one submission's walltime, not two: one goes out
        budget = spent + max(asks) + min(asks) / 2
        assert budget - spent > estimate
        configure(work, pbs={"budget_node_hours": round(budget, 6)})
        partial = run_aurora(pbs_cluster, work)
        assert partial.returncode != 0
        said = partial.stdout + partial.stderr  # pbs-submit's refusals, on stderr
        assert "budget reached:" in said and "left; rerun with a larger budget" in said
        sent = submissions(work)[1:]
        assert len(sent) == 1
        # its walltime is one the bill gave (the estimate + 50% + 10 min), not 15 + 5 + 10
        assert sent[0]["walltime"] in walltimes and sent[0]["walltime"] != "00:30:00"
        results = work / "results" / "big"
        done = {p.name: p.stat().st_mtime_ns for p in results.glob("*.jsonl")}
        # Snakemake packs either 20 ranks or the last 10 into it
        assert len(done) == len(sent[0]["ranks"].split(",")) in (10, 20)
        left = 50 - len(done)

        # a larger budget picks up where it stopped
        configure(work, pbs={"budget_node_hours": 100})
        rerun = run_aurora(pbs_cluster, work)
        assert rerun.returncode == 0, output_of(rerun)
        assert f"to run: {left * RANK_SIZE:,} requests in {left} ranks" in bill_line(rerun)
        assert len(wf.planned_ranks(rerun.stdout + rerun.stderr)) == left
        assert {n: results.joinpath(n).stat().st_mtime_ns for n in done} == done
        assert len(submissions(work)) == 4
        assert "Bill against spending: estimated" in rerun.stderr
    finally:
        delete_our_jobs(pbs_cluster, work)
    with open(work / "results" / "big.jsonl") as answers:
        for i, line in enumerate(answers):
            assert json.loads(line)["text"] == f"q {i}"
    assert i + 1 == REQUESTS


def summary_rows(work) -> list[dict]:
    """results/sample/submissions.tsv: the sample's node-hours used."""
    lines = (work / "results" / "sample" / "submissions.tsv").read_text().splitlines()
    header = lines[0].split("\t")
    return [dict(zip(header, line.split("\t"), strict=True)) for line in lines[1:]]
