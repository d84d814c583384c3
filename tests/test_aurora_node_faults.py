"""Whole profiles/aurora runs on warm engines through the real PBS server when the
infrastructure fails under them (issue 34): a node's Snakemake SIGKILLed (as an OOM
kill does) is brought back on its node for its unfinished ranks, or its ranks go to
the submission's continuation; either way the run ends by itself with every rank
exact, none redone, and nothing left running. Helpers: tests/pbs_runs.py.
"""

from __future__ import annotations

import json
import os
import signal
import time

import pytest

import node_chaos
import workflow as wf
from formats import faults
from pbs_runs import (
    ECHO_SERVER,
    aurora_in_background,
    finished_rank,
    node_list,
    node_snakemakes,
    nothing_outlives,
    processes_running,
    submissions,
    wait_for,
    warm_folder,
)

RANKS = 16


def node_fault_run(tmp_path, **config):
    """16 ranks on 2 nodes x 2 echo engines, one rank at a time each, 2 s a request."""
    ranks = {f"{i}.in": f"rank {i} prompt\n" for i in range(RANKS)}
    base = {
        "tiles": {"per_node": 2},
        "warm": {"ranks_per_engine": 4, "ranks_in_flight": 1},
        "task_env": {"ECHO_SERVER_DELAY_S": "2"},
        "pbs": {"nodes_per_submission": 2, "resubmit": 1},
    }
    return warm_folder(tmp_path, ranks, **wf.deep_merge(base, config))


def served_on(work, host: str) -> list[int]:
    """Ranks whose record says they were served on ``host``."""
    found = []
    for path in (work / "results" / "records").glob("*.json"):
        try:
            record = json.loads(path.read_text())
        except ValueError:
            continue  # being replaced
        if record.get("client_node") == host:
            found.append(record["rank"])
    return found


def kill_a_node_snakemake_mid_run(work, proc) -> tuple[str, dict]:
    """SIGKILL the Snakemake of the node of the first submission that has served a rank,
    while it has ranks left; returns the node and what the ranks done by then are (none
    of them may change)."""
    results = work / "results"
    wait_for(lambda: len(node_snakemakes()) == 2, "no node Snakemakes", proc=proc)
    wait_for(lambda: any(served_on(work, h) for h in node_snakemakes()), "no rank", proc=proc)
    victim = next(h for h in sorted(node_snakemakes()) if served_on(work, h))
    os.kill(node_snakemakes()[victim], signal.SIGKILL)
    done = {int(p.stem): finished_rank(work, int(p.stem)) for p in results.glob("*.out")}
    assert len(served_on(work, victim)) < RANKS // 2, "the node had no rank left"
    return victim, done


def every_rank_exact_and_none_redone(work, done: dict) -> None:
    results = work / "results"
    for rank in range(RANKS):
        assert wf.read_records(results / f"{rank}.out") == [(f"rank {rank} prompt",) * 2]
    assert {rank: finished_rank(work, rank) for rank in done} == done
    assert not list(results.glob("*.out.*"))


@pytest.mark.pbs
def test_a_node_snakemake_killed_mid_run_is_brought_back_for_its_unfinished_ranks(
    pbs_cluster, tmp_path
):
    work = node_fault_run(tmp_path)
    with aurora_in_background(pbs_cluster, work) as proc:
        victim, done = kill_a_node_snakemake_mid_run(work, proc)
        output, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, output[-4000:]
    (submission,) = submissions(work)  # brought back on its node: no continuation
    every_rank_exact_and_none_redone(work, done)
    log = (work / "logs" / "pbs" / f"{submission['name']}.log").read_text()
    assert f"ranks: {victim}: its Snakemake died (status 247); a new Snakemake for its" in log
    assert "(restart 1 of warm.node_restarts 2)" in log
    assert "every node's Snakemake succeeded" in log, log[-3000:]
    assert "Error in rule infer" not in output
    nothing_outlives(pbs_cluster, submission["id"], work)
    wait_for(lambda: not node_snakemakes(), "a node Snakemake outlived the run", 30)
    assert not processes_running(ECHO_SERVER)


@pytest.mark.pbs
def test_a_node_snakemake_killed_past_node_restarts_has_its_ranks_continued(pbs_cluster, tmp_path):
    work = node_fault_run(tmp_path, warm={"node_restarts": 0})
    with aurora_in_background(pbs_cluster, work) as proc:
        victim, done = kill_a_node_snakemake_mid_run(work, proc)
        output, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, output[-4000:]
    first, more = submissions(work)
    every_rank_exact_and_none_redone(work, done)
    log = (work / "logs" / "pbs" / f"{first['name']}.log").read_text()
    assert f"ranks: {victim}: its Snakemake died (status 247) 1 time(s), more than " in log
    # only the victim's unfinished ranks were continued
    nodes = json.loads((work / "logs" / "pbs" / f"{first['name']}.nodes.json").read_text())
    continued = sorted(map(int, more["ranks"].split(",")))
    share = next(s for s in nodes["shares"] if set(continued) <= set(s))
    assert continued and not set(continued) & set(done), (continued, sorted(done))
    assert set(share) - set(continued) <= set(done) | set(served_on(work, victim))
    assert "ranks cut off by the infrastructure" in output, output[-4000:]
    assert f"{victim}: " in output and "continuation 1 of pbs.resubmit 1" in output
    assert "Error in rule infer" not in output
    for job in (first, more):
        nothing_outlives(pbs_cluster, job["id"], work)
    wait_for(lambda: not node_snakemakes(), "a node Snakemake outlived the run", 30)
    assert not processes_running(ECHO_SERVER)


@pytest.mark.pbs
def test_a_lost_node_costs_only_its_unfinished_ranks_which_run_again_on_fresh_nodes(
    pbs_cluster, tmp_path
):
    work = node_fault_run(tmp_path)
    lost = None
    try:
        with aurora_in_background(pbs_cluster, work) as proc:
            wait_for(lambda: len(node_snakemakes()) == 2, "no node Snakemakes", proc=proc)
            wait_for(
                lambda: any(served_on(work, h) for h in node_snakemakes()), "no rank", proc=proc
            )
            (submission,) = submissions(work)
            # a node other than the job's first (its mother superior runs the job script)
            lost = node_list(pbs_cluster, submission["id"])[1]
            pbs_cluster.lose_host(lost)
            done = {
                int(p.stem): finished_rank(work, int(p.stem)) for p in work.glob("results/*.out")
            }
            output, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, output[-4000:]
        every_rank_exact_and_none_redone(work, done)
        assert "Infrastructure failures, not counted against any rank" in output
        (fault,) = faults.read_faults(work / "logs" / "pbs")
        assert fault.job_id == submission["id"] and lost in fault.nodes
        # Two recoveries, by which comes first: PBS requeues the job on fresh nodes (its
        # mom noticed the lost one), or the job's first node gives up on the node that
        # never reports and the provider continues the submission (pbs.resubmit).
        job = pbs_cluster.job(submission["id"])
        if job["run_count"] == 2:
            assert lost not in node_list(pbs_cluster, submission["id"])
            assert len(submissions(work)) == 1  # PBS ran the same job again
            log = (work / "logs" / "pbs" / f"{submission['name']}.log").read_text()
            assert "ranks: this job runs again (start 2; PBS requeued it)" in log, log[-3000:]
            assert f"PBS requeued it (run 2) after losing {lost} at " in output, output[-4000:]
            assert fault.kind == "node lost" and fault.node_hours > 0
        else:
            continued = submissions(work)[1]
            assert continued["name"] == f"{submission['name']}.c1", submissions(work)
            assert lost not in node_list(pbs_cluster, continued["id"])
            assert fault.kind == "cut off by the infrastructure"
        nothing_outlives(pbs_cluster, submission["id"], work)
        wait_for(lambda: not node_snakemakes(), "a node Snakemake outlived the run", 30)
        assert not processes_running(ECHO_SERVER)
    finally:
        if lost is not None:
            pbs_cluster.start_mom(lost)


# In make test: one fault of each kind over a minute's run; `make soak` (CHAOS=large)
# runs a larger one.
# Faults land within span_s of the first rank done: a run without faults would take
# about 12 s more (4 ranks an engine, 3 s each; 2 submissions at once, the capacity
# queue's limit), and every fault lengthens it.
CHAOS = {
    "small": {"ranks": 32, "faults": {k: 1 for k in node_chaos.KINDS}, "span_s": 10},
    "large": {"ranks": 96, "faults": {"engine": 4, "node_snakemake": 4, "qdel": 2,
              "walltime": 2, "lost_host": 2}, "span_s": 40},
}  # fmt: skip


@pytest.mark.pbs
def test_chaos_soak_the_run_finishes_by_itself_exact_nothing_redone_nothing_left(
    pbs_cluster, tmp_path
):
    size = CHAOS[os.environ.get("CHAOS", "small")]
    seed = int(os.environ.get("CHAOS_SEED", str(int(time.time()))))
    figures = node_chaos.soak(pbs_cluster, tmp_path, seed=seed, **size)
    report = {k: v for k, v in figures.items() if k != "output"}
    print(f"\nchaos soak: {json.dumps(report)}")
    assert figures["runs needing a hand"] == 0, figures["output"]
    assert figures["outputs exact"], report
    assert figures["ranks redone"] == 0, report
    # every fault hit, but for one whose kind had no target before the run was over
    planned = sum(size["faults"].values())
    assert figures["faults injected"] + figures["missed as the run ended"] == planned, report
    assert figures["faults injected"] >= planned - 1, report
    assert figures["faults survived"] == figures["faults injected"], report
    assert (figures["engines left"], figures["jobs left"]) == (0, 0), report
