"""Shared pytest fixtures."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from pbs_cluster import PbsCluster

_REPO = Path(__file__).resolve().parent.parent
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
