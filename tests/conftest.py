"""Shared pytest fixtures."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pbs_cluster import PbsCluster, pbs_processes

# The fixtures of the PBS runs (``commands``, ``run_owner_ends_with_the_test``) live
# beside their helpers.
pytest_plugins = ["pbs_runs"]

_REPO = Path(__file__).resolve().parent.parent
_INSTALL_OPENPBS = _REPO / "scripts" / "tools" / "install-openpbs.sh"
BUILD_MODEL = _REPO / "scripts" / "tools" / "build_model.py"
PYTHON = sys.executable

# Every process the tests start inherits this variable (engines, Snakemake, servers,
# the test cluster's daemons): what still carries it when the session ends outlived
# its test.
SESSION_MARK = "AURORA_TEST_SESSION"
LEFTOVER_GRACE_S = 30


def pytest_configure(config) -> None:
    os.environ[SESSION_MARK] = str(os.getpid())


def pytest_collection_modifyitems(config, items) -> None:
    """Every test that uses the test cluster is in the ``pbs`` tier, whether or not its
    module says so: ``pytest -m "not vllm and not pbs"`` must never start OpenPBS."""
    for item in items:
        if "pbs_cluster" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.pbs)


def session_processes(mark: str) -> dict[int, str]:
    """pid -> command line of the live processes (zombies aside) whose environment
    holds ``SESSION_MARK=mark``, this one aside."""
    wanted = f"{SESSION_MARK}={mark}".encode()
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if wanted not in (entry / "environ").read_bytes().split(b"\0"):
                continue
            argv = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # gone, or not ours to read
            continue
        if argv.strip():
            found[int(entry.name)] = argv.strip()
    return found


# Processes of the test cluster's jobs still alive when the cluster is stopped (found by
# PBS_JOBID=<id>.pbs-head in their environment: they do not carry the session's mark).
PBS_LEFTOVERS: dict[int, str] = {}


def job_processes() -> dict[int, str]:
    """pid -> what, of the live processes of the test cluster's jobs."""
    return {pid: what for pid, what in pbs_processes().items() if what.startswith("job: ")}


def pytest_sessionfinish(session, exitstatus) -> None:
    """Fail the run if anything a test started is still running once every test and
    fixture is done (after a grace period for processes that are ending); end those.
    Processes started through PBS are looked for when the cluster stops (pbs_cluster)."""
    mark = os.environ.get(SESSION_MARK)
    if not mark:
        return
    deadline = time.monotonic() + LEFTOVER_GRACE_S
    while (left := session_processes(mark)) and time.monotonic() < deadline:
        time.sleep(1)
    left = {**left, **PBS_LEFTOVERS}
    if not left:
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    lines = [f"\n{len(left)} process(es) started by the tests outlived them (now killed):"]
    lines += [f"  {pid}: {argv[:300]}" for pid, argv in sorted(left.items())]
    if reporter is not None:
        reporter.write_line("\n".join(lines), red=True)
    for pid in left:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    session.exitstatus = 1


@pytest.fixture(scope="session")
def pbs_cluster() -> Iterator[PbsCluster]:
    """A running OpenPBS 23.06 server ``pbs-head`` with hosts node1..node4, shared by
    the whole session (one per machine). Pass ``env=pbs_cluster.env`` to every qsub/
    qstat/qdel/qmgr/pbsnodes call (or use ``pbs_cluster.run``). Builds OpenPBS first
    (scripts/tools/install-openpbs.sh, minutes) if /opt/pbs is missing or stale. Fails
    (never skips) if it cannot be installed or started; stopping it checks that no
    PBS daemon, job process or datastore process is left."""
    check = subprocess.run(
        ["bash", str(_INSTALL_OPENPBS), "--check"], capture_output=True, text=True, timeout=60
    )
    if check.returncode != 0 or not Path("/opt/pbs/bin/qsub").exists():
        res = subprocess.run(
            ["bash", str(_INSTALL_OPENPBS)], capture_output=True, text=True, timeout=3600
        )
        if res.returncode != 0:
            pytest.fail(
                f"{_INSTALL_OPENPBS} failed (exit {res.returncode}):\n"
                f"{res.stdout[-3000:]}\n{res.stderr[-3000:]}",
                pytrace=False,
            )
    cluster = PbsCluster()
    try:
        cluster.start()
    except Exception as exc:  # any start failure is a test failure, never a skip
        pytest.fail(f"could not start the test PBS cluster: {exc}", pytrace=False)
    try:
        yield cluster
    finally:
        # Every test is done: no job of the cluster should have a process left.
        deadline = time.monotonic() + LEFTOVER_GRACE_S
        while (jobs := job_processes()) and time.monotonic() < deadline:
            time.sleep(1)
        PBS_LEFTOVERS.update(jobs)
        cluster.stop()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """The tiny OPT model in a scratch folder, built by scripts/tools/build_model.py
    (idempotently): tests/test_infer.py and test_infer_vllm.py."""
    dest = tmp_path_factory.mktemp("models") / "tiny-opt"
    for attempt in ("built", "exists, left alone"):
        res = subprocess.run(
            [PYTHON, str(BUILD_MODEL), "tiny", str(dest)],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert res.returncode == 0, res.stderr[-3000:]
        assert attempt in res.stderr
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (dest / name).is_file(), name
    assert not [p for p in dest.parent.iterdir() if p.name != "tiny-opt"], "temp folder left"
    return dest
