"""The OpenPBS test cluster (tests/pbs_cluster.py) answers like the recorded real server.

Recorded answers: ../shared/notes/openpbs-recorded/ (OpenPBS 23.06, commit cd7ab5eda).
Jobs are seconds long; every test leaves no unfinished job behind.
"""

from __future__ import annotations

import json
import os
import re
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pbs_cluster import PbsCluster, mom_port

SUBMIT_4 = "select=4,walltime=00:05:00,filesystems=home:flare,place=scatter"


@pytest.fixture
def pbs(pbs_cluster: PbsCluster) -> Iterator[PbsCluster]:
    """The session cluster; afterwards no job of the test is left unfinished."""
    yield pbs_cluster
    pbs_cluster.delete_all_jobs()
    assert pbs_cluster.jobs_in_queue() == []


def script(folder: Path, body: str, name: str = "job.sh") -> Path:
    path = folder / name
    path.write_text("#!/bin/bash\n" + textwrap.dedent(body))
    path.chmod(0o755)
    return path


def wait_file(path: Path, timeout: float = 30) -> None:
    """Wait until a job script wrote ``path`` (it is past its login shell's start-up:
    killing a job shell during ``pyenv rehash`` in root's ~/.bashrc leaves a lock)."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} not written in {timeout}s"
        time.sleep(0.1)


def qsub(pbs: PbsCluster, *args: str | Path, cwd: Path | None = None) -> str:
    res = pbs.run(["qsub", *map(str, args)], cwd=cwd)
    assert res.returncode == 0, res.stderr
    job_id = res.stdout.strip()
    assert re.fullmatch(r"\d+\.pbs-head", job_id), job_id
    return job_id


def test_hosts_are_free_and_clients_find_the_server(pbs: PbsCluster) -> None:
    assert pbs.hosts == ["node1", "node2", "node3", "node4"]
    nodes = pbs.nodes()
    assert {h: nodes[h]["state"] for h in pbs.hosts} == dict.fromkeys(pbs.hosts, "free")
    assert pbs.env["PATH"].split(os.pathsep)[:2] == ["/opt/pbs/bin", "/opt/pbs/sbin"]
    assert pbs.env["PBS_CONF_FILE"] == "/etc/pbs.conf"
    assert pbs.env["PBS_SERVER"] == "pbs-head"
    queues = pbs.run(["qstat", "-Q"]).stdout
    for name in ("debug", "debug-scaling", "capacity", "prod"):
        assert re.search(rf"^{re.escape(name)}\s+\d+\s+\d+\s+yes\s+yes", queues, re.M), queues


def test_capacity_job_runs_on_four_hosts(pbs: PbsCluster, tmp_path: Path) -> None:
    """The provider's submission line; pbs_tmrsh reaches every host of the job."""
    work = tmp_path / "run"
    work.mkdir()
    log = work / "out.log"
    job = script(
        work,
        """\
        echo "main pwd=$PWD home=$HOME tmpdir=$TMPDIR momport=$PBS_MOMPORT"
        cd "$PBS_O_WORKDIR"
        cp "$PBS_NODEFILE" nodefile
        for host in $(sort -u "$PBS_NODEFILE"); do
            task='echo "task momport=$PBS_MOMPORT nodenum=$PBS_NODENUM pwd=$(pwd)"'
            captured=$(pbs_tmrsh "$host" /bin/sh -c "$task; echo task-err >&2")
            echo "host=$host rc=$? captured=[$captured]"
        done
        pbs_tmrsh node2 /bin/sh -c 'exit 7'
        echo "exit7 rc=$?"
        """,
    )
    job_id = qsub(
        pbs,
        "-A",
        "P",
        "-q",
        "capacity",
        "-l",
        SUBMIT_4,
        "-N",
        "t",
        "-j",
        "oe",
        "-o",
        log,
        job,
        cwd=work,
    )
    info = pbs.wait_job(job_id, timeout=60)
    assert (info["job_state"], info["Exit_status"], info["substate"]) == ("F", 0, 92)
    assert info["exec_host"] == "node1/0+node2/0+node3/0+node4/0"
    assert info["comment"].endswith("and finished")
    assert info["Resource_List"]["filesystems"] == "home:flare"
    assert info["Variable_List"]["PBS_O_WORKDIR"] == str(work)

    assert (work / "nodefile").read_text().split() == pbs.hosts
    out = log.read_text()
    home = os.path.expanduser("~root")
    # The job starts in $HOME (not the submit folder); TMPDIR is per job.
    assert f"main pwd={home} home={home} tmpdir=/var/tmp/pbs.{job_id} " in out
    assert f"momport={mom_port(1) + 1}" in out  # mother superior: node1's mom
    for index, host in enumerate(pbs.hosts, 1):
        # Ran by that host's mom, in $HOME, exit code returned, and its output went to
        # the job's output file, not to the caller (captured is empty).
        assert f"host={host} rc=0 captured=[]" in out
        assert f"task momport={mom_port(index) + 1} nodenum={index - 1} pwd={home}\n" in out
    assert out.count("task-err") == 4
    assert "exit7 rc=7" in out


def test_failing_job_script_exit_status(pbs: PbsCluster, tmp_path: Path) -> None:
    job = script(tmp_path, "echo going to fail\nexit 1\n")
    job_id = qsub(
        pbs,
        "-q",
        "debug",
        "-l",
        "select=1,walltime=00:01:00",
        "-j",
        "oe",
        "-o",
        tmp_path / "out.log",
        job,
    )
    info = pbs.wait_job(job_id, timeout=60)
    assert (info["job_state"], info["Exit_status"]) == ("F", 1)
    assert info["comment"].endswith("and failed")
    assert "going to fail" in (tmp_path / "out.log").read_text()


def test_qdel_of_running_job_reads_exit_0_substate_91(pbs: PbsCluster, tmp_path: Path) -> None:
    job = script(tmp_path, f"touch {tmp_path}/started\nsleep 120\n")
    job_id = qsub(
        pbs,
        "-q",
        "debug",
        "-l",
        "select=1,walltime=00:05:00",
        "-j",
        "oe",
        "-o",
        tmp_path / "out.log",
        job,
    )
    pbs.wait_job(job_id, timeout=30, states=["R"])
    wait_file(tmp_path / "started")
    res = pbs.run(["qdel", job_id])
    assert res.returncode == 0, res.stderr
    info = pbs.wait_job(job_id, timeout=30)
    # As recorded: read by Exit_status alone a deleted job looks like success.
    assert (info["job_state"], info["Exit_status"], info["substate"]) == ("F", 0, 91)
    assert "terminated" in info["comment"]


def test_walltime_kill_exit_status_minus_29(pbs: PbsCluster, tmp_path: Path) -> None:
    job = script(tmp_path, "sleep 120\n")
    job_id = qsub(
        pbs,
        "-q",
        "capacity",
        "-l",
        "select=1,walltime=00:00:05",
        "-j",
        "oe",
        "-o",
        tmp_path / "out.log",
        job,
    )
    info = pbs.wait_job(job_id, timeout=40)  # not the job's 120 s: the 5 s walltime ended it
    assert (info["job_state"], info["Exit_status"], info["substate"]) == ("F", -29, 93)
    assert "exceeded resource walltime" in info["comment"]


def test_prod_refuses_four_host_job(pbs: PbsCluster, tmp_path: Path) -> None:
    job = script(tmp_path, "true\n")
    res = pbs.run(["qsub", "-q", "prod", "-l", "select=4,walltime=00:01:00", str(job)])
    assert res.returncode == 188
    assert res.stderr.strip() == "qsub: Job violates queue and/or server resource limits"
    assert pbs.jobs_in_queue("prod") == []


def test_sixth_queued_job_in_capacity_is_refused(pbs: PbsCluster, tmp_path: Path) -> None:
    job = script(tmp_path, "true\n")
    args = ["-q", "capacity", "-h", "-l", "select=1,walltime=00:01:00", job]
    ids = [qsub(pbs, *args) for _ in range(5)]
    res = pbs.run(["qsub", *map(str, args)])
    assert res.returncode == 38
    assert res.stderr.strip() == "qsub: would exceed queue generic's per-user limit"
    assert sorted(pbs.jobs_in_queue("capacity")) == sorted(ids)


def test_capacity_runs_two_per_user(pbs: PbsCluster, tmp_path: Path) -> None:
    job = script(tmp_path, f"touch {tmp_path}/started.$PBS_JOBID\nsleep 60\n")
    args = [
        "-q",
        "capacity",
        "-l",
        "select=1,walltime=00:05:00",
        "-j",
        "oe",
        "-o",
        tmp_path / "out.log",
        job,
    ]
    first, second, third = (qsub(pbs, *args) for _ in range(3))
    pbs.wait_job(first, timeout=30, states=["R"])
    pbs.wait_job(second, timeout=30, states=["R"])
    info = pbs.wait_job(third, timeout=30, states=["Q"])
    deadline = time.monotonic() + 15
    while "running job limit" not in info.get("comment", ""):
        assert time.monotonic() < deadline, info.get("comment")
        time.sleep(0.5)
        info = pbs.job(third) or {}
    assert info["comment"] == "Not Running: User has reached queue capacity running job limit."
    for job_id in (first, second):
        wait_file(tmp_path / f"started.{job_id}")


def test_held_job(pbs: PbsCluster, tmp_path: Path) -> None:
    job = script(tmp_path, "true\n")
    job_id = qsub(pbs, "-q", "debug", "-h", "-l", "select=1,walltime=00:01:00", job)
    info = pbs.wait_job(job_id, timeout=10, states=["H"])
    assert info["Hold_Types"] == "u"
    assert pbs.run(["qhold", "-h", "s", job_id]).returncode == 0
    info = pbs.job(job_id)
    assert info is not None
    assert info["job_state"] == "H"
    assert "s" in info["Hold_Types"]
    assert info["Hold_Types"] == "su"  # as recorded


def test_multi_id_json_lists_only_the_first(pbs: PbsCluster, tmp_path: Path) -> None:
    """openpbs issue 2672: ``qstat -x -f -F json A B`` answers for A only (exit 0);
    the text form lists both. Hence PbsCluster.job takes one id."""
    job = script(tmp_path, "true\n")
    args = [
        "-q",
        "capacity",
        "-l",
        "select=1,walltime=00:01:00",
        "-j",
        "oe",
        "-o",
        tmp_path / "out.log",
        job,
    ]
    a, b = qsub(pbs, *args), qsub(pbs, *args)
    for job_id in (a, b):
        pbs.wait_job(job_id, timeout=60)
    res = pbs.run(["qstat", "-x", "-f", "-F", "json", a, b])
    assert res.returncode == 0, res.stderr
    assert list(json.loads(res.stdout)["Jobs"]) == [a]
    text = pbs.run(["qstat", "-x", "-f", a, b])
    assert text.returncode == 0, text.stderr
    assert re.findall(r"^Job Id: (\S+)", text.stdout, re.M) == [a, b]


def test_unknown_job_id(pbs: PbsCluster) -> None:
    res = pbs.run(["qstat", "-x", "-f", "-F", "json", "99999.pbs-head"])
    assert res.returncode == 153
    assert res.stderr.strip() == "qstat: Unknown Job Id 99999.pbs-head"
    assert '"Jobs"' not in res.stdout and '"pbs_server"' in res.stdout
    assert pbs.job("99999.pbs-head") is None


def test_add_queue_is_idempotent_and_enforced(pbs: PbsCluster, tmp_path: Path) -> None:
    pbs.add_queue("short", resources_max__walltime="00:00:30", resources_max__nodect=2)
    pbs.add_queue("short", resources_max__walltime="00:00:30", resources_max__nodect=2)
    job = script(tmp_path, "true\n")
    too_long = pbs.run(["qsub", "-q", "short", "-l", "select=1,walltime=00:01:00", str(job)])
    assert too_long.returncode == 188, too_long.stderr
    too_wide = pbs.run(["qsub", "-q", "short", "-l", "select=3,walltime=00:00:10", str(job)])
    assert too_wide.returncode == 188, too_wide.stderr
    job_id = qsub(
        pbs,
        "-q",
        "short",
        "-l",
        "select=2,walltime=00:00:10",
        "-j",
        "oe",
        "-o",
        tmp_path / "out.log",
        job,
    )
    assert pbs.wait_job(job_id, timeout=60)["Exit_status"] == 0
