"""What the tests of the Aurora profile against the real PBS server share.

The ``pbs`` tests (tests/test_aurora_commands.py, test_aurora_runs.py,
test_aurora_failures.py) run profiles/aurora's pbs-submit, pbs-status and pbs-cancel
exactly as Snakemake's cluster-generic executor does (submit and status through a
shell, cancel without one), and whole ``snakemake --profile profiles/aurora`` runs,
against OpenPBS 23.06 with four execution hosts (tests/pbs_cluster.py). Commands on
the hosts of a submission start with PBS's own launcher, ``pbs_tmrsh <host>`` (which,
unlike Aurora's ``mpiexec``, starts them in $HOME and sends their output to the job's
output file); the model is copied to every node with ``pbsdsh``.

Here: the run folders and their config (``aurora_folder``, ``warm_folder``), the runs
(``run_aurora``, ``aurora_in_background``, ``continued_run``), what a run left
(``submissions``, registry entries, progress lines, processes), and the fixtures
``commands`` and ``run_owner_ends_with_the_test`` (tests/conftest.py registers this
module as a plugin, so every test module sees them).
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
import urllib.request
from pathlib import Path

import pytest

import pbs
import workflow as wf
from formats.files import safe_name
from formats.settings import from_config
from pbs_cluster import PbsCluster, clear_stale_pyenv_lock
from rank.layout import output_file, record_file

REPO = Path(__file__).resolve().parents[1]
PROFILE = REPO / "profiles" / "aurora"
TMRSH = ["/opt/pbs/bin/pbs_tmrsh", "{host}"]
PBSDSH = ["/opt/pbs/bin/pbsdsh", "--"]
INTERVAL = 2  # pbs.status_interval and --seconds-between-status-checks in these tests


# (stand-in for the main Snakemake, its run's state folder) of the running test
_RUN_OWNERS: list[tuple[subprocess.Popen, Path]] = []


# --------------------------------- the profile's commands, run as Snakemake runs them


def provider_settings(work: Path, **changes) -> dict:
    config = wf.yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    # The commands run here as Snakemake would run them; a process of the test's own
    # stands in for the main Snakemake, so the run's watchdog ends with the test.
    owner = subprocess.Popen(["sleep", "3600"])
    _RUN_OWNERS.append((owner, work / ".snakemake" / "pbs"))
    conf = pbs.provider_settings(from_config(config), owner_pid=owner.pid)
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


# --------------------------------------------------- whole runs through the scheduler

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
        "weights": {"shared_hf_home": "", "stage": True, "broadcast_host": "{host}"},
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
    group = pbs.expected_group_size(pbs.provider_settings(from_config(run_config(work))))
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


# ------------------------------------------------------- warm engines in a submission

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


# -------------------------------------------------------------------------- preflight

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


# ------------------------------------------- walltime kills, reruns and continuations


def short_queue(cluster: PbsCluster, resubmit: int) -> dict:
    """pbs settings of a run PBS kills at its walltime: a queue the provider does not
    know (Aurora's need walltimes of 5 minutes or more), one node a submission, no
    margin; ``resubmit`` 0: PBS's end of the submission fails it, 1: one continuation."""
    cluster.add_queue("short", resources_max__walltime="01:00:00")
    return {"queue": "short", "nodes_per_submission": 1, "walltime_margin_minutes": 0,
            "resubmit": resubmit}  # fmt: skip


def warm_kill_config(
    cluster: PbsCluster, ranks: int, engines: int, delay_s: int, resubmit: int
) -> tuple[dict, tuple[str, ...]]:
    """Config and packing of a warm run whose submission PBS kills at its walltime
    mid-request: ``engines`` engines on one node, one rank at a time each, ``delay_s`` a
    request, no start allowance (walltime: ranks per engine x 1 min)."""
    per_engine = math.ceil(ranks / engines)
    config = {
        "tiles": {"per_node": engines},
        "warm": {"ranks_per_engine": per_engine, "start_minutes": 0, "ranks_in_flight": 1},
        "task_env": {"ECHO_SERVER_DELAY_S": str(delay_s)},
        "pbs": short_queue(cluster, resubmit),
    }
    slots = engines * per_engine  # a submission: engines x ranks_per_engine
    return config, ("--group-components", f"node={slots}", "--cores", str(slots))


def killed_at_walltime(cluster: PbsCluster, submission: dict, name: str, walltime: str) -> dict:
    """Check that PBS ended ``submission`` at its walltime; its job's attributes."""
    assert (submission["name"], submission["walltime"]) == (name, walltime), submission
    job = cluster.job(submission["id"])
    assert (job["job_state"], job["Exit_status"]) == ("F", -29), job
    return job


def cut_walltime(cluster: PbsCluster, job_id: str) -> None:
    """Lower a running job's walltime to what it has used (+3 s): PBS ends it at its
    walltime within seconds, as it would at the walltime the run asked for (a test then
    waits seconds, not the minutes a requested walltime takes; the submission keeps the
    walltime the run asked for in logs/pbs/submissions.tsv)."""
    used = cluster.job(job_id).get("resources_used", {}).get("walltime", "00:00:00")
    hours, minutes, seconds = map(int, used.split(":"))
    limit = hours * 3600 + minutes * 60 + seconds + 3
    walltime = f"{limit // 3600:02d}:{limit // 60 % 60:02d}:{limit % 60:02d}"
    res = cluster.run(["qalter", "-l", f"walltime={walltime}", job_id])
    assert res.returncode == 0, res.stderr


def requests_running(url: str) -> float:
    """vllm:num_requests_running of an echo engine (its /metrics needs no key)."""
    direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with direct.open(f"{url}/metrics", timeout=5) as answer:
        text = answer.read().decode()
    return float(re.search(r"^vllm:num_requests_running\S* (\S+)$", text, re.M).group(1))


def mid_request(work: Path, done: int, in_flight: int) -> bool:
    """At least ``done`` ranks of the run's first submission are done, and its echo
    engines hold ``in_flight`` requests."""
    results = work / "results"
    if len([*results.glob("*.out"), *results.glob("*.jsonl")]) < done or not submissions(work):
        return False
    try:  # (an engine's entry or server may not be up yet)
        urls = engine_urls(work, submissions(work)[0]["id"]).values()
        return sum(requests_running(url) for url in urls) == in_flight
    except (OSError, KeyError, ValueError):
        return False


def rerun_incomplete(
    cluster: PbsCluster, work: Path, packing, done, left, changes: dict
) -> subprocess.CompletedProcess:
    """``--rerun-incomplete`` after a kill, with ``changes`` to the run's config: its dry
    run plans only the ``left`` ranks, and the run succeeds without writing the ``done``
    ranks' outputs again."""
    wf.write_config(work, wf.deep_merge(yaml_config(work), changes))
    plan = run_aurora(cluster, work, *packing, "--rerun-incomplete", "-n")
    assert wf.planned_ranks(plan.stdout + plan.stderr) == [str(r) for r in left], output_of(plan)
    results = work / "results"
    mtimes = {rank: (results / f"{rank}.out").stat().st_mtime_ns for rank in done}
    res = run_aurora(cluster, work, *packing, "--rerun-incomplete")
    assert res.returncode == 0, output_of(res)
    assert {rank: (results / f"{rank}.out").stat().st_mtime_ns for rank in done} == mtimes
    return res


def continued_run(
    cluster: PbsCluster, tmp_path: Path, ranks: dict, delay_s: int, engines: int, in_flight: int
):
    """A warm run whose submission PBS ends at its walltime mid-request
    (``warm_kill_config``), with pbs.resubmit 1: once ``engines`` ranks are done and
    ``in_flight`` requests are under way, the job's walltime is cut to what it has used
    (``cut_walltime``). Returns the folder, the run's output, its exit code, and the
    ranks done (what a run again would change of each) when the continuation was
    submitted."""
    config, packing = warm_kill_config(cluster, len(ranks), engines, delay_s, resubmit=1)
    work = warm_folder(tmp_path, ranks, **config)
    results = work / "results"

    with aurora_in_background(cluster, work, *packing) as proc:
        busy = functools.partial(mid_request, work, engines, in_flight)
        wait_for(busy, "the last ranks were not sent", 600, proc)
        cut_walltime(cluster, submissions(work)[0]["id"])
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


def yaml_config(work: Path) -> dict:
    """The run folder's test-config.yaml (see aurora_folder)."""
    return wf.yaml.safe_load((work / "test-config.yaml").read_text())


def epoch_of_log_line(line: str) -> float:
    return time.mktime(time.strptime(line[:19], "%Y-%m-%d %H:%M:%S"))


# ------------------------------------------------- processes left, Ctrl-C and SIGKILL


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


def node_snakemakes() -> dict[str, int]:
    """host -> pid of its running node Snakemake (pbs/node.py ranks-node starts it under a
    watchdog with AURORA_NODE=<host> in its environment), on the test cluster's hosts."""
    found = {}
    for entry in Path("/proc").iterdir():
        try:
            if not entry.name.isdigit():
                continue
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            if b"snakemake" not in argv or b"-m" not in argv:
                continue
            for var in (entry / "environ").read_bytes().split(b"\0"):
                if var.startswith(b"AURORA_NODE="):
                    found[var.removeprefix(b"AURORA_NODE=").decode()] = int(entry.name)
        except OSError:
            pass
    return found


def files_of(folder: Path) -> dict[str, int]:
    """Path -> modification time (ns) of every file under ``folder``."""
    return {str(p): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


def nothing_outlives(cluster: PbsCluster, job_id: str, work: Path) -> dict[str, int]:
    """Once PBS has ended ``job_id``, no process of it is left within 30 s (engines,
    watchdogs, supervisors, node Snakemakes and their ranks, found by the job id in
    their environment). Returns the job's registry folder's files as they were at the
    job's end (they must not change after it)."""
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
