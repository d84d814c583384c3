"""The Aurora profile's dry-run checks (no scheduler needed): the account, the queue's
limits, group packing, the config's types from the command line, the PBS plan.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import workflow as wf
from model import prepare
from pbs_runs import (
    REPO,
    output_of,
)


def dry_run(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    work = wf.make_workdir(tmp_path / "run", {f"{i}.in": f"prompt {i}\n" for i in range(13)})
    return wf.snakemake(work, "-n", "-q", *args, profile="profiles/aurora")


def test_dry_run_without_account_names_the_key(tmp_path):
    res = dry_run(tmp_path)
    assert res.returncode != 0
    assert "pbs.account is empty" in res.stdout + res.stderr


def test_dry_run_with_account_passes(tmp_path):
    res = dry_run(tmp_path, "--config", "pbs={account: MyProject}")
    assert res.returncode == 0, res.stdout + res.stderr


def test_dry_run_checks_queue_limits(tmp_path):
    res = dry_run(tmp_path, "--config", "pbs={account: P, queue: debug}", "--jobs", "1")
    assert res.returncode != 0
    assert "outside queue 'debug'" in res.stdout + res.stderr


def test_dry_run_refuses_the_old_default_prod_with_4_nodes(tmp_path):
    res = dry_run(tmp_path, "--config", "pbs={account: P, queue: prod}")
    assert res.returncode != 0
    assert "prod takes only jobs of 256 nodes or more" in res.stdout + res.stderr


def test_dry_run_checks_the_queue_job_limit(tmp_path):
    res = dry_run(tmp_path, "--config", "pbs={account: P}", "--jobs", "6")
    assert res.returncode != 0
    assert "run with --jobs 5" in res.stdout + res.stderr


def test_dry_run_checks_group_packing(tmp_path):
    res = dry_run(tmp_path, "--config", "pbs={account: P}", "--group-components", "node=12")
    assert res.returncode != 0
    assert "group-components has node=12" in res.stdout + res.stderr


def test_config_mapping_values_from_the_command_line_take_the_schema_types(tmp_path):
    samples = {f"{i}.in": "a\n" for i in range(96)}
    work = wf.make_workdir(tmp_path / "run", samples)
    res = wf.snakemake(
        work, "-n", "--group-components", "node=96", "--cores", "96",
        "--config", "pbs={account: P, nodes_per_submission: 8}",
        "sampling={seed: 7, ignore_eos: true}", "warm_engines=false", profile="profiles/aurora",
    )  # fmt: skip
    assert res.returncode == 0, output_of(res)
    assert "96 rank job(s) -> 1 submission(s) to queue 'capacity' (1 x 8 node(s))" in (
        res.stdout + res.stderr
    )


def test_dry_run_prints_the_pbs_plan_of_the_pending_ranks(tmp_path):
    samples = {path.name: path.read_text() for path in (REPO / "data").glob("*.in")}
    assert len(samples) == 48
    work = wf.make_workdir(tmp_path / "run", samples)
    res = wf.snakemake(work, "-n", "--config", "pbs={account: P}", profile="profiles/aurora")
    assert res.returncode == 0, output_of(res)
    # warm engines: 48 ranks fill 4 of the 10 ranks per engine of one node; the
    # walltime is the engines' start (15 min) + 4 ranks x 1 min + the 10 min margin
    assert (
        "PBS plan: 48 rank job(s) -> 1 submission(s) to queue 'capacity' with warm engines: "
        "1 x (1 node(s), 12 engines, 48 ranks, 48 per node, 4 per engine, walltime 00:29:00); "
        "at most 0.48 node-hours"
    ) in res.stdout + res.stderr
    assert len(wf.planned_ranks(res.stdout)) == 48
    # 36 ranks done (outputs newer than their inputs, the model prepared): 12 left,
    # one node's worth.
    (work / "results" / "records").mkdir(parents=True)
    for rank in range(36):
        (work / "results" / f"{rank}.out").write_text("")
        (work / "results" / "records" / f"{rank}.json").write_text("{}")
    config = ("pbs={account: P}", f"model={wf.TINY_MODEL}")
    marker = work / "results" / "model" / f"{prepare.model_slug(str(wf.TINY_MODEL.resolve()))}.json"
    marker.parent.mkdir()
    marker.write_text(json.dumps({"path": str(wf.TINY_MODEL)}))
    res = wf.snakemake(work, "-n", "--config", *config, profile="profiles/aurora")
    assert res.returncode == 0, output_of(res)
    assert (
        "PBS plan: 12 rank job(s) -> 1 submission(s) to queue 'capacity' with warm engines: "
        "1 x (1 node(s), 12 engines, 12 ranks, 12 per node, 1 per engine, walltime 00:26:00); "
        "at most 0.43 node-hours"
    ) in res.stdout + res.stderr
    assert wf.planned_ranks(res.stdout) == [str(rank) for rank in range(36, 48)]
