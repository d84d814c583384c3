"""The Aurora profile against a real PBS server, and its dry-run checks.

The ``pbs`` tests run profiles/aurora's pbs-submit, pbs-status and pbs-cancel
exactly as Snakemake's cluster-generic executor does (submit and status through a
shell, cancel without one), and whole ``snakemake --profile profiles/aurora`` runs,
against OpenPBS 23.06 with four execution hosts (tests/pbs_cluster.py). Commands on
the hosts of a submission start with PBS's own launcher, ``pbs_tmrsh <host>`` (which,
unlike Aurora's ``mpiexec``, starts them in $HOME and sends their output to the job's
output file); the model is copied to every node with ``pbsdsh``.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import pbs
import workflow as wf
from engine import client
from formats.files import safe_name
from model import prepare
from pbs_cluster import PbsCluster, clear_stale_pyenv_lock
from rank.layout import output_file, record_file

REPO = Path(__file__).resolve().parents[1]
PROFILE = REPO / "profiles" / "aurora"
TMRSH = ["/opt/pbs/bin/pbs_tmrsh", "{host}"]
PBSDSH = ["/opt/pbs/bin/pbsdsh", "--"]
INTERVAL = 2  # pbs.status_interval and --seconds-between-status-checks in these tests


# (stand-in for the main Snakemake, its run's state folder) of the running test
_RUN_OWNERS: list[tuple[subprocess.Popen, Path]] = []


def provider_settings(work: Path, **changes) -> dict:
    config = wf.yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    # The commands run here as Snakemake would run them; a process of the test's own
    # stands in for the main Snakemake, so the run's watchdog ends with the test.
    owner = subprocess.Popen(["sleep", "3600"])
    _RUN_OWNERS.append((owner, work / ".snakemake" / "pbs"))
    conf = pbs.settings_from_config(config, owner_pid=owner.pid)
    conf |= {
        "account": "testproj",
        "queue": "capacity",
        "setup": ["echo setup-ran"],
        "status_interval": INTERVAL,
        "nodes_per_submission": 2,
        "state_dir": str(work / ".snakemake" / "pbs"),
        "log_dir": str(work / "logs" / "pbs"),
        "results_dir": str(work / "results"),
        "failed_dir": str(work / "logs" / "infer" / "failed"),
        "registry_root": str(work / "logs" / "engines"),
        "progress_log": str(work / "logs" / "progress.log"),
        # these tests check what PBS's end of a job reads as, not its continuation
        "resubmit": 0,
    }
    return conf | changes


@pytest.fixture(autouse=True)
def run_owner_ends_with_the_test():
    """At the end of a test that ran the profile's commands itself: its stand-in
    Snakemake ends, and the run's watchdog must end with it (it deletes what the run
    left in the queue, then removes its lock)."""
    yield
    watched = []
    while _RUN_OWNERS:
        owner, state_dir = _RUN_OWNERS.pop()
        owner.kill()
        owner.wait()
        watched.append(state_dir)
    deadline = time.monotonic() + 60
    while (locks := [p for d in watched for p in d.glob("watchdog.*.lock")]) and (
        time.monotonic() < deadline
    ):
        time.sleep(0.5)
    assert not locks, "the run's watchdog did not end with its Snakemake"


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
    path = folder / ".snakemake" / "tmp.test" / f"snakejob.node.{ranks[0]}.sh"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


class Commands:
    """The profile's commands, run the way the cluster-generic plugin runs them."""

    def __init__(self, cluster: PbsCluster, workdir: Path, conf: dict):
        self.cluster, self.workdir, self.conf = cluster, workdir, conf
        self.env = cluster.env | {pbs.SETTINGS_VARIABLE: json.dumps(conf)}

    def submit(self, jobscript: Path) -> subprocess.CompletedProcess:
        command = f'{PROFILE / "pbs-submit"} "{jobscript}"'
        return subprocess.run(
            command, shell=True, env=self.env, cwd=self.workdir, capture_output=True, text=True
        )

    def submit_ok(self, jobscript: Path) -> str:
        res = self.submit(jobscript)
        assert res.returncode == 0, res.stdout + res.stderr
        return res.stdout.strip()

    def status(self, job_id: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            f"{PROFILE / 'pbs-status'} '{job_id}'", shell=True, env=self.env,
            cwd=self.workdir, capture_output=True, text=True, check=True,
        )  # fmt: skip

    def state(self, job_id: str) -> str:
        return self.status(job_id).stdout.strip()

    def cancel(self, *ids: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [PROFILE / "pbs-cancel", *ids], env=self.env, cwd=self.workdir,
            capture_output=True, text=True, timeout=2,
        )  # fmt: skip

    def wait(self, job_id: str, timeout: float = 90) -> str:
        deadline = time.monotonic() + timeout
        while (answer := self.state(job_id)) == "running":
            assert time.monotonic() < deadline, f"job {job_id} still running"
            time.sleep(INTERVAL / 2 + 0.1)
        return answer

    def status_log(self) -> str:
        return (self.workdir / ".snakemake" / "pbs" / "status.log").read_text()

    def queries(self) -> list[str]:
        return [line for line in self.status_log().splitlines() if "query for" in line]


@pytest.fixture
def commands(pbs_cluster, tmp_path):
    cmds = Commands(pbs_cluster, tmp_path, provider_settings(tmp_path))
    yield cmds
    delete_our_jobs(pbs_cluster, tmp_path)


def our_job_ids(work: Path) -> list[str]:
    store = pbs.StateStore(work / ".snakemake" / "pbs").read()
    return list(store["jobs"]) + [s["id"] for s in submissions(work)]


def delete_our_jobs(cluster: PbsCluster, work: Path) -> None:
    """A failed test must not leave its submissions behind."""
    left = [i for i in set(our_job_ids(work)) if i in cluster.jobs_in_queue()]
    if left:
        cluster.run(["qdel", "-W", "force", *left])
    # A job killed while its login shell started can leave pyenv's lock behind here.
    clear_stale_pyenv_lock()


def queued_or_running(cluster: PbsCluster, ids) -> list[str]:
    in_queue = set(cluster.jobs_in_queue())
    return [i for i in ids if i in in_queue]


def wait_gone(cluster: PbsCluster, ids, timeout: float = 15) -> list[str]:
    deadline = time.monotonic() + timeout
    while (left := queued_or_running(cluster, ids)) and time.monotonic() < deadline:
        time.sleep(0.25)
    return left


# ------------------------------------------------------------- the commands alone


@pytest.mark.pbs
def test_submission_runs_and_reads_success(commands, pbs_cluster, tmp_path):
    script = write_jobscript(tmp_path, range(13), "echo member-ran on $(hostname)")
    job_id = commands.submit_ok(script)
    assert re.fullmatch(r"\d+\.pbs-head", job_id)
    assert commands.wait(job_id) == "success"
    job = pbs_cluster.job(job_id)
    # 13 one-tile jobs at 12 per node: 2 nodes; walltime 30 + 10 minutes
    resources = job["Resource_List"]
    assert (resources["nodect"], resources["walltime"]) == (2, "00:40:00")
    assert (resources["filesystems"], resources["place"]) == ("home:flare", "scatter")
    assert (job["Job_Name"], job["Account_Name"], job["queue"]) == ("r0-12", "testproj", "capacity")
    log = (tmp_path / "logs" / "pbs" / "r0-12.log").read_text()
    assert log.index("setup-ran") < log.index("member-ran")
    assert re.search(r"nodes: node\d node\d", log)  # PBS_NODEFILE read by the jobscript


@pytest.mark.pbs
def test_failing_submission_reads_failed(commands, tmp_path):
    job_id = commands.submit_ok(write_jobscript(tmp_path, [5], "exit 3"))
    assert commands.wait(job_id) == "failed"
    assert "Exit_status 3" in commands.status_log()


@pytest.mark.pbs
def test_failing_setup_stops_the_submission(pbs_cluster, tmp_path):
    conf = provider_settings(tmp_path, setup=["module load nosuch"])
    commands = Commands(pbs_cluster, tmp_path, conf)
    job_id = commands.submit_ok(write_jobscript(tmp_path, [5], "echo REACHED"))
    assert commands.wait(job_id) == "failed"
    log = (tmp_path / "logs" / "pbs" / "r5.log").read_text()
    assert "REACHED" not in log and "pbs.setup" in log


@pytest.mark.pbs
def test_qsub_refusals_reach_the_user_with_pbs_messages(pbs_cluster, tmp_path):
    # A queue unknown to the provider's table (another site's) passes our checks: PBS
    # refuses the 1-node job itself, as Aurora's prod refuses jobs below 256 nodes.
    pbs_cluster.add_queue("bigonly", resources_min__nodect=256)
    commands = Commands(pbs_cluster, tmp_path, provider_settings(tmp_path, queue="bigonly"))
    res = commands.submit(write_jobscript(tmp_path, [0], "true"))
    assert (res.returncode, res.stdout) == (1, "")
    assert "qsub refused r0 (1 jobs on 1 node(s)" in res.stderr and "(exit 188)" in res.stderr
    assert "Job violates queue and/or server resource limits" in res.stderr
    assert "Job violates queue" in (tmp_path / "logs" / "pbs" / "r0.log").read_text()

    # capacity: 5 jobs queued or running per user; the sixth is refused
    commands = Commands(pbs_cluster, tmp_path, provider_settings(tmp_path))
    try:
        for rank in range(5):
            commands.submit_ok(write_jobscript(tmp_path, [10 + rank], "sleep 60"))
        res = commands.submit(write_jobscript(tmp_path, [15], "sleep 60"))
        assert res.returncode == 1
        assert "(exit 38)" in res.stderr and "would exceed queue generic's per-user limit" in (
            res.stderr
        )
    finally:
        delete_our_jobs(pbs_cluster, tmp_path)


@pytest.mark.pbs
def test_cancel_stops_a_running_submission(commands, pbs_cluster, tmp_path):
    job_id = commands.submit_ok(write_jobscript(tmp_path, [1], "sleep 600"))
    pbs_cluster.wait_job(job_id, states={"R"})
    started = time.monotonic()
    assert commands.cancel(job_id).returncode == 0
    assert time.monotonic() - started < 2  # the plugin kills cancel commands after 2 s
    job = pbs_cluster.wait_job(job_id, timeout=30)
    assert "terminated" in job["comment"]
    assert commands.state(job_id) == "failed"


@pytest.mark.pbs
def test_qdel_from_outside_reads_failed_within_two_polling_rounds(commands, pbs_cluster, tmp_path):
    job_id = commands.submit_ok(write_jobscript(tmp_path, [2], "sleep 600"))
    pbs_cluster.wait_job(job_id, states={"R"})
    assert commands.state(job_id) == "running"
    pbs_cluster.run(["qdel", job_id], check=True)
    deleted = time.monotonic()
    pbs_cluster.wait_job(job_id, timeout=30)  # PBS says F: Exit_status 0, substate 91
    answers = []
    while time.monotonic() - deleted < 2 * INTERVAL + 1:
        answers.append(commands.state(job_id))
        if answers[-1] != "running":
            break
        time.sleep(INTERVAL / 2 + 0.05)  # Snakemake asks once per interval
    assert answers[-1] == "failed", answers
    assert "deleted while running (qdel)" in commands.status_log()


@pytest.mark.pbs
def test_several_submissions_in_flight_read_right_beyond_the_unknown_job_limit(
    pbs_cluster, tmp_path
):
    # OpenPBS lists only the first of several ids in JSON (openpbs issue 2672): the
    # others must not turn unknown and then failed after problem_rounds/seconds.
    conf = provider_settings(tmp_path, problem_rounds=2, problem_seconds=3)
    commands = Commands(pbs_cluster, tmp_path, conf)
    try:
        ids = [
            commands.submit_ok(write_jobscript(tmp_path, [r], f"sleep {16 + 2 * r}"))
            for r in range(3)
        ]
        started = time.monotonic()
        while any(i in pbs_cluster.jobs_in_queue() for i in ids):
            states = [commands.state(i) for i in ids]
            assert "failed" not in states, commands.status_log()
            assert time.monotonic() - started < 90
            time.sleep(INTERVAL / 2 + 0.05)
        assert time.monotonic() - started > conf["problem_seconds"] + 2 * INTERVAL
        assert [commands.wait(i) for i in ids] == ["success"] * 3
        log = commands.status_log()
        assert "text form for the rest" in log and "status unknown" not in log
    finally:
        delete_our_jobs(pbs_cluster, tmp_path)


@pytest.mark.pbs
def test_held_submissions(pbs_cluster, tmp_path):
    # A stopped queue keeps the jobs queued so that they can be held.
    pbs_cluster.add_queue("parked")
    pbs_cluster.qmgr("set queue parked started = False")
    conf = provider_settings(tmp_path, queue="parked")
    commands = Commands(pbs_cluster, tmp_path, conf)
    try:
        system = commands.submit_ok(write_jobscript(tmp_path, [0], "true"))
        user = commands.submit_ok(write_jobscript(tmp_path, [1], "true"))
        pbs_cluster.run(["qhold", "-h", "s", system], check=True)
        pbs_cluster.run(["qhold", "-h", "u", user], check=True)
        assert pbs_cluster.job(system)["Hold_Types"] == "s"
        time.sleep(INTERVAL / 2 + 0.1)
        first = commands.status(system)
        assert first.stdout.strip() == "failed"
        assert "held by the system (Hold_Types s)" in first.stderr
        waiting = commands.status(user)
        assert waiting.stdout.strip() == "running"
        # the round's warnings come with whichever status call made the round
        warnings = first.stderr + waiting.stderr
        assert f"job {user}" in warnings and "held (Hold_Types u)" in warnings
        assert f"qrls {user}" in warnings
        assert pbs_cluster.wait_job(system, timeout=30)["job_state"] == "F"  # qdel'd
        assert f"qdel {system}" in (tmp_path / ".snakemake" / "pbs" / "cancel.log").read_text()
        time.sleep(INTERVAL / 2 + 0.1)
        again = commands.status(user)  # warned once, not every round
        assert again.stdout.strip() == "running" and "qrls" not in again.stderr
        # the round's progress line still says so, with PBS's comment
        assert f"r1 {user} held (Job held by " in again.stderr
    finally:
        delete_our_jobs(pbs_cluster, tmp_path)
        pbs_cluster.qmgr("delete queue parked", check=False)


@pytest.mark.pbs
def test_one_scheduler_query_per_polling_round(commands, tmp_path):
    ids = [commands.submit_ok(write_jobscript(tmp_path, [i], "sleep 20")) for i in range(3)]
    for job_id in ids:  # round 1
        assert commands.state(job_id) == "running"
    assert len(commands.queries()) == 1
    time.sleep(INTERVAL / 2 + 0.2)
    for job_id in ids:  # round 2
        assert commands.state(job_id) == "running"
    queries = commands.queries()
    assert len(queries) == 2 and "query for 3 job(s): 3 running" in queries[-1]
    commands.cancel(*ids)


# ------------------------------------------ whole runs through the scheduler (helpers)

SUBMISSION_KEYS = ("time", "id", "name", "nodes", "walltime", "queue", "ranks")


def aurora_folder(tmp_path: Path, ranks: dict[str, str], **config) -> Path:
    """A run folder; its test-config.yaml suits the test cluster, with ``config`` on top."""
    work = wf.make_workdir(tmp_path / "run", ranks)
    base = {
        "engine": "echo",
        "model": str(wf.TINY_MODEL),
        "python": "",
        "warm_engines": False,
        "launcher": TMRSH,
        "node_launcher": PBSDSH,
        "engine_launcher": PBSDSH,
        "tiles": {"cpu_bind": []},
        "weights": {"shared_hf_home": "", "stage": True},
        "pbs": {"account": "testproj", "queue": "capacity", "setup": [],
                "status_interval": INTERVAL},
    }  # fmt: skip
    wf.write_config(work, wf.deep_merge(base, config))
    return work


def run_config(work: Path) -> dict:
    """config.yaml, aurora.yaml and the run folder's test-config.yaml, merged."""
    config = {}
    for path in (
        REPO / "config" / "config.yaml",
        PROFILE / "aurora.yaml",
        work / "test-config.yaml",
    ):
        config = wf.deep_merge(config, wf.yaml.safe_load(path.read_text()))
    return config


def run_aurora(cluster: PbsCluster, work: Path, *args: str, **kwargs):
    """``snakemake --profile profiles/aurora`` in ``work`` against the test cluster,
    packing one submission's worth of jobs per group (the profile's group-components
    is for warm engines on 4 nodes; later options override it)."""
    env = {k: cluster.env[k] for k in ("PATH", "PBS_CONF_FILE", "PBS_SERVER")}
    env |= kwargs.pop("env", {})
    group = pbs.expected_group_size(pbs.settings_from_config(run_config(work)))
    return wf.snakemake(
        work, "--seconds-between-status-checks", str(INTERVAL),
        "--group-components", f"node={group}", "--cores", str(max(group, 240)), *args,
        profile="profiles/aurora",
        configfiles=[work / "profiles" / "aurora" / "aurora.yaml", work / "test-config.yaml"],
        env=env, **kwargs,
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
import os
import sys
import time

REAL, NOTES, BARRIER, SLEEP_RANKS = {real!r}, {notes!r}, {barrier!r}, {sleep!r}
args = sys.argv[1:]
rank = args[args.index("--rank") + 1]
if NOTES:
    with open(os.path.join(NOTES, rank), "w") as note:
        note.write(" ".join([os.environ.get("PBS_NODENUM", "-"), os.environ["TILE_HOST"],
                             os.getcwd()]))
    deadline = time.monotonic() + 600
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

    With ``notes``, each rank writes ``notes/<rank>``: the PBS node index it runs on
    (PBS_NODENUM, set by pbs_tmrsh on the host it started the task on), its placement
    host and its working folder; then it waits until ``barrier`` ranks have written
    theirs, so all of them hold their tiles at once. Ranks in ``sleep_ranks`` sleep
    600 s and fail.
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
    """The launcher command scripts/placement/tiles.py wrote at the top of a rank's log."""
    line = next(x for x in log.read_text().splitlines() if x.startswith("argv: "))
    return json.loads(line.removeprefix("argv: "))


def output_of(res) -> str:
    return res.stdout[-4000:] + res.stderr[-4000:]


def node_list(cluster: PbsCluster, job_id: str) -> list[str]:
    """The job's hosts in PBS_NODEFILE order (exec_host: node3/0+node1/0+...)."""
    return [part.split("/")[0] for part in cluster.job(job_id)["exec_host"].split("+")]


@pytest.mark.pbs
def test_workflow_runs_48_ranks_on_48_tiles_of_one_4_node_submission(pbs_cluster, tmp_path):
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
    try:
        res = run_aurora(pbs_cluster, work)  # profile: group-components node=48
    finally:
        delete_our_jobs(pbs_cluster, work)
    assert res.returncode == 0, output_of(res)
    (submission,) = submissions(work)
    assert (submission["name"], submission["nodes"]) == ("r0-47", "4")
    hosts = node_list(pbs_cluster, submission["id"])
    assert sorted(hosts) == ["node1", "node2", "node3", "node4"]
    slots = []
    for rank, lines in prompts.items():
        assert wf.read_records(work / "results" / f"{rank}.out") == [(p, p) for p in lines]
        record = json.loads((work / "results" / "records" / f"{rank}.json").read_text())
        slots.append((record["host"], record["tiles"]))
        argv = logged_argv(work / "logs" / "infer" / f"{rank}.log")
        assert argv[:2] == ["/opt/pbs/bin/pbs_tmrsh", record["host"]]
        # the task's own lines reach the rank's log, though pbs_tmrsh sends its output
        # to the submission's output file
        assert f"rank {rank}: 2 prompts" in (work / "logs" / "infer" / f"{rank}.log").read_text()
        # pbs_tmrsh started the task on the host placement chose, in $HOME
        node_number, host, cwd = (notes / str(rank)).read_text().split()
        assert hosts[int(node_number)] == host == record["host"]
        assert cwd == os.path.expanduser("~") != str(work)
    assert sorted(slots) == sorted((f"node{n}", str(t)) for n in range(1, 5) for t in range(12))


@pytest.mark.pbs
@pytest.mark.vllm
def test_workflow_runs_vllm_through_the_scheduler_on_node_local_model_copies(pbs_cluster, tmp_path):
    prompts = {i: [f"Rank {i} says hello", f"The capital of rank {i} is"] for i in range(4)}
    work = aurora_folder(
        tmp_path,
        {f"{i}.in": "\n".join(lines) + "\n" for i, lines in prompts.items()},
        engine="vllm",
        model=str(wf.TINY_MODEL),
        # profiles/local/local.yaml's CPU settings
        vllm={"dtype": "bfloat16", "enforce_eager": True, "cpu_kv_cache_gib": 1},
        task_env={"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "OMP_NUM_THREADS": "1"},
        tiles={"per_node": 2},
        pbs={"nodes_per_submission": 2},
        weights={"stage_dir": str(tmp_path / "node-local")},
    )
    # 2 nodes x 2 tiles: 4 engines in one submission on this machine's 2 cores.
    try:
        res = run_aurora(pbs_cluster, work, "--group-components", "node=4", "--cores", "4")
    finally:
        delete_our_jobs(pbs_cluster, work)
    assert res.returncode == 0, output_of(res)
    (submission,) = submissions(work)
    assert submission["nodes"] == "2"
    job_id = submission["id"]
    hosts = node_list(pbs_cluster, job_id)
    for rank, lines in prompts.items():
        records = wf.read_records(work / "results" / f"{rank}.out")
        assert [p for p, _ in records] == lines
        assert all(generated.strip() for _, generated in records), records
        record = json.loads((work / "results" / "records" / f"{rank}.json").read_text())
        assert (record["engine"], record["output_tokens"] > 0) == ("vllm", True)
        # the engine loaded its node's copy
        copy = tmp_path / "node-local" / f"model-{job_id}" / record["host"] / "tiny-opt"
        assert record["model"] == str(copy)
    # one copy per node, by one pbsdsh call, and gone when the submission ended
    log = (work / "logs" / "pbs" / "r0-3.log").read_text()
    assert log.count("stage_model: prepare on 2 node(s)") == 1
    # preflight: each node's vLLM imported, no XPU here
    assert sorted(re.findall(r"preflight: (node\d): tile check skipped", log)) == sorted(hosts)
    assert sorted(re.findall(r"stage_model: (node\d): [\d.]+ MiB to", log)) == sorted(hosts)
    assert sorted(re.findall(r"stage_model: (node\d): removed", log)) == sorted(hosts)
    assert list((tmp_path / "node-local").iterdir()) == []


# ------------------------------------------------- warm engines in a submission

ECHO_SERVER = REPO / "scripts" / "engine" / "echo_server.py"


def warm_folder(tmp_path: Path, ranks: dict[str, str], **config) -> Path:
    """A run folder for warm engines: engines start with ONE pbsdsh call (one process
    per node, which runs all the node's engines), each rank asks them from the
    submission's Snakemake."""
    # "{host}": each host of the test cluster has a loopback address of its own (Aurora's
    # engines all use 127.0.0.1, one node each)
    warm = {"ranks_per_engine": 10, "start_minutes": 1, "rank_minutes": 1, "ready_timeout_s": 120,
            "listen": "{host}"}  # fmt: skip
    base = {"warm_engines": True, "warm": warm, "engine_launcher": PBSDSH}
    return aurora_folder(tmp_path, ranks, **wf.deep_merge(base, config))


def loopback_of(host: str) -> str:
    """The address a test host's engines listen on (warm.listen "{host}": node<N> is
    127.0.0.1<N> in /etc/hosts)."""
    return socket.gethostbyname(host)


def host_of(address: str) -> str:
    return socket.gethostbyaddr(address)[0].split(".")[0]


def launcher_calls(job_log: str) -> list[str]:
    return re.findall(r"engines: launcher call for (\d+) engine\(s\) on (\d+) node", job_log)


def engine_urls(work: Path, job_id: str) -> dict[str, str]:
    registry = work / "logs" / "engines" / re.sub(r"[^A-Za-z0-9._-]", "_", job_id)
    return {path.stem: json.loads(path.read_text())["url"] for path in registry.glob("*.json")}


def engine_states(work: Path, job_id: str) -> dict[str, str]:
    registry = work / "logs" / "engines" / re.sub(r"[^A-Za-z0-9._-]", "_", job_id)
    return {path.stem: json.loads(path.read_text())["state"] for path in registry.glob("*.json")}


@pytest.mark.pbs
def test_warm_engines_one_launcher_call_starts_48_engines_that_serve_480_ranks(
    pbs_cluster, tmp_path
):
    prompts = {i: [f"rank {i} prompt {j}" for j in range(2)] for i in range(480)}
    work = warm_folder(
        tmp_path,
        {f"{i}.in": "\n".join(lines) + "\n" for i, lines in prompts.items()},
        tiles={"per_node": 12},
        pbs={"nodes_per_submission": 4},
        # 2 s a request: the first engines up do not serve every rank alone
        task_env={"ECHO_SERVER_DELAY_S": "2"},
    )
    try:
        res = run_aurora(pbs_cluster, work)  # group-components node=480
    finally:
        delete_our_jobs(pbs_cluster, work)
    assert res.returncode == 0, output_of(res)
    (submission,) = submissions(work)
    assert (submission["name"], submission["nodes"]) == ("r0-479", "4")
    # walltime: engine start 1 min + 10 ranks per engine x 1 min + the 10 min margin
    assert submission["walltime"] == "00:21:00"
    engines_used, clients = set(), {}
    for rank, lines in prompts.items():
        assert wf.read_records(work / "results" / f"{rank}.out") == [(p, p) for p in lines]
        record = json.loads((work / "results" / "records" / f"{rank}.json").read_text())
        engines_used.add((record["host"], record["tiles"], record["engine_name"]))
        # no rank request crosses nodes: its node's Snakemake, its node's engine
        assert record["client_node"] == record["host"], record
        clients.setdefault(record["client_node"], set()).add(record["client_pid"])
    # 48 distinct (host, tile) engines served ranks, from ONE process per node: each
    # node's Snakemake runs its share of the ranks as threads, no interpreter per rank
    assert sorted((h, t) for h, t, _ in engines_used) == sorted(
        (f"node{n}", str(t)) for n in range(1, 5) for t in range(12)
    )
    assert sorted(clients) == [f"node{n}" for n in range(1, 5)]
    assert all(len(pids) == 1 for pids in clients.values()), clients
    assert len(set().union(*clients.values())) == 4
    job_log = (work / "logs" / "pbs" / "r0-479.log").read_text()
    # two launcher calls in all: the engines, and the node Snakemakes
    assert launcher_calls(job_log) == [("48", "4")]
    assert re.findall(r"ranks: launcher call for (\d+) node Snakemake", job_log) == ["4"]
    # no line per rank from the node Snakemakes (480 ranks: 1,440 lines before)
    assert "steps (" not in job_log and "Finished jobid" not in job_log
    nodes = json.loads((work / "logs" / "pbs" / "r0-479.nodes.json").read_text())
    assert [len(share) for share in nodes["shares"]] == [120] * 4
    # 12 engines x 4 ranks in flight per node's Snakemake
    at = nodes["argv"].index("--force-use-threads")
    assert nodes["argv"][at:] == [
        "--force-use-threads", "--keep-going", "--cores", "48", "--scheduler", "greedy",
        "--max-jobs-per-timespan", "100000/1s", "--scheduler-subsample", "48",
        "--default-resources", "mem_mb=0", "disk_mb=0", "--quiet", "progress", "rules",
        "--mode", "remote",
    ]  # fmt: skip
    states = engine_states(work, submission["id"])
    assert len(states) == 48 and set(states.values()) == {"stopped"}, states
    # each engine listened on its host's loopback address only (the test cluster's
    # node<N> is 127.0.0.1<N>)
    for name, url in engine_urls(work, submission["id"]).items():
        host = name.split("-")[0]
        assert url.startswith(f"http://127.0.0.1{host[-1]}:"), (name, url)
    # the submission's key: in one 0600 file, in no log, record or registry entry
    key_file = work / "logs" / "pbs" / "r0-479.key"
    assert key_file.stat().st_mode & 0o777 == 0o600
    key = key_file.read_text().strip().encode()
    assert len(key) >= 32
    leaked = [
        path
        for folder in (work / "logs", work / "results")
        for path in folder.rglob("*")
        if path.is_file() and path != key_file and key in path.read_bytes()
    ]
    assert not leaked, leaked
    assert not processes_running(ECHO_SERVER)


@pytest.mark.pbs
@pytest.mark.vllm
def test_warm_vllm_engines_through_the_scheduler_on_node_local_model_copies(pbs_cluster, tmp_path):
    prompts = {i: [f"Rank {i} says hello", f"The capital of rank {i} is"] for i in range(12)}
    work = warm_folder(
        tmp_path,
        {f"{i}.in": "\n".join(lines) + "\n" for i, lines in prompts.items()},
        engine="vllm",
        # profiles/local/local.yaml's CPU settings
        vllm={"dtype": "bfloat16", "enforce_eager": True, "cpu_kv_cache_gib": 1},
        task_env={"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "OMP_NUM_THREADS": "1"},
        warm={"ranks_per_engine": 3, "ready_timeout_s": 600},
        tiles={"per_node": 2},
        pbs={"nodes_per_submission": 2},
        weights={"stage_dir": str(tmp_path / "node-local")},
    )
    # 2 nodes x 2 tiles: 4 vLLM servers for the 12 ranks of one submission.
    try:
        res = run_aurora(pbs_cluster, work)
    finally:
        delete_our_jobs(pbs_cluster, work)
    assert res.returncode == 0, output_of(res)
    (submission,) = submissions(work)
    assert (submission["name"], submission["nodes"]) == ("r0-11", "2")
    job_id = submission["id"]
    hosts = node_list(pbs_cluster, job_id)
    served = set()
    for rank, lines in prompts.items():
        records = wf.read_records(work / "results" / f"{rank}.out")
        assert [p for p, _ in records] == lines
        assert all(generated.strip() for _, generated in records), records
        record = json.loads((work / "results" / "records" / f"{rank}.json").read_text())
        assert (record["engine"], record["output_tokens"] > 0) == ("vllm", True)
        served.add(record["engine_name"])
        # each engine loaded its node's copy of the model
        engine_log = Path(record["engine_log"]).read_text()
        copy = tmp_path / "node-local" / f"model-{job_id}" / record["host"] / "tiny-opt"
        address = loopback_of(record["host"])
        assert f"--model {copy} --host {address}" in engine_log
    # All four were started by the one launcher call, each on its host with that
    # host's copy. Ranks start on the first engine ready, and these 12 short ranks may
    # all be done before the others are up (seen on a loaded machine: one was stopped
    # while it started), so which engines came up and served is timing; the spread
    # over engines is checked with 48 echo engines above.
    registry = work / "logs" / "engines" / job_id
    for host in hosts:
        copy = tmp_path / "node-local" / f"model-{job_id}" / host / "tiny-opt"
        for tile in range(2):
            engine_log = (registry / f"{host}-tile{tile}.log").read_text()
            address = loopback_of(host)
            assert f"--model {copy} --host {address} --port {30500 + tile}" in engine_log
    assert served and served <= {f"{h}/tile{t}" for h in hosts for t in range(2)}
    log = (work / "logs" / "pbs" / "r0-11.log").read_text()
    assert launcher_calls(log) == [("4", "2")]
    assert set(engine_states(work, job_id).values()) == {"stopped"}
    assert list((tmp_path / "node-local").iterdir()) == []
    # the versions rule fetch_model found, in every registry entry and record
    for entry in registry.glob("*.json"):
        assert json.loads(entry.read_text())["versions"]["vllm"] == installed_vllm()
    for rank in prompts:
        record = json.loads((work / "results" / "records" / f"{rank}.json").read_text())
        assert record["versions"]["vllm"] == installed_vllm()


# ------------------------------------------------- preflight: checked before engines start

PROBING_PYTHON = """#!/bin/sh
# Test stand-in for config `python`: the real interpreter, except that the nodes'
# preflight probe (`python -c ...`) imports the packages in {site} first, as a node
# whose modules differ from the login node's would.
if [ "$1" = "-c" ]; then export PYTHONPATH={site}; fi
exec {real} "$@"
"""


def probing_python(tmp_path: Path, vllm: str, xpu_devices: int | None = None) -> Path:
    """config `python` whose preflight sees vLLM ``vllm`` and ``xpu_devices`` XPU devices."""
    site = tmp_path / "node-site"
    (site / "vllm").mkdir(parents=True)
    (site / "vllm" / "__init__.py").write_text(f"__version__ = {vllm!r}\n")
    if xpu_devices is not None:
        (site / "torch").mkdir()
        (site / "torch" / "__init__.py").write_text(
            "class xpu:\n    is_available = staticmethod(lambda: True)\n"
            f"    device_count = staticmethod(lambda: {xpu_devices})\n"
        )
    path = tmp_path / "python"
    path.write_text(PROBING_PYTHON.format(site=site, real=sys.executable))
    path.chmod(0o755)
    return path


@functools.cache
def installed_vllm() -> str:
    """vllm.__version__ of this environment (imported elsewhere: a second of vLLM here)."""
    code = "import vllm; print(vllm.__version__)"
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300
    ).stdout.split()[-1]


def job_seconds(cluster: PbsCluster, job_id: str) -> float:
    """From the job's start to its end, as PBS recorded them."""
    info = cluster.wait_job(job_id, timeout=120)
    start, end = (
        time.mktime(time.strptime(info[k], "%a %b %d %H:%M:%S %Y")) for k in ("stime", "obittime")
    )
    return end - start


def preflight_run(cluster: PbsCluster, tmp_path: Path, **config):
    """Four warm vLLM ranks on 2 nodes x 2 tiles whose preflight fails: the run's
    result, its one submission and the submission's PBS log."""
    work = warm_folder(
        tmp_path,
        {f"{i}.in": f"rank {i} prompt\n" for i in range(4)},
        **wf.deep_merge(
            {
                "engine": "vllm",
                "vllm": {"dtype": "bfloat16", "enforce_eager": True, "cpu_kv_cache_gib": 1},
                "task_env": {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "OMP_NUM_THREADS": "1"},
                "tiles": {"per_node": 2},
                # one rank per engine: the 4 ranks take both nodes
                "warm": {"ranks_per_engine": 1},
                "pbs": {"nodes_per_submission": 2},
                "weights": {"stage_dir": str(tmp_path / "node-local")},
            },
            config,
        ),
    )
    try:
        res = run_aurora(cluster, work)
    finally:
        delete_our_jobs(cluster, work)
    assert res.returncode != 0, output_of(res)
    (submission,) = submissions(work)
    assert submission["nodes"] == "2"
    log = (work / "logs" / "pbs" / f"{submission['name']}.log").read_text()
    # no engine was started, no rank ran
    assert engine_states(work, submission["id"]) == {}
    assert "launcher call for" not in log and not list((work / "results").glob("*.out"))
    assert job_seconds(cluster, submission["id"]) < 60
    return res, submission, log


@pytest.mark.pbs
@pytest.mark.vllm
def test_preflight_too_little_room_for_the_model_ends_the_submission_naming_node(
    pbs_cluster, tmp_path
):
    small = tmp_path / "small-tmpfs"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(small)], check=True)
    try:
        res, submission, log = preflight_run(
            pbs_cluster, tmp_path, weights={"stage_dir": str(small)}
        )
    finally:
        subprocess.run(["umount", str(small)], check=True)
    cause = re.compile(
        rf"node (node\d): {re.escape(str(small))} has 16.0 MiB free, the model needs [\d.]+ MiB "
        r"\([\d.]+ MiB and a margin; config weights.stage_dir\)"
    )
    assert len(set(cause.findall(log))) == 2  # both nodes, in the PBS log
    terminal = res.stdout + res.stderr
    assert (
        f"Submission {submission['name']} (job {submission['id']}) ended before any engine"
        in terminal
    )
    assert cause.search(terminal)


@pytest.mark.pbs
def test_preflight_a_node_with_another_vllm_ends_the_submission(pbs_cluster, tmp_path):
    python = probing_python(tmp_path, vllm="0.15.0")
    res, submission, log = preflight_run(pbs_cluster, tmp_path, python=str(python))
    cause = (
        f"vLLM 0.15.0 here, but rule fetch_model checked the engines against vLLM "
        f"{installed_vllm()} (config python, pbs.setup)"
    )
    assert re.search(rf"preflight: node node\d: {re.escape(cause)}", log)
    assert re.search(rf"node node\d: {re.escape(cause)}", res.stdout + res.stderr)
    marker = json.loads(next((tmp_path / "run" / "results" / "model").glob("*.json")).read_text())
    assert marker["versions"]["vllm"] == installed_vllm()


@pytest.mark.pbs
def test_preflight_a_node_that_sees_too_few_tiles_ends_the_submission(pbs_cluster, tmp_path):
    python = probing_python(tmp_path, vllm=installed_vllm(), xpu_devices=1)
    res, submission, log = preflight_run(pbs_cluster, tmp_path, python=str(python))
    cause = re.compile(r"node (node\d): 1 of 2 tiles visible \(ZE_AFFINITY_MASK unset\)")
    assert len(set(cause.findall(log))) == 2
    assert cause.search(res.stdout + res.stderr)


@pytest.mark.pbs
def test_warm_walltime_kill_mid_submission_then_rerun_runs_only_the_unfinished_ranks(
    pbs_cluster, tmp_path
):
    pbs_cluster.add_queue("short", resources_max__walltime="01:00:00")
    ranks = {f"{i}.in": f"rank {i} prompt\n" for i in range(4)}
    # 2 engines, one rank at a time each, 70 s a request; walltime 2 min (no start
    # allowance, 2 ranks per engine x 1 min, no margin): 2 ranks end after ~70 s, PBS
    # kills the other 2 mid-request.
    config = {
        "tiles": {"per_node": 2},
        "warm": {"ranks_per_engine": 2, "start_minutes": 0, "ranks_in_flight": 1},
        "task_env": {"ECHO_SERVER_DELAY_S": "70"},
        "pbs": {
            "queue": "short",
            "nodes_per_submission": 1,
            "walltime_margin_minutes": 0,
            "resubmit": 0,
        },  # fmt: skip
    }
    work = warm_folder(tmp_path, ranks, **config)
    packing = ("--group-components", "node=4", "--cores", "4")
    results = work / "results"
    try:
        res = run_aurora(pbs_cluster, work, *packing)
        assert res.returncode != 0, output_of(res)
        (submission,) = submissions(work)
        assert (submission["name"], submission["walltime"]) == ("r0-3", "00:02:00")
        job = pbs_cluster.job(submission["id"])
        assert (job["job_state"], job["Exit_status"]) == ("F", -29), job
        done = sorted(int(p.stem) for p in results.glob("*.out"))
        assert len(done) == 2, done
        for rank in done:
            assert wf.read_records(results / f"{rank}.out") == [(f"rank {rank} prompt",) * 2]
        wait_for(lambda: not processes_running(ECHO_SERVER), "engines outlived the job", 15)

        no_delay = {"task_env": {"ECHO_SERVER_DELAY_S": "0"}}
        wf.write_config(work, wf.deep_merge(yaml_config(work), no_delay))
        plan = run_aurora(pbs_cluster, work, *packing, "--rerun-incomplete", "-n")
        left = sorted(set(range(4)) - set(done))
        assert wf.planned_ranks(plan.stdout + plan.stderr) == [str(r) for r in left]
        mtimes = {rank: (results / f"{rank}.out").stat().st_mtime_ns for rank in done}
        res = run_aurora(pbs_cluster, work, *packing, "--rerun-incomplete")
        assert res.returncode == 0, output_of(res)
        assert {rank: (results / f"{rank}.out").stat().st_mtime_ns for rank in done} == mtimes
        for rank in range(4):
            assert wf.read_records(results / f"{rank}.out") == [(f"rank {rank} prompt",) * 2]
    finally:
        delete_our_jobs(pbs_cluster, work)


PROGRESS = re.compile(
    r"^(?P<name>r[\w.-]+) (?P<id>\S+) (?P<phase>[A-Za-z ]+?)(?: [\d:]+)?"
    r"(?: \| engines (?:(?P<ready>\d+)/(?P<engines>\d+) ready|(?P<stopped>\d+)/\d+ stopped)[^|]*)?"
    r" \| ranks (?P<done>[\d,]+)/(?P<total>[\d,]+) done(?:, (?P<failed>[\d,]+) failed)?"
)


def progress_lines(text: str) -> list[dict]:
    """The progress lines pbs-status printed (scripts/reporting/progress.py), parsed."""
    found = []
    for line in text.splitlines():
        if match := PROGRESS.match(line):
            found.append({k: v.replace(",", "") if v else v for k, v in match.groupdict().items()})
    return found


@pytest.mark.pbs
def test_warm_submission_shows_progress_lines_that_grow_to_the_total(pbs_cluster, tmp_path):
    ranks = {f"{i}.in": f"rank {i} prompt a\nrank {i} prompt b\n" for i in range(48)}
    # 2 nodes x 4 echo engines, one rank at a time each, 1 s a request: 6 ranks per
    # engine, several status rounds while it runs
    config = {
        "tiles": {"per_node": 4},
        "warm": {"ranks_per_engine": 6, "ranks_in_flight": 1},
        "task_env": {"ECHO_SERVER_DELAY_S": "1"},
        "pbs": {"nodes_per_submission": 2},
    }
    work = warm_folder(tmp_path, ranks, **config)
    try:
        res = run_aurora(pbs_cluster, work, "--group-components", "node=48", "--cores", "48")
    finally:
        delete_our_jobs(pbs_cluster, work)
    assert res.returncode == 0, output_of(res)
    (submission,) = submissions(work)
    # what the terminal showed: Snakemake's stderr, where the status command's goes
    shown = [p for p in progress_lines(res.stderr) if p["id"] == submission["id"]]
    assert len(shown) >= 3, res.stderr[-4000:]
    assert {p["name"] for p in shown} == {"r0-47"} and {p["total"] for p in shown} == {"48"}
    done = [int(p["done"]) for p in shown]
    assert done == sorted(done) and done[-1] == 48, done
    assert any(0 < d < 48 for d in done), done  # seen while it ran
    assert shown[-1]["phase"] == "finished" and shown[-1]["failed"] is None
    assert shown[-1]["stopped"] == "8"  # the job script stopped its engines
    ready = [int(p["ready"]) for p in shown if p["ready"] is not None]
    assert {p["engines"] for p in shown if p["engines"]} == {"8"} and 8 in ready, shown
    # the same lines, with their times, in the progress log the README names
    logged = progress_lines(
        "\n".join(
            line.split(" ", 2)[2]
            for line in (work / "logs" / "progress.log").read_text().splitlines()
        )
    )
    assert logged == progress_lines(
        "\n".join(line for line in res.stderr.splitlines() if PROGRESS.match(line))
    )


def continued_run(cluster: PbsCluster, tmp_path: Path, ranks: dict, delay_s: int, jobs: int):
    """A warm run whose submission PBS kills at its walltime mid-request (2 engines,
    one rank at a time each, ``delay_s`` a request, no start or margin allowance),
    with pbs.resubmit 1. Returns the folder, the run's output, its exit code, and the
    ranks done (with their .out mtimes) when the continuation was submitted."""
    cluster.add_queue("short", resources_max__walltime="01:00:00")
    config = {
        "tiles": {"per_node": 2},
        "warm": {"ranks_per_engine": math.ceil(jobs / 2), "start_minutes": 0,
                 "ranks_in_flight": 1},
        "task_env": {"ECHO_SERVER_DELAY_S": str(delay_s)},
        "pbs": {"queue": "short", "nodes_per_submission": 1, "walltime_margin_minutes": 0,
                "resubmit": 1},
    }  # fmt: skip
    work = warm_folder(tmp_path, ranks, **config)
    results = work / "results"
    slots = 2 * math.ceil(jobs / 2)  # a submission: 2 engines x ranks_per_engine
    packing = ("--group-components", f"node={slots}", "--cores", str(slots))
    with aurora_in_background(cluster, work, *packing) as proc:
        wait_for(lambda: len(submissions(work)) == 2, "no continuation submitted", 600, proc)
        outputs = [*results.glob("*.out"), *results.glob("*.jsonl")]
        done = {int(p.stem): finished_rank(work, int(p.stem)) for p in outputs}
        killed = submissions(work)[0]["id"]
        ended = nothing_outlives(cluster, killed, work)
        out = proc.communicate(timeout=900)[0]
    assert files_of(work / "logs" / "engines" / safe_name(killed)) == ended
    return work, out, proc.returncode, done


def finished_rank(work: Path, rank: int) -> tuple:
    """What a rank that ran again would change: its output, its record's written_at and
    its log (Snakemake touches every output of a job that succeeded, so the outputs'
    modification times change at the run's end whether the rank ran again or not;
    it leaves an existing log alone)."""
    results = work / "results"
    record = json.loads(record_file(results, str(rank)).read_text())
    log = work / "logs" / "infer" / f"{rank}.log"
    return (
        output_file(results, work / "data", str(rank)).read_text(),
        record["written_at"],
        log.stat().st_mtime_ns,
    )


@pytest.mark.pbs
def test_warm_walltime_kill_mid_submission_is_continued_with_only_the_unfinished_ranks(
    pbs_cluster, tmp_path
):
    # three JSONL ranks: at least one is among the 2 done, and one among the 2 continued
    ranks = {"0.in": "rank 0 prompt\n"}
    ranks |= {f"{i}.jsonl": json.dumps({"prompt": f"rank {i} prompt"}) + "\n" for i in (1, 2, 3)}
    # walltime 2 min: 2 ranks end after ~70 s, PBS kills the other 2 mid-request
    work, out, code, done = continued_run(pbs_cluster, tmp_path, ranks, 70, 4)
    assert code == 0, out[-4000:]
    first, more = submissions(work)
    assert (first["name"], first["walltime"]) == ("r0-3", "00:02:00")
    job = pbs_cluster.job(first["id"])
    assert (job["job_state"], job["Exit_status"]) == ("F", -29), job
    assert len(done) == 2, done
    left = sorted(set(range(4)) - set(done))
    # one continuation of only the unfinished ranks, its walltime at the pace seen
    # (70 s a rank and engine: 2 min for one rank per engine)
    assert (more["name"], more["ranks"], more["walltime"]) == (
        "r0-3.c1",
        ",".join(map(str, left)),
        "00:02:00",
    )
    assert "submission r0-3 (job " in out and "killed by PBS: walltime exceeded" in out
    assert f"the 2 unfinished go on in r0-3.c1 (job {more['id']}" in out, out[-4000:]
    results = work / "results"
    assert {r: finished_rank(work, r) for r in done} == done  # not run again
    assert wf.read_records(results / "0.out") == [("rank 0 prompt",) * 2]
    for rank in (1, 2, 3):
        (answer,) = map(json.loads, (results / f"{rank}.jsonl").read_text().splitlines())
        assert (answer["id"], answer["text"]) == (1, f"rank {rank} prompt"), answer
    assert not list(results.glob("*.out.*")) and not list(results.glob("*.jsonl.*"))
    nodes = json.loads((work / "logs" / "pbs" / "r0-3.c1.nodes.json").read_text())
    assert sorted(r for share in nodes["shares"] for r in share) == left
    wait_for(lambda: not processes_running(ECHO_SERVER), "engines outlived the jobs", 15)


@pytest.mark.pbs
def test_a_rank_with_bad_input_is_not_continued_and_fails_alone_naming_its_line(
    pbs_cluster, tmp_path
):
    ranks = {f"{i}.in": f"rank {i} prompt\n" for i in range(4)}
    ranks["4.in"] = b"fine\n\xff\xfe broken\n"  # invalid UTF-8 on line 2
    # 2 engines, 3 ranks each at most, 100 s a request: walltime 3 min; 2 ranks end
    # after ~100 s, rank 4 fails at once, PBS kills the 2 in flight at 180 s
    work, out, code, done = continued_run(pbs_cluster, tmp_path, ranks, 100, 5)
    assert code != 0, out[-4000:]
    first, more = submissions(work)
    assert first["walltime"] == "00:03:00"
    assert len(done) == 2 and 4 not in done, done
    left = sorted(set(range(4)) - set(done))
    assert (more["name"], more["ranks"]) == ("r0-4.c1", ",".join(map(str, left)))
    assert "not run again, their input is at fault: rank 4 (logs/infer/4.log)" in out
    results = work / "results"
    assert {r: finished_rank(work, r) for r in done} == done  # not run again
    for rank in range(4):
        assert wf.read_records(results / f"{rank}.out") == [(f"rank {rank} prompt",) * 2]
    assert not (results / "4.out").exists()
    log = (work / "logs" / "infer" / "4.log").read_text()
    assert "4.in" in log and "line 2" in log, log
    # the run's end names it
    assert "rank 4: logs/infer/4.log" in out, out[-4000:]
    wait_for(lambda: not processes_running(ECHO_SERVER), "engines outlived the jobs", 15)


def echo_servers(work: Path) -> dict[str, int]:
    """name of the engine (host-tileN) -> pid of its running echo server, from the
    engine's registry entry and /proc."""
    found = {}
    for pid in processes_running(ECHO_SERVER):
        with contextlib.suppress(OSError):
            argv = (Path("/proc") / str(pid) / "cmdline").read_bytes().split(b"\0")
            address = argv[argv.index(b"--host") + 1].decode()
            port = int(argv[argv.index(b"--port") + 1])
            found[f"{host_of(address)}-tile{port - 30500}"] = pid
    return found


@pytest.mark.pbs
def test_warm_engine_killed_mid_submission_its_rank_is_retried_and_it_is_restarted(
    pbs_cluster, tmp_path
):
    ranks = {f"{i}.in": f"rank {i} prompt\n" for i in range(16)}
    config = {
        "tiles": {"per_node": 2},
        "warm": {"ranks_per_engine": 8, "ranks_in_flight": 1},
        "task_env": {"ECHO_SERVER_DELAY_S": "3"},
        "pbs": {"nodes_per_submission": 1},
    }
    work = warm_folder(tmp_path, ranks, **config)
    results = work / "results"
    with aurora_in_background(pbs_cluster, work) as proc:
        # both engines serve ranks; kill the tile-0 engine in the middle of a request
        wait_for(lambda: len(list(results.glob("*.out"))) >= 2, "no rank finished", proc=proc)
        victim = next(name for name in echo_servers(work) if name.endswith("-tile0"))
        # the engines require the submission's key
        (entry,) = (work / "logs" / "engines").glob(f"*/{victim}.json")
        ready = lambda: json.loads(entry.read_text())["state"] == "ready"  # noqa: E731
        wait_for(ready, "the victim never became ready", proc=proc)
        url = json.loads(entry.read_text())["url"]
        sampling = {"temperature": 0.8, "top_p": 0.95, "max_tokens": 16, "seed": None,
                    "ignore_eos": False}  # fmt: skip
        with pytest.raises(client.RequestRejected) as refused:
            client.complete(url, ["no key"], sampling, timeout=30)
        assert refused.value.status == 401
        time.sleep(1)
        os.kill(echo_servers(work)[victim], signal.SIGKILL)
        killed_at = time.time()
        output, _ = proc.communicate(timeout=300)
    # the rank in flight on the victim was sent again to the other engine: none failed
    assert proc.returncode == 0, output[-4000:]
    (key_file,) = (work / "logs" / "pbs").glob("*.key")
    assert key_file.stat().st_mode & 0o777 == 0o600
    key = key_file.read_text().strip()
    for path in [*(work / "logs").rglob("*"), *(work / "results").rglob("*")]:
        if path.is_file() and path != key_file:
            assert key not in path.read_text(errors="replace"), path
    assert sorted(int(p.stem) for p in results.glob("*.out")) == list(range(16))
    records = [json.loads(p.read_text()) for p in (results / "records").glob("*.json")]
    retried = [r for r in records if r["engine_deaths"]]
    # (served by the other engine, or by the victim once it was back)
    assert [r["engine_deaths"] for r in retried] == [[victim.replace("-", "/")]], records
    (submission,) = submissions(work)
    entry = work / "logs" / "engines" / submission["id"] / f"{victim}.json"
    state = json.loads(entry.read_text())
    assert (state["restarts"], state["state"]) == (1, "stopped")
    # the progress lines named it, with its log
    named = f"{victim} ready after 1 restart(s) ({state['log']})"
    assert any(named in line for line in output.splitlines() if PROGRESS.match(line)), output
    # the restarted engine served ranks again
    after = [
        r for r in records
        if r["engine_name"] == victim.replace("-", "/")
        and (results / f"{r['rank']}.out").stat().st_mtime > killed_at + 2
    ]  # fmt: skip
    assert after, records
    assert not processes_running(ECHO_SERVER)


@pytest.mark.pbs
def test_warm_engines_that_never_come_up_fail_the_ranks_naming_their_logs(pbs_cluster, tmp_path):
    ranks = {f"{i}.in": f"rank {i} prompt\n" for i in range(3)}
    # the echo server refuses to start: its delay setting is not a number
    config = {"tiles": {"per_node": 2}, "task_env": {"ECHO_SERVER_DELAY_S": "soon"}}
    work = warm_folder(tmp_path, ranks, pbs={"nodes_per_submission": 1}, **config)
    try:
        res = run_aurora(pbs_cluster, work)
    finally:
        delete_our_jobs(pbs_cluster, work)
    assert res.returncode != 0
    (submission,) = submissions(work)
    registry = work / "logs" / "engines" / submission["id"]
    assert set(engine_states(work, submission["id"]).values()) == {"failed"}
    for rank in range(3):
        log = (work / "logs" / "infer" / f"{rank}.log").read_text()
        assert "every engine of node node1 failed; engine logs:" in log, log
        assert str(registry / "node1-tile0.log") in log
        assert not (work / "results" / f"{rank}.out").exists()
    assert "could not convert string to float: 'soon'" in (registry / "node1-tile0.log").read_text()
    assert not processes_running(ECHO_SERVER)


@pytest.mark.pbs
def test_a_node_whose_engines_all_fail_fails_only_its_own_ranks(pbs_cluster, tmp_path):
    ranks = {f"{i}.in": f"rank {i} prompt\n" for i in range(16)}
    # 4 nodes x 2 engines; node2's engines exit at start
    config = {"tiles": {"per_node": 2}, "warm": {"ranks_per_engine": 2},
              "task_env": {"ECHO_SERVER_FAIL_HOSTS": "node2"}}  # fmt: skip
    work = warm_folder(tmp_path, ranks, pbs={"nodes_per_submission": 4}, **config)
    try:
        res = run_aurora(pbs_cluster, work)
    finally:
        delete_our_jobs(pbs_cluster, work)
    assert res.returncode != 0
    (submission,) = submissions(work)
    registry = work / "logs" / "engines" / submission["id"]
    states = engine_states(work, submission["id"])
    assert {n: s for n, s in states.items() if s == "failed"} == {
        "node2-tile0": "failed", "node2-tile1": "failed",
    }, states  # fmt: skip
    nodes = json.loads((work / "logs" / "pbs" / f"{submission['name']}.nodes.json").read_text())
    failed, done = [], []
    for rank in range(16):
        out = work / "results" / f"{rank}.out"
        if out.exists():
            record = json.loads((work / "results" / "records" / f"{rank}.json").read_text())
            assert record["client_node"] == record["host"] != "node2"
            done.append(rank)
        else:
            log = (work / "logs" / "infer" / f"{rank}.log").read_text()
            assert "every engine of node node2 failed; engine logs:" in log, log
            assert str(registry / "node2-tile0.log") in log
            failed.append(rank)
    # one node's share failed, the three others' finished
    assert len(failed) == 4 and sorted(failed) in [sorted(s) for s in nodes["shares"]]
    assert len(done) == 12
    job_log = (work / "logs" / "pbs" / f"{submission['name']}.log").read_text()
    assert re.search(r"node Snakemakes failed: \['node2: 1'\]", job_log), job_log[-3000:]
    # the node's Snakemake prints its failures (not its ranks' progress: node_argv)
    for rank in failed:
        assert f"rank {rank} failed: every engine of node node2 failed" in job_log
    assert not processes_running(ECHO_SERVER)


@pytest.mark.pbs
def test_warm_ctrl_c_leaves_no_submission_and_no_engine(pbs_cluster, tmp_path):
    ranks = {f"{i}.in": f"rank {i} prompt\n" for i in range(8)}
    config = {
        "tiles": {"per_node": 4},
        "task_env": {"ECHO_SERVER_DELAY_S": "600"},
        "pbs": {"nodes_per_submission": 1},
    }
    work = warm_folder(tmp_path, ranks, **config)
    with aurora_in_background(pbs_cluster, work) as proc:
        wait_for(lambda: len(echo_servers(work)) == 4, "the engines did not start", proc=proc)
        interrupt_and_check_nothing_is_left(pbs_cluster, proc, work)
    (job,) = submissions(work)
    ended = nothing_outlives(pbs_cluster, job["id"], work)  # the run's Ctrl-C: qdel
    wait_for(lambda: not processes_running(ECHO_SERVER), "engines outlived the job", 15)
    assert not list((work / "results").glob("*.out"))
    assert files_of(work / "logs" / "engines" / safe_name(job["id"])) == ended


def yaml_config(work: Path) -> dict:
    """The run folder's test-config.yaml (see aurora_folder)."""
    return wf.yaml.safe_load((work / "test-config.yaml").read_text())


def epoch_of_log_line(line: str) -> float:
    return time.mktime(time.strptime(line[:19], "%Y-%m-%d %H:%M:%S"))


@pytest.mark.pbs
def test_walltime_kill_is_noticed_and_rerun_incomplete_runs_only_the_killed_rank(
    pbs_cluster, tmp_path
):
    # A queue the provider does not know: Aurora's need walltimes of 5 minutes or more.
    pbs_cluster.add_queue("short", resources_max__walltime="01:00:00")
    ranks = {f"{i}.in": f"rank {i} prompt\n" for i in range(4)}
    config = {
        "runtime_minutes": 1,
        "tiles": {"per_node": 4},
        # resubmit 0: PBS's end of the submission fails it (no continuation)
        "pbs": {
            "queue": "short",
            "nodes_per_submission": 1,
            "walltime_margin_minutes": 0,
            "resubmit": 0,
        },  # fmt: skip
    }
    sleeper = python_wrapper(tmp_path / "python", sleep_ranks=[3])
    work = aurora_folder(tmp_path, ranks, python=str(sleeper), **config)
    packing = ("--group-components", "node=4", "--cores", "4")
    try:
        res = run_aurora(pbs_cluster, work, *packing)
        assert res.returncode != 0, output_of(res)
        (submission,) = submissions(work)
        assert (submission["name"], submission["walltime"]) == ("r0-3", "00:01:00")
        job = pbs_cluster.job(submission["id"])
        assert (job["job_state"], job["Exit_status"]) == ("F", -29), job
        # The status command's first "failed" answer, against PBS's end of the job
        # (mtime of the finished job): at most 2 polling intervals plus 2 s of slack.
        log = (work / ".snakemake" / "pbs" / "status.log").read_text().splitlines()
        noticed = next(line for line in log if "query for" in line and "failed" in line)
        ended = time.mktime(time.strptime(job["mtime"], "%a %b %d %H:%M:%S %Y"))
        assert -1 <= epoch_of_log_line(noticed) - ended <= 2 * INTERVAL + 2, (job["mtime"], noticed)
        assert "walltime exceeded" in "\n".join(log)
        results = work / "results"
        for rank in range(3):
            assert wf.read_records(results / f"{rank}.out") == [(f"rank {rank} prompt",) * 2]
        assert not (results / "3.out").exists()

        wf.write_config(work, wf.deep_merge(yaml_config(work), {"python": ""}))
        plan = run_aurora(pbs_cluster, work, *packing, "--rerun-incomplete", "-n")
        assert wf.planned_ranks(plan.stdout + plan.stderr) == ["3"], output_of(plan)
        mtimes = {rank: (results / f"{rank}.out").stat().st_mtime_ns for rank in range(3)}
        res = run_aurora(pbs_cluster, work, *packing, "--rerun-incomplete")
        assert res.returncode == 0, output_of(res)
        assert [s["name"] for s in submissions(work)] == ["r0-3", "r3"]
        assert {rank: (results / f"{rank}.out").stat().st_mtime_ns for rank in range(3)} == mtimes
        for rank in range(4):
            assert wf.read_records(results / f"{rank}.out") == [(f"rank {rank} prompt",) * 2]
    finally:
        delete_our_jobs(pbs_cluster, work)


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


def watchdogs(work: Path) -> list[int]:
    """The provider's watchdog processes of the run in ``work``."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if not entry.name.isdigit():
                continue
            cmdline = (entry / "cmdline").read_bytes().rstrip(b"\0").split(b"\0")
            if cmdline[-2:] == [b"pbs", b"watchdog"] and os.readlink(entry / "cwd") == str(work):
                pids.append(int(entry.name))
        except OSError:
            pass
    return pids


SLOW_COMMAND = """#!/bin/sh
# Test shim: the real {name}, made slow so that a Ctrl-C lands while it is under way.
# {when}
touch {marker}
trap '' INT
{body}
"""


def slow_command(folder: Path, name: str, marker: Path) -> Path:
    """A PATH folder whose ``name`` runs the real PBS command slowly (see SLOW_COMMAND).

    qsub: the real qsub first (the server has the job), then 4 s before its id is
    printed. qstat: 4 s before the real qstat runs. The real scheduler does the work.
    """
    folder.mkdir(exist_ok=True)
    real = f"/opt/pbs/bin/{name}"
    if name == "qsub":
        when = "the job is submitted at once; its id comes 4 s later"
        body = f'out=$({real} "$@") || exit $?\nsleep 4\necho "$out"'
    else:
        when = "4 s pass before the query runs"
        body = f'sleep 4\nexec {real} "$@"'
    path = folder / name
    path.write_text(SLOW_COMMAND.format(name=name, when=when, marker=marker, body=body))
    path.chmod(0o755)
    return folder


def wait_for(condition, what: str, timeout: float = 300, proc=None) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc is not None:
            assert proc.poll() is None, proc.stdout.read()[-4000:]
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def processes_of_job(job_id: str) -> list[int]:
    """Live processes whose environment says PBS_JOBID=``job_id`` (on any of the test
    cluster's hosts: they share this machine)."""
    wanted = f"PBS_JOBID={job_id}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if not entry.name.isdigit():
                continue
            ours = wanted in (entry / "environ").read_bytes().split(b"\0")
            if ours and (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                pids.append(int(entry.name))
        except OSError:
            pass
    return pids


def files_of(folder: Path) -> dict[str, int]:
    """Path -> modification time (ns) of every file under ``folder``."""
    return {str(p): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


def nothing_outlives(cluster: PbsCluster, job_id: str, work: Path) -> dict[str, int]:
    """Issue 29: once PBS has ended ``job_id``, no process of it is left within 30 s
    (engines, watchdogs, supervisors, node Snakemakes and their ranks, found by the
    job id in their environment). Returns the job's registry folder's files as they
    were at the job's end (they must not change after it)."""
    cluster.wait_job(job_id, timeout=300)
    ended = files_of(work / "logs" / "engines" / safe_name(job_id))
    wait_for(lambda: not processes_of_job(job_id), f"processes of job {job_id} outlived it", 30)
    return ended


def interrupt_and_check_nothing_is_left(cluster, proc, work, tasks=None) -> str:
    """Ctrl-C (SIGINT to the foreground process group, as a terminal sends it), then:
    Snakemake ends, no submission of the run is left in PBS, no task, no watchdog."""
    os.killpg(proc.pid, signal.SIGINT)
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode != 0, output[-4000:]
    ids = our_job_ids(work)
    assert ids, output[-4000:]
    # qdel may still be on its way when Snakemake ends; the watchdog looks every second
    assert not wait_gone(cluster, ids), output[-4000:]
    for job_id in ids:
        cluster.wait_job(job_id, timeout=30)
    if tasks is not None:
        wait_for(lambda: not processes_running(tasks), "the ranks' tasks survived", 15)
    wait_for(lambda: not watchdogs(work), "the watchdog outlived its run", 15)
    return output


@contextlib.contextmanager
def aurora_in_background(cluster: PbsCluster, work: Path, *args: str, **kwargs):
    """A ``snakemake --profile profiles/aurora`` run in a session of its own; killed,
    and its submissions deleted, if the test ends before it does."""
    proc = run_aurora(cluster, work, *args, popen=True, **kwargs)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        delete_our_jobs(cluster, work)


@pytest.mark.pbs
def test_ctrl_c_cancels_the_running_submission(pbs_cluster, tmp_path):
    notes = tmp_path / "notes"
    notes.mkdir()
    sleeper = python_wrapper(tmp_path / "python", notes=notes, sleep_ranks=[0, 1])
    work = aurora_folder(tmp_path, {"0.in": "a\n", "1.in": "b\n"}, python=str(sleeper))
    with aurora_in_background(pbs_cluster, work) as proc:
        wait_for(
            lambda: len(submissions(work)) == 1 and len(list(notes.iterdir())) == 2,
            "the ranks did not start",
            proc=proc,
        )
        (submission,) = submissions(work)
        assert pbs_cluster.job(submission["id"])["job_state"] == "R"
        assert processes_running(sleeper)
        interrupt_and_check_nothing_is_left(pbs_cluster, proc, work, tasks=sleeper)
        cancelled = (work / ".snakemake" / "pbs" / "cancel.log").read_text()
        assert f"qdel {submission['id']}" in cancelled


@pytest.mark.pbs
def test_ctrl_c_while_a_status_query_is_under_way_still_cancels(pbs_cluster, tmp_path):
    # cluster-generic 1.0.9 fails with "cannot access local variable 'ret'" and never
    # cancels when the status command dies of the terminal's SIGINT.
    marker = tmp_path / "qstat-started"
    shims = slow_command(tmp_path / "bin", "qstat", marker)
    sleeper = python_wrapper(tmp_path / "python", sleep_ranks=[0])
    work = aurora_folder(tmp_path, {"0.in": "a\n"}, python=str(sleeper))
    env = {"PATH": f"{shims}:{pbs_cluster.env['PATH']}"}
    with aurora_in_background(pbs_cluster, work, env=env) as proc:
        wait_for(marker.exists, "no status query started", proc=proc)
        interrupt_and_check_nothing_is_left(pbs_cluster, proc, work)


@pytest.mark.pbs
def test_ctrl_c_while_qsub_is_under_way_leaves_no_submission(pbs_cluster, tmp_path):
    # Snakemake submits from its main thread: on Ctrl-C it kills the submit command
    # 0.25 s later and never learns the id of a job the server already has.
    marker = tmp_path / "qsub-started"
    shims = slow_command(tmp_path / "bin", "qsub", marker)
    work = aurora_folder(tmp_path, {"0.in": "a\n"})
    env = {"PATH": f"{shims}:{pbs_cluster.env['PATH']}"}
    with aurora_in_background(pbs_cluster, work, env=env) as proc:
        wait_for(marker.exists, "qsub did not start", proc=proc)
        time.sleep(1)  # the server has the job now; its id is not printed yet
        output = interrupt_and_check_nothing_is_left(pbs_cluster, proc, work)
        assert "Submitted" not in output  # Snakemake never learned the id
        log = (work / ".snakemake" / "pbs" / "status.log").read_text()
        assert "watchdog: Snakemake" in log
        (job_id,) = set(our_job_ids(work))
        assert f"qdel {job_id}" in (work / ".snakemake" / "pbs" / "cancel.log").read_text()


@pytest.mark.pbs
def test_sigkill_of_snakemake_deletes_its_submissions(pbs_cluster, tmp_path):
    sleeper = python_wrapper(tmp_path / "python", sleep_ranks=[0])
    work = aurora_folder(tmp_path, {"0.in": "a\n"}, python=str(sleeper))
    with aurora_in_background(pbs_cluster, work) as proc:
        wait_for(lambda: len(submissions(work)) == 1, "nothing submitted", proc=proc)
        proc.kill()  # the main Snakemake only: no cancel of its own
        proc.wait()
        (submission,) = submissions(work)
        assert not wait_gone(pbs_cluster, [submission["id"]])
        wait_for(lambda: not watchdogs(work), "the watchdog outlived its run", 15)


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
