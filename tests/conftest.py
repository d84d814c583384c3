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
