"""The test scheduler itself: a real Slurm cluster driven through its PBS commands.

These check what the pipeline's Aurora profile relies on: qsub with PBS options,
PBS_* variables and PBS_NODEFILE in the batch script, srun steps on a chosen node,
12 concurrent steps per node, submit-time rejection, qdel and walltime kills.
One cluster (session fixture) serves all tests; the walltime job is submitted
first (module fixture) so its ~1-1.5 minute wait overlaps the other tests.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from slurm_cluster import SlurmCluster, parse_scontrol_record

pytestmark = pytest.mark.slurm


def write_script(path: Path, body: str) -> Path:
    path.write_text("#!/bin/bash\nset -u\n" + body + "\n")
    path.chmod(0o755)
    return path


def qsub(cluster: SlurmCluster, args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return cluster.run(["qsub", *args], cwd=cwd)


def submit(cluster: SlurmCluster, args: list[str], cwd: Path) -> str:
    res = qsub(cluster, args, cwd)
    assert res.returncode == 0, f"qsub failed: {res.stdout}{res.stderr}"
    job_id = res.stdout.strip()
    assert re.fullmatch(r"\d+", job_id), f"qsub printed {res.stdout!r}"
    return job_id


@pytest.fixture(scope="module")
def walltime_job(
    slurm_cluster: SlurmCluster, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, float]]:
    """A job with a 1-minute walltime that would sleep 10 minutes."""
    work = tmp_path_factory.mktemp("walltime")
    script = write_script(work / "sleepy.sh", "echo $$ > sleepy.pid\nexec sleep 600")
    job_id = submit(
        slurm_cluster,
        ["-q", "debug", "-l", "select=1,walltime=00:01:00", "-N", "sleepy", "-j", "oe",
         "-o", str(work / "sleepy.out"), str(script)],
        work,
    )  # fmt: skip
    yield job_id, time.monotonic()


@pytest.fixture(autouse=True)
def _submit_walltime_job_first(walltime_job: tuple[str, float]) -> None:
    """Every test here requests the walltime job, so it is submitted before the first."""


def test_qsub_two_node_job_sees_pbs_environment(slurm_cluster: SlurmCluster, tmp_path: Path):
    out = tmp_path / "job.out"
    script = write_script(
        tmp_path / "pbsenv.sh",
        'echo "JOBID=$PBS_JOBID"\n'
        'echo "WORKDIR=$PBS_O_WORKDIR"\n'
        'echo "JOBNAME=$PBS_JOBNAME"\n'
        'echo "PWD=$PWD"\n'
        'echo "NODEFILE=$PBS_NODEFILE"\n'
        'sed "s/^/HOST=/" "$PBS_NODEFILE"\n'
        "srun --nodes=1 --ntasks=1 --nodelist=node2 --overlap "
        "bash -c 'echo \"STEP=$SLURMD_NODENAME $(hostname)\"'\n"
        'echo "STDERR-LINE" >&2\n',
    )
    job_id = submit(
        slurm_cluster,
        ["-l", "select=2,walltime=00:05:00", "-q", "debug", "-A", "someproj", "-N", "pbsenv",
         "-j", "oe", "-o", str(out), str(script)],
        tmp_path,
    )  # fmt: skip
    info = slurm_cluster.wait_job(job_id, timeout=60)
    text = out.read_text() if out.exists() else "(no output file)"
    assert info["JobState"] == "COMPLETED", f"{info}\n{text}"
    assert info["ExitCode"] == "0:0"
    assert info["Partition"] == "debug"
    assert info["Account"] == "someproj"
    assert info["JobName"] == "pbsenv"
    assert info["NumNodes"] == "2"
    assert info["TimeLimit"] == "00:05:00"

    lines = text.splitlines()
    assert f"JOBID={job_id}" in lines, text
    assert f"WORKDIR={tmp_path}" in lines, text
    assert "JOBNAME=pbsenv" in lines, text
    assert f"PWD={tmp_path}" in lines, text  # Slurm starts in the submit dir (PBS: $HOME)
    hosts = [line.removeprefix("HOST=") for line in lines if line.startswith("HOST=")]
    assert len(hosts) == 2 and len(set(hosts)) == 2, text
    assert set(hosts) <= set(slurm_cluster.node_names)
    assert "node2" in hosts, text  # --nodelist=node2 must be inside the allocation
    nodefile = next(
        line.removeprefix("NODEFILE=") for line in lines if line.startswith("NODEFILE=")
    )
    assert Path(nodefile).parent == slurm_cluster.nodefile_dir
    assert any(line.startswith("STEP=node2 ") for line in lines), text
    assert "STDERR-LINE" in lines, f"-j oe should join stderr into -o: {text}"


def test_twelve_overlap_steps_per_node_run_at_once(slurm_cluster: SlurmCluster, tmp_path: Path):
    # 12 steps on each node of a 2-node job (24 at once): each records its start
    # and end; all must be running simultaneously (every start before any end).
    out = tmp_path / "steps.out"
    script = write_script(
        tmp_path / "steps.sh",
        'for node in $(cat "$PBS_NODEFILE"); do\n'
        "  for i in $(seq 1 12); do\n"
        '    srun --nodes=1 --ntasks=1 --nodelist="$node" --overlap bash -c '
        '\'echo "START $SLURMD_NODENAME $(date +%s.%N)"; sleep 4; '
        'echo "END $SLURMD_NODENAME $(date +%s.%N)"\' &\n'
        "  done\n"
        "done\n"
        "wait\n",
    )
    job_id = submit(
        slurm_cluster,
        ["-l", "select=2,walltime=00:05:00", "-q", "debug", "-A", "someproj", "-N", "steps",
         "-j", "oe", "-o", str(out), str(script)],
        tmp_path,
    )  # fmt: skip
    info = slurm_cluster.wait_job(job_id, timeout=180)
    text = out.read_text() if out.exists() else "(no output file)"
    assert info["JobState"] == "COMPLETED", f"{info}\n{text}"

    starts: dict[str, list[float]] = {}
    ends: dict[str, list[float]] = {}
    for line in text.splitlines():
        kind, _, rest = line.partition(" ")
        if kind in ("START", "END"):
            node, stamp = rest.split()
            (starts if kind == "START" else ends).setdefault(node, []).append(float(stamp))
    nodes = sorted(starts)
    assert len(nodes) == 2, text
    for node in nodes:
        assert len(starts[node]) == 12 and len(ends.get(node, [])) == 12, text
        assert max(starts[node]) < min(ends[node]), f"steps on {node} did not overlap:\n{text}"
    all_starts = [t for v in starts.values() for t in v]
    all_ends = [t for v in ends.values() for t in v]
    assert max(all_starts) < min(all_ends), f"24 steps were not all running at once:\n{text}"


def test_oversized_select_rejected_at_submit(slurm_cluster: SlurmCluster, tmp_path: Path):
    script = write_script(tmp_path / "big.sh", "sleep 1")
    res = qsub(
        slurm_cluster,
        ["-l", "select=4,walltime=00:05:00", "-q", "debug", "-N", "toobig", str(script)],
        tmp_path,
    )
    assert res.returncode == 1, res
    assert "Node count specification invalid" in res.stdout, res
    assert not re.search(r"^\d+$", res.stdout, re.M), res
    queued = slurm_cluster.run(["squeue", "-h", "-n", "toobig", "-o", "%i"])
    assert queued.stdout.strip() == "", "rejected job must not be queued"


def test_unknown_queue_rejected_at_submit(slurm_cluster: SlurmCluster, tmp_path: Path):
    script = write_script(tmp_path / "q.sh", "sleep 1")
    res = qsub(slurm_cluster, ["-q", "nosuchqueue", str(script)], tmp_path)
    assert res.returncode == 1, res
    assert "Invalid partition name specified" in res.stdout, res


def test_failed_job_exit_code(slurm_cluster: SlurmCluster, tmp_path: Path):
    script = write_script(tmp_path / "fail.sh", "exit 3")
    job_id = submit(
        slurm_cluster, ["-q", "debug", "-l", "walltime=00:05:00", str(script)], tmp_path
    )
    info = slurm_cluster.wait_job(job_id, timeout=60)
    assert (info["JobState"], info["ExitCode"]) == ("FAILED", "3:0"), info


def test_qdel_cancels_running_job(slurm_cluster: SlurmCluster, tmp_path: Path):
    script = write_script(tmp_path / "long.sh", "echo $$ > long.pid\nexec sleep 600")
    job_id = submit(
        slurm_cluster,
        ["-q", "capacity", "-l", "select=1,walltime=00:10:00", "-N", "victim", str(script)],
        tmp_path,
    )
    slurm_cluster.wait_job(job_id, states={"RUNNING"}, timeout=60)
    pid_file = tmp_path / "long.pid"
    deadline = time.monotonic() + 30
    while not pid_file.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    pid = int(pid_file.read_text())

    res = slurm_cluster.run(["qdel", job_id])
    assert res.returncode == 0, res
    info = slurm_cluster.wait_job(job_id, timeout=30)
    assert info["JobState"] == "CANCELLED", info
    deadline = time.monotonic() + 15
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _running(pid), "the job's process survived qdel"


def test_qstat_unknown_id_exit_code(slurm_cluster: SlurmCluster):
    res = slurm_cluster.run(["qstat", "999999"])
    assert res.returncode == 153, res
    res = slurm_cluster.run(["scontrol", "show", "job", "-o", "999999"])
    assert res.returncode == 1 and "Invalid job id specified" in res.stderr, res


def test_walltime_kill_gives_timeout(slurm_cluster: SlurmCluster, walltime_job: tuple[str, float]):
    job_id, submitted = walltime_job
    # Slurm checks time limits every 30 s: the kill comes 60-90 s after start.
    remaining = 180 - (time.monotonic() - submitted)
    info = slurm_cluster.wait_job(job_id, timeout=max(remaining, 5), poll=1)
    assert info["JobState"] == "TIMEOUT", info
    assert info["TimeLimit"] == "00:01:00", info
    records = [r for r in slurm_cluster.jobcomp_records() if r.get("JobId") == job_id]
    assert records and records[-1]["JobState"] == "TIMEOUT", slurm_cluster.jobcomp_path


def _running(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def test_env_points_clients_at_this_cluster(slurm_cluster: SlurmCluster):
    env = slurm_cluster.env
    assert env["SLURM_CONF"] == str(slurm_cluster.conf_path)
    assert os.path.isfile(env["SLURM_CONF"])
    res = slurm_cluster.run(["sinfo", "-h", "-N", "-o", "%N"])
    assert sorted(set(res.stdout.split())) == ["node1", "node2", "node3", "node4"]
    res = slurm_cluster.run(["scontrol", "show", "node", "-o"])
    for line in res.stdout.splitlines():
        assert parse_scontrol_record(line)["CPUTot"] == "24", line
