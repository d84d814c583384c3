"""Shared pytest fixtures."""

from __future__ import annotations

# ----------------------------------------------------------------------------------
# BEGIN slurm_cluster fixture (owner: tests/slurm_cluster.py; keep this block whole)
# ----------------------------------------------------------------------------------
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from slurm_cluster import SlurmCluster, which

_REPO = Path(__file__).resolve().parent.parent
_INSTALL_SCHEDULER = _REPO / "scripts" / "install-test-scheduler.sh"


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[SlurmCluster]:
    """A running 4-node Slurm cluster (node1..node4) with PBS wrappers, shared by
    the whole session. Pass ``env=slurm_cluster.env`` to every qsub/qstat/qdel/
    scontrol/squeue/srun call. Fails (never skips) if it cannot be started."""
    if which("slurmctld") is None or which("slurmd") is None or which("qsub") is None:
        res = subprocess.run(
            ["bash", str(_INSTALL_SCHEDULER)], capture_output=True, text=True, timeout=900
        )
        if res.returncode != 0:
            pytest.fail(
                f"{_INSTALL_SCHEDULER} failed (exit {res.returncode}):\n"
                f"{res.stdout[-3000:]}\n{res.stderr[-3000:]}",
                pytrace=False,
            )
    cluster = SlurmCluster(nodes=4)
    try:
        cluster.start()
    except Exception as exc:  # any start failure is a test failure, never a skip
        pytest.fail(f"could not start the test Slurm cluster: {exc}", pytrace=False)
    try:
        yield cluster
    finally:
        cluster.stop()


# ----------------------------------------------------------------------------------
# END slurm_cluster fixture
# ----------------------------------------------------------------------------------


# ----------------------------------------------------------------------------------
# BEGIN pbs_cluster fixture (owner: tests/pbs_cluster.py; keep this block whole)
# ----------------------------------------------------------------------------------
from pbs_cluster import PbsCluster  # noqa: E402

_INSTALL_OPENPBS = _REPO / "scripts" / "install-openpbs.sh"


@pytest.fixture(scope="session")
def pbs_cluster() -> Iterator[PbsCluster]:
    """A running OpenPBS 23.06 server ``pbs-head`` with hosts node1..node4, shared by
    the whole session (one per machine). Pass ``env=pbs_cluster.env`` to every qsub/
    qstat/qdel/qmgr/pbsnodes call (or use ``pbs_cluster.run``). Builds OpenPBS first
    (scripts/install-openpbs.sh, minutes) if /opt/pbs is missing or stale. Fails
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
        cluster.stop()


# ----------------------------------------------------------------------------------
# END pbs_cluster fixture
# ----------------------------------------------------------------------------------
