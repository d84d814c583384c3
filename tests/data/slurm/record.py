"""Record real outputs of the test scheduler (Slurm 22.05 + PBS wrappers) into this folder.

Run as root from the repository root (takes ~1.5 minutes: one job must hit its walltime):

    .venv/bin/python tests/data/slurm/record.py

Each case is written as ``<case>.json``: {"argv", "returncode", "stdout", "stderr",
"note"}, exactly as the command returned them; ``jobcomp.txt`` is a copy of the
``jobcomp/filetxt`` file. Job ids start at 1000 (FirstJobId) and differ per recording.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))  # tests/

from slurm_cluster import SlurmCluster  # noqa: E402


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="slurm-record-"))
    cluster = SlurmCluster()
    try:
        cluster.start()
        record_all(cluster, work)
    finally:
        cluster.stop()
        shutil.rmtree(work, ignore_errors=True)


def record_all(cluster: SlurmCluster, work: Path) -> None:
    def script(name: str, body: str) -> str:
        path = work / name
        path.write_text("#!/bin/bash\n" + body + "\n")
        path.chmod(0o755)
        return str(path)

    def run(case: str | None, argv: list[str], note: str = "") -> str:
        res = cluster.run(argv, cwd=work)
        if case is not None:
            data = {
                "argv": argv,
                "returncode": res.returncode,
                "stdout": res.stdout,
                "stderr": res.stderr,
                "note": note,
            }
            (HERE / f"{case}.json").write_text(json.dumps(data, indent=2) + "\n")
            print(f"{case}: rc={res.returncode}")
        return res.stdout.strip()

    def qsub(case: str | None, *args: str, note: str = "") -> str:
        return run(case, ["qsub", *args], note)

    def show(case: str, job_id: str, note: str) -> None:
        run(case, ["scontrol", "show", "job", "-o", job_id], note)

    sleeper = script("sleep600.sh", "sleep 600")

    run("qstat_no_jobs", ["qstat"], "qstat without arguments when there are no jobs at all")

    # Submitted first: it needs ~60-90 s to be killed at its walltime.
    timeout_id = qsub(
        None, "-q", "debug", "-l", "select=1,walltime=00:01:00", "-N", "rec_timeout", sleeper
    )
    timeout_started = time.monotonic()

    ok_id = qsub(
        "qsub_success",
        "-A",
        "someproj",
        "-q",
        "debug",
        "-l",
        "select=2,walltime=00:05:00",
        "-N",
        "rec_ok",
        "-j",
        "oe",
        "-o",
        str(work / "ok.out"),
        script("ok.sh", "cat $PBS_NODEFILE; echo done"),
        note="accepted job: bare numeric id on stdout, exit 0 (Aurora: 123456.aurora-pbs-...)",
    )
    qsub(
        "qsub_reject_bad_queue",
        "-q",
        "nosuch",
        "-l",
        "select=1,walltime=00:05:00",
        sleeper,
        note="unknown queue: exit 1, message on stdout, nothing on stderr",
    )
    qsub(
        "qsub_reject_oversized_select",
        "-q",
        "debug",
        "-l",
        "select=4,walltime=00:05:00",
        sleeper,
        note="select=4 in debug (MaxNodes=2), EnforcePartLimits=ALL: exit 1, message on stdout",
    )
    qsub(
        "qsub_reject_walltime",
        "-q",
        "debug",
        "-l",
        "select=1,walltime=02:00:00",
        sleeper,
        note="walltime 2 h in debug (MaxTime=60 min): exit 1, message on stdout",
    )

    cluster.wait_job(ok_id)
    show("scontrol_job_completed", ok_id, "2-node job that exited 0")

    failed_id = qsub(None, "-q", "debug", "-N", "rec_fail", script("fail.sh", "exit 3"))
    cluster.wait_job(failed_id)
    show("scontrol_job_failed", failed_id, "job script did `exit 3`: JobState=FAILED ExitCode=3:0")

    running_id = qsub(None, "-q", "debug", "-l", "select=2", "-N", "rec_running", sleeper)
    cluster.wait_job(running_id, states={"RUNNING"})

    # PENDING (Reason=Resources): every CPU of all 4 nodes is asked for while other
    # jobs hold some; cancelled while pending.
    big_id = qsub(
        None, "-q", "capacity", "-l", "select=4:ncpus=24,walltime=00:10:00", "-N", "rec_big",
        sleeper,
    )  # fmt: skip
    held_id = qsub(None, "-h", "-q", "debug", "-N", "rec_held", sleeper)
    deadline = time.monotonic() + 45  # Reason=None until a scheduler pass looks at it
    while (cluster.show_job(big_id) or {}).get("Reason") == "None" and time.monotonic() < deadline:
        time.sleep(0.5)
    show("scontrol_job_pending", big_id, "waits for resources (other jobs hold CPUs)")
    show("scontrol_job_pending_held", held_id, "submitted with qsub -h (user hold)")

    show("scontrol_job_running", running_id, "2-node job RUNNING")
    run(
        "qstat_running_and_pending",
        ["qstat"],
        "qstat without arguments while jobs run and pend (the wrapper's table)",
    )
    run("qstat_id_running", ["qstat", running_id], "qstat <id> of a running job")
    run("qstat_f_running", ["qstat", "-f", running_id], "qstat -f of a running job")
    run("qdel_running", ["qdel", running_id], "qdel of a running job")
    cluster.wait_job(running_id)
    show("scontrol_job_cancelled", running_id, "running job cancelled with qdel")
    run("qdel_pending", ["qdel", big_id, held_id], "qdel of two pending jobs at once")
    cluster.wait_job(big_id)
    cluster.wait_job(held_id)
    show("scontrol_job_cancelled_pending", big_id, "pending job cancelled with qdel")
    run("qdel_finished", ["qdel", big_id], "qdel of a job that already ended")

    run("qstat_f_completed", ["qstat", "-f", ok_id], "qstat -f of a COMPLETED job (no exit status)")
    run("qstat_id_completed", ["qstat", ok_id], "qstat <id> of a COMPLETED job")
    run("qstat_unknown_id", ["qstat", "999999"], "unknown job id")
    run("qstat_x", ["qstat", "-x", ok_id], "PBS Pro's -x (finished jobs): unknown option here")
    run("qstat_f_F_json", ["qstat", "-f", "-F", "json", ok_id], "PBS Pro's -F json: unknown here")
    run("qdel_unknown_id", ["qdel", "999999"], "qdel of an unknown id")
    run(
        "scontrol_job_unknown_id",
        ["scontrol", "show", "job", "-o", "999999"],
        "unknown (or purged) job id",
    )

    cluster.wait_job(timeout_id, timeout=180)
    print(f"walltime kill after {time.monotonic() - timeout_started:.0f} s")
    show("scontrol_job_timeout", timeout_id, "walltime 00:01:00, job sleeps 600 s")
    run(
        "scontrol_jobs_all",
        ["scontrol", "show", "job", "-o"],
        "all jobs at once (no id): one line per job",
    )
    time.sleep(1)
    shutil.copy(cluster.jobcomp_path, HERE / "jobcomp.txt")


if __name__ == "__main__":
    main()
