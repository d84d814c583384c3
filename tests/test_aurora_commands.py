"""The profile's commands alone (pbs-submit, pbs-status, pbs-cancel) against the real
PBS server: what a job's end reads as, refusals, cancel, held jobs, several submissions
in flight, one scheduler query per polling round. Helpers: tests/pbs_runs.py.
"""

from __future__ import annotations

import re
import time
from datetime import datetime
from pathlib import Path

import pytest

from pbs_runs import (
    INTERVAL,
    Commands,
    delete_our_jobs,
    provider_settings,
    write_jobscript,
)


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
    # Commands.cancel gives it the plugin's 2 s; that pbs-cancel returns without waiting
    # for qdel is test_pbs.py's test_cancel_skips_finished_jobs_and_returns_in_time.
    assert commands.cancel(job_id).returncode == 0
    job = pbs_cluster.wait_job(job_id, timeout=30)
    assert "terminated" in job["comment"]
    assert f"qdel {job_id}" in Path(commands.conf["state_dir"], "cancel.log").read_text()
    assert commands.state(job_id) == "failed"


@pytest.mark.pbs
def test_qdel_from_outside_reads_failed_within_two_polling_rounds(commands, pbs_cluster, tmp_path):
    job_id = commands.submit_ok(write_jobscript(tmp_path, [2], "sleep 600"))
    pbs_cluster.wait_job(job_id, states={"R"})
    assert commands.state(job_id) == "running"
    pbs_cluster.run(["qdel", job_id], check=True)
    pbs_cluster.wait_job(job_id, timeout=30)  # PBS says F: Exit_status 0, substate 91
    answers = []
    for _ in range(4):  # two of Snakemake's rounds (it asks once per interval), twice each
        answers.append(commands.state(job_id))
        if answers[-1] != "running":
            break
        time.sleep(INTERVAL / 2 + 0.05)
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
        assert [commands.wait(i) for i in ids] == ["success"] * 3
        log = commands.status_log()
        assert "text form for the rest" in log and "status unknown" not in log
        # The three were asked about in the text form for more rounds and seconds than
        # a job may stay unreadable (the log's stamps: whole seconds), so a fallback that
        # did not read them would have turned them failed.
        stamps = [
            datetime.strptime(line[:19], "%Y-%m-%d %H:%M:%S")
            for line in log.split("text form for the rest", 1)[1].splitlines()
            if "query for 3 job(s): 3 running" in line
        ]
        assert len(stamps) > conf["problem_rounds"], log
        assert (stamps[-1] - stamps[0]).total_seconds() > conf["problem_seconds"], log
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
