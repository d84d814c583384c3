"""Whole profiles/aurora runs through the real PBS server when something goes wrong:
walltime kills then ``--rerun-incomplete`` or a continuation (``pbs.resubmit``), a bad
rank among them, engines that die or never come up, Ctrl-C and SIGKILL of Snakemake;
after each, no job and no engine is left. Helpers: tests/pbs_runs.py.
"""

from __future__ import annotations

import json
import os
import re
import signal
import time

import pytest

import workflow as wf
from engine import client
from formats.files import safe_name
from pbs_runs import (
    ECHO_SERVER,
    INTERVAL,
    PROGRESS,
    aurora_folder,
    aurora_in_background,
    continued_run,
    cut_walltime,
    delete_our_jobs,
    echo_servers,
    engine_states,
    epoch_of_log_line,
    files_of,
    finished_rank,
    interrupt_and_check_nothing_is_left,
    killed_at_walltime,
    mid_request,
    nothing_outlives,
    our_job_ids,
    processes_running,
    python_wrapper,
    requests_running,
    rerun_incomplete,
    run_aurora,
    short_queue,
    slow_command,
    submissions,
    wait_for,
    wait_gone,
    warm_folder,
    warm_kill_config,
    watchdogs,
)


@pytest.mark.pbs
def test_warm_walltime_kill_mid_submission_then_rerun_runs_only_the_unfinished_ranks(
    pbs_cluster, tmp_path
):
    ranks = {f"{i}.in": f"rank {i} prompt\n" for i in range(4)}
    # 2 engines, 2 ranks each, 20 s a request: walltime 2 min; 2 ranks end after ~20 s,
    # and once the other 2 are mid-request PBS is made to end the job at its walltime
    # (cut to what it has used: seconds, not the 2 minutes asked for)
    config, packing = warm_kill_config(pbs_cluster, 4, engines=2, delay_s=20, resubmit=0)
    work = warm_folder(tmp_path, ranks, **config)
    results = work / "results"
    try:
        with aurora_in_background(pbs_cluster, work, *packing) as proc:
            busy = lambda: mid_request(work, 2, 2)  # noqa: E731
            wait_for(busy, "the last 2 ranks were not sent", proc=proc)
            cut_walltime(pbs_cluster, submissions(work)[0]["id"])
            output = proc.communicate(timeout=300)[0]
        assert proc.returncode != 0, output[-4000:]
        (submission,) = submissions(work)
        killed_at_walltime(pbs_cluster, submission, "r0-3", "00:02:00")
        done = sorted(int(p.stem) for p in results.glob("*.out"))
        assert len(done) == 2, done
        for rank in done:
            assert wf.read_records(results / f"{rank}.out") == [(f"rank {rank} prompt",) * 2]
        wait_for(lambda: not processes_running(ECHO_SERVER), "engines outlived the job", 15)

        left = sorted(set(range(4)) - set(done))
        no_delay = {"task_env": {"ECHO_SERVER_DELAY_S": "0"}}
        rerun_incomplete(pbs_cluster, work, packing, done, left, no_delay)
        for rank in range(4):
            assert wf.read_records(results / f"{rank}.out") == [(f"rank {rank} prompt",) * 2]
    finally:
        delete_our_jobs(pbs_cluster, work)


@pytest.mark.pbs
def test_warm_walltime_kill_is_continued_with_only_the_unfinished_ranks_not_the_bad_one(
    pbs_cluster, tmp_path
):
    # Four JSONL ranks and a .in rank: at least two JSONL ranks are among the 3 done
    # and one among the 2 continued. Rank 5's input is bad (invalid UTF-8 on line 2).
    ranks = {"0.in": "rank 0 prompt\n"}
    ranks |= {f"{i}.jsonl": json.dumps({"prompt": f"rank {i} prompt"}) + "\n" for i in range(1, 5)}
    ranks["5.in"] = b"fine\n\xff\xfe broken\n"
    # 3 engines, 2 ranks each, 20 s a request: walltime 2 min; rank 5 fails at once,
    # 3 ranks end after ~20 s, PBS ends the job with the other 2 mid-request (its
    # walltime cut to what it has used: seconds later, not at 120 s)
    work, out, code, done = continued_run(pbs_cluster, tmp_path, ranks, 20, 3, in_flight=2)
    first, more = submissions(work)
    killed_at_walltime(pbs_cluster, first, "r0-5", "00:02:00")
    assert len(done) == 3 and 5 not in done, done
    left = sorted(set(range(5)) - set(done))
    # one continuation of only the unfinished ranks (not the bad one), its walltime for
    # one rank per engine: warm.rank_minutes' 1 min, above the pace seen (20 s a rank and
    # engine; a pace over rank_minutes sets the walltime: test_progress.py)
    assert (more["name"], more["ranks"], more["walltime"]) == (
        "r0-5.c1",
        ",".join(map(str, left)),
        "00:01:00",
    )
    assert "submission r0-5 (job " in out and "killed by PBS: walltime exceeded" in out
    assert f"the 2 unfinished go on in r0-5.c1 (job {more['id']}" in out, out[-4000:]
    assert "not run again, their input is at fault: rank 5 (logs/infer/5.log)" in out
    results = work / "results"
    assert {r: finished_rank(work, r) for r in done} == done  # not run again
    assert wf.read_records(results / "0.out") == [("rank 0 prompt",) * 2]
    for rank in range(1, 5):
        (answer,) = map(json.loads, (results / f"{rank}.jsonl").read_text().splitlines())
        assert (answer["id"], answer["text"]) == (1, f"rank {rank} prompt"), answer
    assert not list(results.glob("*.out.*")) and not list(results.glob("*.jsonl.*"))
    nodes = json.loads((work / "logs" / "pbs" / "r0-5.c1.nodes.json").read_text())
    assert sorted(r for share in nodes["shares"] for r in share) == left
    # the continuation finished its ranks: the run fails for rank 5 alone, named at its end
    assert code != 0, out[-4000:]
    assert not (results / "5.out").exists()
    log = (work / "logs" / "infer" / "5.log").read_text()
    assert "5.in" in log and "line 2" in log, log
    assert "1 rank(s) failed" in out and "rank 5: logs/infer/5.log" in out, out[-4000:]
    wait_for(lambda: not processes_running(ECHO_SERVER), "engines outlived the jobs", 15)


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
        # kill it while it holds a request (3 s each, one rank at a time)
        wait_for(lambda: requests_running(url) > 0, "the victim got no request", proc=proc)
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


@pytest.mark.pbs
def test_walltime_kill_is_noticed_and_rerun_incomplete_runs_only_the_killed_rank(
    pbs_cluster, tmp_path
):
    ranks = {f"{i}.in": f"rank {i} prompt\n" for i in range(4)}
    # per-rank engines on 4 tiles, walltime 1 min; rank 3 sleeps past it (once the other
    # 3 are done, PBS is made to end the job at its walltime: cut to what it has used)
    config = {"runtime_minutes": 1, "tiles": {"per_node": 4}, "pbs": short_queue(pbs_cluster, 0)}
    sleeper = python_wrapper(tmp_path / "python", sleep_ranks=[3])
    work = aurora_folder(tmp_path, ranks, python=str(sleeper), **config)
    packing = ("--group-components", "node=4", "--cores", "4")
    results = work / "results"
    try:
        with aurora_in_background(pbs_cluster, work, *packing) as proc:
            three = lambda: len(list(results.glob("*.out"))) == 3  # noqa: E731
            wait_for(three, "ranks 0-2 did not finish", proc=proc)
            cut_walltime(pbs_cluster, submissions(work)[0]["id"])
            output = proc.communicate(timeout=300)[0]
        assert proc.returncode != 0, output[-4000:]
        (submission,) = submissions(work)
        job = killed_at_walltime(pbs_cluster, submission, "r0-3", "00:01:00")
        # The status command's first "failed" answer, against PBS's end of the job
        # (mtime of the finished job): at most 2 polling intervals plus 2 s of slack.
        log = (work / ".snakemake" / "pbs" / "status.log").read_text().splitlines()
        noticed = next(line for line in log if "query for" in line and "failed" in line)
        ended = time.mktime(time.strptime(job["mtime"], "%a %b %d %H:%M:%S %Y"))
        assert -1 <= epoch_of_log_line(noticed) - ended <= 2 * INTERVAL + 2, (job["mtime"], noticed)
        assert "walltime exceeded" in "\n".join(log)
        for rank in range(3):
            assert wf.read_records(results / f"{rank}.out") == [(f"rank {rank} prompt",) * 2]
        assert not (results / "3.out").exists()

        rerun_incomplete(pbs_cluster, work, packing, range(3), [3], {"python": ""})
        assert [s["name"] for s in submissions(work)] == ["r0-3", "r3"]
        for rank in range(4):
            assert wf.read_records(results / f"{rank}.out") == [(f"rank {rank} prompt",) * 2]
    finally:
        delete_our_jobs(pbs_cluster, work)


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
        output = interrupt_and_check_nothing_is_left(pbs_cluster, proc, work, tasks=sleeper)
        assert_cancelled_by_snakemake(work, submission["id"], output)


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
        output = interrupt_and_check_nothing_is_left(pbs_cluster, proc, work)
    # Snakemake itself cancelled it: had the status command died of the SIGINT, the
    # run's watchdog would have deleted the job a second later
    (submission,) = submissions(work)
    assert_cancelled_by_snakemake(work, submission["id"], output)


@pytest.mark.pbs
def test_ctrl_c_while_qsub_is_under_way_leaves_no_submission(pbs_cluster, tmp_path):
    # Snakemake submits from its main thread: on Ctrl-C it kills the submit command
    # 0.25 s later and never learns the id of a job the server already has.
    marker = tmp_path / "qsub-started"
    shims = slow_command(tmp_path / "bin", "qsub", marker)
    work = aurora_folder(tmp_path, {"0.in": "a\n"})
    env = {"PATH": f"{shims}:{pbs_cluster.env['PATH']}"}
    before = set(pbs_cluster.jobs_in_queue())
    with aurora_in_background(pbs_cluster, work, env=env) as proc:
        wait_for(marker.exists, "qsub did not start", proc=proc)
        # the server has the job now; its id is not printed yet (the shim's 4 s)
        wait_for(lambda: set(pbs_cluster.jobs_in_queue()) - before, "no job queued", 30, proc)
        (queued,) = set(pbs_cluster.jobs_in_queue()) - before
        output = interrupt_and_check_nothing_is_left(pbs_cluster, proc, work)
        assert "Submitted" not in output  # Snakemake never learned the id
        log = (work / ".snakemake" / "pbs" / "status.log").read_text()
        assert "watchdog: Snakemake" in log
        (job_id,) = set(our_job_ids(work))
        assert job_id == queued
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


def assert_cancelled_by_snakemake(work, job_id: str, output: str) -> None:
    """Snakemake's cancel command (pbs-cancel, on Ctrl-C) deleted ``job_id``, once, and
    the run's watchdog, which deletes what a run left when Snakemake is gone, had
    nothing left to delete."""
    state = work / ".snakemake" / "pbs"
    cancelled = [line for line in (state / "cancel.log").read_text().splitlines()
                 if " qdel " in line]  # fmt: skip
    assert [line.split(" qdel ", 1)[1] for line in cancelled] == [job_id], cancelled
    # absent when Ctrl-C came before the first status query (a fresh clone of f0cf001)
    status = state / "status.log"
    log = status.read_text() if status.exists() else ""
    assert "watchdog: Snakemake" not in log, log[-2000:] + output[-4000:]
