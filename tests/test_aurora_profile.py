"""The Aurora profile's commands against a real scheduler, and its dry-run checks.

The slurm tests run profiles/aurora's pbs-submit, pbs-status and pbs-cancel exactly
as Snakemake's cluster-generic executor does (submit and status through a shell,
cancel without one) against the test cluster: Slurm with its PBS command wrappers
(tests/slurm_cluster.py), so settings use pbs.flavor "slurm".
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
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


# ------------------------------------------ whole runs through the scheduler (helpers)

SRUN_LAUNCHER = ["srun", "--nodes=1", "--ntasks=1", "--nodelist={host}", "--overlap"]
SUBMISSION_KEYS = ("time", "id", "name", "nodes", "walltime", "queue", "ranks")


def aurora_folder(tmp_path: Path, ranks: dict[str, str], **config) -> Path:
    """A run folder; its test-config.yaml suits the test cluster, with ``config`` on top."""
    work = wf.make_workdir(tmp_path / "run", ranks)
    base = {
        "engine": "echo",
        # A local folder: echo loads no model, and a hub id would first be fetched.
        "model": str(wf.TINY_MODEL),
        "python": "",
        "launcher": SRUN_LAUNCHER,
        "tiles": {"cpu_bind": []},
        "pbs": {"account": "testproj", "queue": "capacity", "flavor": "slurm",
                "setup": [], "status_interval": 2},
    }  # fmt: skip
    wf.write_config(work, wf.deep_merge(base, config))
    return work


def run_aurora(cluster: SlurmCluster, work: Path, *args: str, **kwargs):
    """``snakemake --profile profiles/aurora`` in ``work`` against the test cluster."""
    return wf.snakemake(
        work, "--seconds-between-status-checks", "2", *args, profile="profiles/aurora",
        configfiles=[work / "profiles" / "aurora" / "aurora.yaml", work / "test-config.yaml"],
        env={k: cluster.env[k] for k in ("SLURM_CONF", "PATH")}, **kwargs,
    )  # fmt: skip


def submissions(work: Path) -> list[dict[str, str]]:
    """logs/pbs/submissions.tsv (written by pbs.submit), one dict per qsub."""
    path = work / "logs" / "pbs" / "submissions.tsv"
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    return [dict(zip(SUBMISSION_KEYS, line.split("\t"), strict=True)) for line in lines]


WRAPPER = """#!{python}
# Test stand-in for config `python`: notes where it runs, may wait or sleep, then
# becomes the real interpreter with the same arguments.
import os, sys, time

REAL, NOTES, BARRIER, SLEEP_RANKS = {real!r}, {notes!r}, {barrier!r}, {sleep!r}
args = sys.argv[1:]
rank = args[args.index("--rank") + 1]
if NOTES:
    with open(os.path.join(NOTES, rank), "w") as note:
        note.write(os.environ.get("SLURMD_NODENAME", "-") + " " + os.environ["TILE_HOST"])
    deadline = time.monotonic() + 120
    while len(os.listdir(NOTES)) < BARRIER and time.monotonic() < deadline:
        time.sleep(0.2)
if rank in SLEEP_RANKS:
    time.sleep(600)
    sys.exit(1)
os.execv(REAL, [REAL, *args])
"""


def python_wrapper(
    path: Path, *, notes: Path | None = None, barrier: int = 0, sleep_ranks=()
) -> Path:
    """An executable for config ``python`` (see WRAPPER).

    With ``notes``, each rank writes ``notes/<rank>``: the Slurm node it runs on
    (SLURMD_NODENAME, set by srun on the node of the step) and its placement host;
    then it waits until ``barrier`` ranks have written theirs, so all of them hold
    their tiles at once. Ranks in ``sleep_ranks`` sleep 600 s and fail.
    """
    path.write_text(
        WRAPPER.format(
            python=sys.executable,
            real=sys.executable,
            notes=str(notes) if notes else "",
            barrier=barrier,
            sleep=[str(r) for r in sleep_ranks],
        )
    )
    path.chmod(0o755)
    return path


def logged_argv(log: Path) -> list[str]:
    """The launcher command scripts/tiles.py wrote at the top of a rank's log."""
    line = next(x for x in log.read_text().splitlines() if x.startswith("argv: "))
    return json.loads(line.removeprefix("argv: "))


def output_of(res) -> str:
    return res.stdout[-4000:] + res.stderr[-4000:]


@pytest.mark.slurm
def test_workflow_runs_48_ranks_on_48_tiles_of_one_4_node_submission(slurm_cluster, tmp_path):
    prompts = {i: [f"rank {i} prompt {j}" for j in range(2)] for i in range(48)}
    notes = tmp_path / "notes"
    notes.mkdir()
    # All 48 ranks wait for each other before their task starts: each then holds its
    # tile at the same time as the others, so their 48 (host, tile) slots must differ.
    wrapper = python_wrapper(tmp_path / "python", notes=notes, barrier=48)
    work = aurora_folder(
        tmp_path,
        {f"{i}.in": "\n".join(lines) + "\n" for i, lines in prompts.items()},
        python=str(wrapper),
        tiles={"per_node": 12},
        pbs={"nodes_per_submission": 4},
    )
    res = run_aurora(slurm_cluster, work)  # profile: group-components node=48
    assert res.returncode == 0, output_of(res)
    (submission,) = submissions(work)
    assert (submission["name"], submission["nodes"]) == ("r0-47", "4")
    assert slurm_cluster.show_job(submission["id"])["NumNodes"] == "4"
    slots = []
    for rank, lines in prompts.items():
        assert wf.read_records(work / "results" / f"{rank}.out") == [(p, p) for p in lines]
        record = json.loads((work / "results" / "records" / f"{rank}.json").read_text())
        slots.append((record["host"], record["tiles"]))
        argv = logged_argv(work / "logs" / "infer" / f"{rank}.log")
        assert argv[:5] == [
            "srun", "--nodes=1", "--ntasks=1", f"--nodelist={record['host']}", "--overlap",
        ]  # fmt: skip
        # srun started the task on the node placement chose (all nodes are this machine).
        assert (notes / str(rank)).read_text().split() == [record["host"]] * 2
    assert sorted(slots) == sorted((f"node{n}", str(t)) for n in range(1, 5) for t in range(12))


@pytest.mark.slurm
@pytest.mark.vllm
def test_workflow_runs_vllm_through_the_scheduler_2_nodes_x_2_tiles(slurm_cluster, tmp_path):
    prompts = {i: [f"Rank {i} says hello", f"The capital of rank {i} is"] for i in range(8)}
    work = aurora_folder(
        tmp_path,
        {f"{i}.in": "\n".join(lines) + "\n" for i, lines in prompts.items()},
        engine="vllm",
        model=str(wf.TINY_MODEL),
        # profiles/local/local.yaml's CPU settings
        vllm={"dtype": "bfloat16", "enforce_eager": True, "cpu_kv_cache_gib": 1},
        task_env={"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "HF_HOME": str(tmp_path / "hf")},
        tiles={"per_node": 2},
        pbs={"nodes_per_submission": 2},
    )
    # 2 nodes x 2 tiles: 4 engines per submission. --jobs 1: one submission at a time,
    # so 4 engines share this machine's 2 cores, not 8.
    res = run_aurora(
        slurm_cluster, work, "--group-components", "node=4", "--cores", "4", "--jobs", "1"
    )
    assert res.returncode == 0, output_of(res)
    subs = submissions(work)
    assert [s["nodes"] for s in subs] == ["2", "2"]
    assert sorted(int(r) for s in subs for r in s["ranks"].split(",")) == list(range(8))
    for job_id in (s["id"] for s in subs):
        assert slurm_cluster.show_job(job_id)["NumNodes"] == "2"
    for rank, lines in prompts.items():
        records = wf.read_records(work / "results" / f"{rank}.out")
        assert [p for p, _ in records] == lines
        assert all(generated.strip() for _, generated in records), records
        record = json.loads((work / "results" / "records" / f"{rank}.json").read_text())
        assert (record["engine"], record["output_tokens"] > 0) == ("vllm", True)


def short_queue(cluster: SlurmCluster, name: str = "short") -> str:
    """A partition whose name the provider does not know, created once per cluster.

    Aurora's queues need a walltime of at least 5 minutes (pbs.AURORA_QUEUES), which
    the provider checks; an unknown queue name passes, as another site's queue would.
    """
    if cluster.run(["scontrol", "show", "partition", name]).returncode != 0:
        cluster.run(
            ["scontrol", "create", f"PartitionName={name}", "Nodes=ALL", "OverSubscribe=YES",
             "State=UP", "MaxTime=60"],
            check=True,
        )  # fmt: skip
    return name


def yaml_config(work: Path) -> dict:
    """The run folder's test-config.yaml (see aurora_folder)."""
    return wf.yaml.safe_load((work / "test-config.yaml").read_text())


def local_seconds(stamp: str) -> float:
    """Seconds since the epoch of a local time stamp: scontrol's or status.log's."""
    return time.mktime(time.strptime(stamp.replace("T", " "), "%Y-%m-%d %H:%M:%S"))


@pytest.mark.slurm
def test_walltime_kill_is_noticed_and_rerun_incomplete_runs_only_the_killed_rank(
    slurm_cluster, tmp_path
):
    interval = 2  # pbs.status_interval and --seconds-between-status-checks
    ranks = {f"{i}.in": f"rank {i} prompt\n" for i in range(4)}
    config = {
        "runtime_minutes": 1,
        "tiles": {"per_node": 4},
        "pbs": {"queue": short_queue(slurm_cluster), "nodes_per_submission": 1,
                "walltime_margin_minutes": 0, "status_interval": interval},
    }  # fmt: skip
    sleeper = python_wrapper(tmp_path / "python", sleep_ranks=[3])
    work = aurora_folder(tmp_path, ranks, python=str(sleeper), **config)
    packing = ("--group-components", "node=4", "--cores", "4")
    res = run_aurora(slurm_cluster, work, *packing)
    assert res.returncode != 0, output_of(res)
    (submission,) = submissions(work)
    assert (submission["name"], submission["walltime"]) == ("r0-3", "00:01:00")
    job = slurm_cluster.show_job(submission["id"])
    assert job["JobState"] == "TIMEOUT", job
    # The status command's first "failed" answer, against the scheduler's end of the job.
    # Both are local times cut to whole seconds (up to 1 s early each), and the status
    # command needs a moment to start: 2 polling intervals plus 2 s of slack.
    log = (work / ".snakemake" / "pbs" / "status.log").read_text().splitlines()
    noticed = next(line for line in log if "query for" in line and "failed" in line)
    delay = local_seconds(noticed[:19]) - local_seconds(job["EndTime"])
    assert -1 <= delay <= 2 * interval + 2, (job["EndTime"], noticed)
    results = work / "results"
    for rank in range(3):
        assert wf.read_records(results / f"{rank}.out") == [(f"rank {rank} prompt",) * 2]
    assert not (results / "3.out").exists()

    wf.write_config(work, wf.deep_merge(yaml_config(work), {"python": ""}))
    plan = run_aurora(slurm_cluster, work, *packing, "--rerun-incomplete", "-n")
    assert wf.planned_ranks(plan.stdout + plan.stderr) == ["3"], output_of(plan)
    mtimes = {rank: (results / f"{rank}.out").stat().st_mtime_ns for rank in range(3)}
    res = run_aurora(slurm_cluster, work, *packing, "--rerun-incomplete")
    assert res.returncode == 0, output_of(res)
    assert [s["name"] for s in submissions(work)] == ["r0-3", "r3"]
    assert {rank: (results / f"{rank}.out").stat().st_mtime_ns for rank in range(3)} == mtimes
    for rank in range(4):
        assert wf.read_records(results / f"{rank}.out") == [(f"rank {rank} prompt",) * 2]


def our_jobs_in_queue(cluster: SlurmCluster, ids) -> dict[str, str]:
    """{job id: state} of the given jobs that squeue still lists as pending or running."""
    res = cluster.run(["squeue", "-h", "-t", "PENDING,RUNNING", "-o", "%i %T"], check=True)
    states = dict(line.split() for line in res.stdout.splitlines() if line.strip())
    return {job_id: states[job_id] for job_id in ids if job_id in states}


def processes_running(path: Path) -> list[int]:
    """Pids of processes whose command line names ``path``."""
    needle = os.fsencode(str(path))
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and needle in (entry / "cmdline").read_bytes().split(b"\0"):
                pids.append(int(entry.name))
        except OSError:
            pass
    return pids


@pytest.mark.slurm
def test_ctrl_c_cancels_the_running_submission(slurm_cluster, tmp_path):
    notes = tmp_path / "notes"
    notes.mkdir()
    sleeper = python_wrapper(tmp_path / "python", notes=notes, sleep_ranks=[0, 1])
    work = aurora_folder(tmp_path, {"0.in": "a\n", "1.in": "b\n"}, python=str(sleeper))
    proc = run_aurora(slurm_cluster, work, popen=True)  # in a session of its own
    try:
        deadline = time.monotonic() + 120
        while not (len(submissions(work)) == 1 and len(list(notes.iterdir())) == 2):
            assert proc.poll() is None, proc.stdout.read()[-4000:]
            assert time.monotonic() < deadline, "the ranks did not start"
            time.sleep(0.5)
        (submission,) = submissions(work)
        job_id = submission["id"]
        assert slurm_cluster.show_job(job_id)["JobState"] == "RUNNING"
        assert processes_running(sleeper)
        # Ctrl-C in a terminal signals the foreground process group.
        os.killpg(proc.pid, signal.SIGINT)
        output, _ = proc.communicate(timeout=60)
        assert proc.returncode != 0, output[-4000:]
        deadline = time.monotonic() + 10  # qdel may still be on its way when Snakemake ends
        while (left := our_jobs_in_queue(slurm_cluster, [job_id])) and time.monotonic() < deadline:
            time.sleep(0.25)
        assert not left, output[-4000:]
        assert slurm_cluster.wait_job(job_id, timeout=10)["JobState"] == "CANCELLED"
        assert f"qdel {job_id}" in (work / ".snakemake" / "pbs" / "cancel.log").read_text()
        deadline = time.monotonic() + 10  # Slurm's KillWait is 2 s
        while processes_running(sleeper) and time.monotonic() < deadline:
            time.sleep(0.25)
        assert not processes_running(sleeper), "the ranks' tasks survived the cancel"
    finally:  # a failed test must not leave its sleeping submission behind
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        ids = [s["id"] for s in submissions(work)]
        if our_jobs_in_queue(slurm_cluster, ids):
            slurm_cluster.run(["scancel", *ids])


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


def test_dry_run_prints_the_pbs_plan_of_the_pending_ranks(tmp_path):
    samples = {path.name: path.read_text() for path in (REPO / "data").glob("*.in")}
    assert len(samples) == 48
    work = wf.make_workdir(tmp_path / "run", samples)
    res = wf.snakemake(work, "-n", "--config", "pbs={account: P}", profile="profiles/aurora")
    assert res.returncode == 0, output_of(res)
    assert (
        "PBS plan: 48 rank job(s) -> 1 submission(s) to queue 'prod' (1 x 4 node(s)), "
        "walltime 00:40:00 each, at most 2.67 node-hours"
    ) in res.stdout + res.stderr
    assert len(wf.planned_ranks(res.stdout)) == 48
    # 36 ranks done (outputs newer than their inputs): 12 left, one node's worth. With
    # a local model folder, the ranks depend on nothing else.
    (work / "results" / "records").mkdir(parents=True)
    for rank in range(36):
        (work / "results" / f"{rank}.out").write_text("")
        (work / "results" / "records" / f"{rank}.json").write_text("{}")
    config = ("pbs={account: P}", f"model={wf.TINY_MODEL}")
    res = wf.snakemake(work, "-n", "--config", *config, profile="profiles/aurora")
    assert res.returncode == 0, output_of(res)
    assert (
        "PBS plan: 12 rank job(s) -> 1 submission(s) to queue 'prod' (1 x 1 node(s)), "
        "walltime 00:40:00 each, at most 0.67 node-hours"
    ) in res.stdout + res.stderr
    assert wf.planned_ranks(res.stdout) == [str(rank) for rank in range(36, 48)]
