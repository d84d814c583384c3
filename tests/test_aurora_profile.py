"""The Aurora profile's commands against a real scheduler, and its dry-run checks.

The slurm tests run profiles/aurora's pbs-submit, pbs-status and pbs-cancel exactly
as Snakemake's cluster-generic executor does (submit and status through a shell,
cancel without one) against the test cluster: Slurm with its PBS command wrappers
(tests/slurm_cluster.py), so settings use pbs.flavor "slurm".
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import pbs
import pytest
import workflow as wf
from slurm_cluster import SlurmCluster

REPO = Path(__file__).resolve().parents[1]
PROFILE = REPO / "profiles" / "aurora"


def provider_settings(**changes) -> dict:
    config = wf.yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    conf = pbs.settings_from_config(config)
    conf |= {
        "account": "testproj",
        "queue": "debug",
        "flavor": "slurm",
        "setup": ["echo setup-ran"],
        "status_interval": 2,
        "nodes_per_submission": 2,
    }
    return conf | changes


def write_jobscript(folder: Path, ranks, exec_job: str, tiles: int | None = None) -> Path:
    """profiles/aurora/jobscript.sh filled in as Snakemake 9.27.1 fills it for a group."""
    ranks = list(ranks)
    props = {
        "type": "group",
        "groupid": "node",
        "local": False,
        "input": [f"data/{r}.in" for r in ranks],
        "output": [f"results/{r}.out" for r in ranks],
        "threads": len(ranks),
        "resources": {"tiles": len(ranks) if tiles is None else tiles, "runtime": 30},
        "jobid": "0bf19f0e-cd02-522c-bafd-16de090487a5",
    }
    text = (
        (PROFILE / "jobscript.sh")
        .read_text()
        .format(properties=json.dumps(props), exec_job=exec_job)
    )
    path = folder / ".snakemake" / "tmp.test" / "snakejob.node.sh"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


class Commands:
    """The profile's commands, run the way the cluster-generic plugin runs them."""

    def __init__(self, cluster: SlurmCluster, workdir: Path, conf: dict):
        self.cluster, self.workdir = cluster, workdir
        self.env = cluster.env | {pbs.SETTINGS_VARIABLE: json.dumps(conf)}

    def submit(self, jobscript: Path) -> subprocess.CompletedProcess:
        command = f'{PROFILE / "pbs-submit"} "{jobscript}"'
        return subprocess.run(
            command, shell=True, env=self.env, cwd=self.workdir, capture_output=True, text=True
        )

    def status(self, job_id: str) -> str:
        res = subprocess.run(
            f"{PROFILE / 'pbs-status'} '{job_id}'", shell=True, env=self.env,
            cwd=self.workdir, capture_output=True, text=True, check=True,
        )  # fmt: skip
        return res.stdout.strip()

    def cancel(self, *ids: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [PROFILE / "pbs-cancel", *ids], env=self.env, cwd=self.workdir,
            capture_output=True, text=True, timeout=2,
        )  # fmt: skip

    def wait(self, job_id: str, timeout: float = 90) -> str:
        deadline = time.monotonic() + timeout
        while (answer := self.status(job_id)) == "running":
            assert time.monotonic() < deadline, f"job {job_id} still running"
            time.sleep(1.1)
        return answer

    def queries(self) -> list[str]:
        log = self.workdir / ".snakemake" / "pbs" / "status.log"
        return [line for line in log.read_text().splitlines() if "query for" in line]


@pytest.fixture
def commands(slurm_cluster, tmp_path) -> Commands:
    return Commands(slurm_cluster, tmp_path, provider_settings())


@pytest.mark.slurm
def test_submission_runs_and_reads_success(commands, slurm_cluster, tmp_path):
    script = write_jobscript(tmp_path, range(13), "echo member-ran on $(hostname)")
    res = commands.submit(script)
    assert res.returncode == 0, res.stdout + res.stderr
    job_id = res.stdout.splitlines()[0]
    assert re.fullmatch(r"\d+", job_id)
    assert commands.wait(job_id) == "success"
    record = slurm_cluster.show_job(job_id)
    # 13 one-tile jobs at 12 per node: 2 nodes; walltime 30 + 10 minutes
    assert (record["NumNodes"], record["TimeLimit"]) == ("2", "00:40:00")
    assert (record["JobName"], record["Account"], record["Partition"]) == (
        "r0-12", "testproj", "debug",
    )  # fmt: skip
    log = (tmp_path / "logs" / "pbs" / "r0-12.log").read_text()
    assert log.index("setup-ran") < log.index("member-ran")
    assert "nodes: node" in log  # PBS_NODEFILE read by the jobscript


@pytest.mark.slurm
def test_failing_submission_reads_failed(commands, tmp_path):
    res = commands.submit(write_jobscript(tmp_path, [5], "exit 3"))
    job_id = res.stdout.strip()
    assert commands.wait(job_id) == "failed"


@pytest.mark.slurm
def test_failing_setup_stops_the_submission(slurm_cluster, tmp_path):
    commands = Commands(slurm_cluster, tmp_path, provider_settings(setup=["module load nosuch"]))
    job_id = commands.submit(write_jobscript(tmp_path, [5], "echo REACHED")).stdout.strip()
    assert commands.wait(job_id) == "failed"
    log = (tmp_path / "logs" / "pbs" / "r5.log").read_text()
    assert "REACHED" not in log and "pbs.setup" in log


@pytest.mark.slurm
def test_qsub_refusal_reaches_the_user(slurm_cluster, tmp_path):
    # An unknown queue name passes our checks (other sites); the scheduler refuses it.
    commands = Commands(slurm_cluster, tmp_path, provider_settings(queue="nosuch"))
    res = commands.submit(write_jobscript(tmp_path, [0], "true"))
    assert res.returncode == 1
    assert "qsub refused r0 (1 jobs on 1 node(s)" in res.stderr
    assert "invalid partition" in res.stderr.lower()
    assert "invalid partition" in (tmp_path / "logs" / "pbs" / "r0.log").read_text().lower()


@pytest.mark.slurm
def test_cancel_stops_a_running_submission(commands, slurm_cluster, tmp_path):
    job_id = commands.submit(write_jobscript(tmp_path, [1], "sleep 600")).stdout.strip()
    slurm_cluster.wait_job(job_id, states={"RUNNING"})
    started = time.monotonic()
    assert commands.cancel(job_id).returncode == 0
    assert time.monotonic() - started < 2  # the plugin kills cancel commands after 2 s
    assert slurm_cluster.wait_job(job_id)["JobState"] == "CANCELLED"
    assert commands.wait(job_id) == "failed"


@pytest.mark.slurm
def test_one_scheduler_query_per_polling_round(commands, slurm_cluster, tmp_path):
    ids = [
        commands.submit(write_jobscript(tmp_path, [i], "sleep 20")).stdout.strip() for i in range(3)
    ]
    for job_id in ids:  # round 1
        assert commands.status(job_id) == "running"
    assert len(commands.queries()) == 1
    time.sleep(1.2)  # > status_interval / 2
    for job_id in ids:  # round 2
        assert commands.status(job_id) == "running"
    queries = commands.queries()
    assert len(queries) == 2 and "query for 3 job(s): 3 running" in queries[-1]
    commands.cancel(*ids)


@pytest.mark.slurm
def test_workflow_packs_13_ranks_into_one_2_node_submission(slurm_cluster, tmp_path):
    work = wf.make_workdir(tmp_path / "run", {f"{i}.in": f"prompt {i}\n" for i in range(13)})
    overrides = wf.write_config(
        work,
        {
            "engine": "echo",
            "python": "",
            "launcher": ["srun", "--nodes=1", "--ntasks=1", "--nodelist={host}", "--overlap"],
            "tiles": {"cpu_bind": []},
            "pbs": {"account": "testproj", "queue": "capacity", "flavor": "slurm",
                    "setup": [], "status_interval": 2},
        },
    )  # fmt: skip
    res = wf.snakemake(
        work, "--seconds-between-status-checks", "2", profile="profiles/aurora",
        configfiles=[work / "profiles" / "aurora" / "aurora.yaml", overrides],
        env={k: slurm_cluster.env[k] for k in ("SLURM_CONF", "PATH")},
    )  # fmt: skip
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert sorted(p.name for p in (work / "results").glob("*.out")) == sorted(
        f"{i}.out" for i in range(13)
    )
    (line,) = (work / "logs" / "pbs" / "submissions.tsv").read_text().splitlines()
    _, job_id, name, nodes, walltime, queue, ranks = line.split("\t")
    assert (name, nodes, walltime, queue) == ("r0-12", "2", "00:40:00", "capacity")
    assert slurm_cluster.show_job(job_id)["NumNodes"] == "2"


# ------------------------------------------------ dry runs (need no scheduler)


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


def test_dry_run_checks_group_packing(tmp_path):
    res = dry_run(tmp_path, "--config", "pbs={account: P}", "--group-components", "node=12")
    assert res.returncode != 0
    assert "group-components has node=12" in res.stdout + res.stderr
