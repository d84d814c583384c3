"""Progress lines (scripts/reporting/progress.py) and continuations of submissions PBS ended
(scripts/pbs/continuation.py): fast tests on files as the ranks and engines write them,
and on recorded qstat answers (tests/data/openpbs/)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import time
from pathlib import Path

import pytest

import pbs
from formats import failure_note, faults, node_report
from pbs import continuation, node_faults
from pbs.submission import restrict_targets
from reporting import progress

OPENPBS = Path(__file__).parent / "data" / "openpbs"


def write_record(
    folder: Path, rank: int, tokens: int, written: float, request: float, **fields
) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    record = {"rank": rank, "output_tokens": tokens, "written_at": written, "request_s": request}
    record |= fields
    (folder / f"{rank}.json").write_text(json.dumps(record))


def write_engine(registry: Path, name: str, state: str, restarts: int = 0) -> None:
    registry.mkdir(parents=True, exist_ok=True)
    entry = {"name": name, "state": state, "restarts": restarts, "log": f"/logs/{name}.log"}
    path = registry / f"{name}.json"
    tmp = registry / f".{name}.tmp"
    tmp.write_text(json.dumps(entry))
    os.replace(tmp, path)  # as serve.write_state does: a new inode


def settle(folder: Path, age_s: float = 10.0) -> None:
    """The folder's mtime ``age_s`` in the past, as a round later than its last change
    sees it (progress.SETTLED_S)."""
    at = time.time() - age_s
    os.utime(folder, (at, at))


# ------------------------------------------------------------------------ the line


def test_the_line_of_a_running_submission():
    p = progress.Progress(total=480, done=212, failed=[7], tokens=31_000, first=1000.0, last=1010.0)
    p.engines_total, p.engines_ready, p.engines_seen = 48, 48, 48
    line = progress.progress_line("r0-479", "123.aurora-pbs", "running", p, 1100.0, since=376.0)
    assert line == (
        "r0-479 123.aurora-pbs running 12:04 | engines 48/48 ready | ranks 212/480 done, "
        "1 failed | 3,100 tok/s | ETA 2 min"
    )


def test_a_queued_submission_says_so_with_the_pbs_comment():
    comment = "Not Running: User has reached queue capacity running job limit."
    line = progress.progress_line(
        "r480-959", "124.aurora-pbs", "queued", progress.Progress(480), 0, comment=comment
    )
    assert line == f"r480-959 124.aurora-pbs queued ({comment})"


def test_an_engine_that_failed_or_restarted_is_named_with_its_log():
    p = progress.Progress(total=10, engines_total=4, engines_ready=2, engines_seen=4)
    p.engines_trouble = [
        ("node1-tile0", "failed", 2, "/l/node1-tile0.log"),
        ("node1-tile3", "ready", 1, "/l/node1-tile3.log"),
    ]
    assert progress.engines_part(p) == (
        "engines 2/4 ready: node1-tile0 failed after 2 restart(s) (/l/node1-tile0.log), "
        "node1-tile3 ready after 1 restart(s) (/l/node1-tile3.log)"
    )


def test_no_rate_nor_eta_before_the_first_rank():
    p = progress.Progress(total=48, engines_total=12, engines_seen=3)
    assert progress.figures(p, 50.0) == ["engines 0/12 ready (3 reported)", "ranks 0/48 done"]


def test_the_local_line():
    p = progress.Progress(total=48, done=12, tokens=192, first=100.0, last=104.0)
    assert progress.local_line(p, 110.0, 70.0) == (
        "progress 0:40 | ranks 12/48 done | 48 tok/s | ETA < 1 min"
    )


# ---------------------------------------------------------------------- the reader


def test_each_file_is_read_once_and_again_only_when_replaced(tmp_path):
    records, failed, registry = tmp_path / "records", tmp_path / "failed", tmp_path / "reg"
    for rank in range(5):
        write_record(records, rank, 16, 1000.0 + rank, 2.0)
    for tile in range(3):
        write_engine(registry, f"node1-tile{tile}", "ready")
    settle(registry)
    sub = progress.Submission("1.pbs", frozenset(range(8)), 4, str(registry))
    memory, reads = {}, progress.Reads()
    first = progress.read_progress([sub], records, failed, memory, reads)["1.pbs"]
    assert (first.done, first.tokens, first.engines_ready, first.engines_total) == (5, 80, 3, 4)
    assert (first.first, first.last) == (998.0, 1004.0)
    assert reads.files == 5 + 3
    memory = json.loads(json.dumps(memory))  # kept between rounds as JSON
    reads = progress.Reads()
    again = progress.read_progress([sub], records, failed, memory, reads)["1.pbs"]
    assert (again.done, again.tokens, reads.files) == (5, 80, 0)
    write_record(records, 5, 4, 1006.0, 1.0)
    write_engine(registry, "node1-tile1", "restarting", restarts=1)
    settle(registry, 5.0)
    reads = progress.Reads()
    later = progress.read_progress([sub], records, failed, memory, reads)["1.pbs"]
    # the new record, and the registry's entries again (its folder changed)
    assert (later.done, later.tokens, later.engines_ready, reads.files) == (6, 84, 2, 1 + 3)
    assert later.engines_trouble == [("node1-tile1", "restarting", 1, "/logs/node1-tile1.log")]
    assert reads.listings == 3  # records, failure notes, registry: one listing each


def test_an_engine_replaced_twice_between_rounds_is_seen_even_with_its_old_inode(tmp_path):
    # ready -> (restarting, unseen) -> ready after a restart, the last entry on the inode
    # of the first: file systems hand a freed inode out again
    registry = tmp_path / "reg"
    write_engine(registry, "node1-tile0", "ready")
    entry, kept = registry / "node1-tile0.json", registry / ".kept"
    os.link(entry, kept)  # the first entry's inode, to be handed out again
    inode = entry.stat().st_ino
    settle(registry, 10.0)
    sub = progress.Submission("1.pbs", frozenset(range(4)), 1, str(registry))
    memory = {}
    first = progress.read_progress([sub], tmp_path / "records", tmp_path / "failed", memory)
    assert (first["1.pbs"].engines_ready, first["1.pbs"].engines_trouble) == (1, [])
    write_engine(registry, "node1-tile0", "restarting", restarts=1)
    again = {"name": "node1-tile0", "state": "ready", "restarts": 1, "log": "/logs/t0.log"}
    kept.write_text(json.dumps(again))
    os.replace(kept, entry)
    assert entry.stat().st_ino == inode
    settle(registry, 5.0)
    later = progress.read_progress([sub], tmp_path / "records", tmp_path / "failed", memory)
    assert later["1.pbs"].engines_trouble == [("node1-tile0", "ready", 1, "/logs/t0.log")]


def test_ranks_of_other_submissions_are_not_counted(tmp_path):
    records = tmp_path / "records"
    for rank in (1, 2, 9):
        write_record(records, rank, 1, 1.0, 0.0)
    subs = [
        progress.Submission("a", frozenset({1, 2, 3})),
        progress.Submission("b", frozenset({9})),
    ]
    found = progress.read_progress(subs, records, tmp_path / "failed", {})
    assert (found["a"].done, found["a"].total, found["b"].done) == (2, 3, 1)


def test_failure_notes_count_failed_ranks_until_they_start_again(tmp_path):
    log = tmp_path / "logs" / "infer" / "3.log"
    failure_note.write_failure_note(
        log, 3, failure_note.INPUT_FAULT, "data/3.in: line 2: not valid UTF-8"
    )
    sub = progress.Submission("local", frozenset(range(4)))
    memory = {}
    failed_dir = tmp_path / "logs" / "infer" / "failed"
    found = progress.read_progress([sub], tmp_path / "records", failed_dir, memory)["local"]
    assert found.failed == [3]
    assert progress.ranks_part(found) == "ranks 0/4 done, 1 failed"
    failure_note.clear_failure_note(log, 3)
    found = progress.read_progress([sub], tmp_path / "records", failed_dir, memory)["local"]
    assert found.failed == []


# ------------------------------------------------------------ what PBS's end means


@pytest.mark.parametrize(
    ("number", "by_pbs"), [(0, False), (2, True), (3, True), (4, False), (7, False)]
)
def test_which_ends_are_pbs_s_on_recorded_answers(number, by_pbs):
    (job,) = pbs.parse.parse_json((OPENPBS / f"json-{number}.json").read_text()).values()
    assert pbs.verdict(job).ended_by_pbs is by_pbs


def test_a_signal_pbs_sent_counts_as_its_end():
    # PBS Pro reports some walltime kills and qdel as 256 + SIGTERM
    answer = pbs.verdict({"job_state": "F", "Exit_status": 271, "substate": 93})
    assert (answer.state, answer.ended_by_pbs) == ("failed", True)


def test_phase_comment_and_start_for_the_line():
    (queued,) = pbs.parse.parse_json((OPENPBS / "json-9.json").read_text()).values()
    answer = pbs.verdict(queued)
    assert (answer.phase, answer.started) == ("queued", None)
    assert answer.comment.startswith("Not Running: User has reached")
    (running,) = pbs.parse.parse_json((OPENPBS / "json-7.json").read_text()).values()
    answer = pbs.verdict(running)
    assert answer.phase == "running" and answer.started == pbs.parse.pbs_time(
        "Tue Dec  1 05:27:02 2026"
    )


# ------------------------------------------------------------------ continuations


def settings(tmp_path: Path, **changes) -> dict:
    base = {
        "warm_engines": True,
        "tiles_per_node": 12,
        "tiles_per_job": 1,
        "ranks_per_engine": 10,
        "start_minutes": 15,
        "rank_minutes": 1,
        "runtime_minutes": 30,
        "walltime_margin_minutes": 10,
        "queue": "capacity",
        "results_dir": str(tmp_path / "results"),
        "failed_dir": str(tmp_path / "failed"),
        "state_dir": str(tmp_path / "state"),
        "log_dir": str(tmp_path / "logs"),
        "status_interval": 10,
        "resubmit": 1,
        "owner": {"pid": 1, "start": "x"},
    }
    return base | changes


def finish(tmp_path: Path, rank: int, written: float, request: float, suffix: str = ".out") -> None:
    """A finished rank as the task leaves it: its record (with the answers' digest),
    then its answers."""
    results = tmp_path / "results"
    answers = f"answers of rank {rank}\n".encode()
    digest = hashlib.sha256(answers).hexdigest()
    write_record(results / "records", rank, 16, written, request, out_sha256=digest)
    (results / f"{rank}{suffix}").write_bytes(answers)


def test_done_bad_and_left_ranks(tmp_path):
    conf = settings(tmp_path)
    finish(tmp_path, 0, 100.0, 50.0)
    (tmp_path / "results" / "records" / "1.json").write_text("{}")  # its .out not yet
    log = tmp_path / "logs" / "infer" / "2.log"
    failure_note.write_failure_note(log, 2, failure_note.INPUT_FAULT, "bad")
    failure_note.write_failure_note(log.with_name("3.log"), 3, "engine", "died")
    conf["failed_dir"] = str(log.parent / "failed")
    assert continuation.rank_states(range(5), conf) == ([0], [2], [1, 3, 4])


def test_finished_jsonl_ranks_are_done_and_torn_answers_are_not(tmp_path):
    conf = settings(tmp_path)
    finish(tmp_path, 0, 100.0, 1.0, suffix=".jsonl")  # a JSONL rank: <rank>.jsonl
    finish(tmp_path, 1, 100.0, 1.0)
    finish(tmp_path, 2, 100.0, 1.0, suffix=".jsonl")
    # a node's crash lost the end of rank 2's answers after they were renamed in place
    torn = tmp_path / "results" / "2.jsonl"
    torn.write_bytes(torn.read_bytes()[:5])
    assert continuation.rank_states(range(3), conf) == ([0, 1], [], [2])


def test_the_continuation_s_walltime_follows_the_pace_seen(tmp_path):
    conf = settings(tmp_path, start_minutes=0, walltime_margin_minutes=0)
    # 2 engines served 2 ranks in 70 s: 70 s per rank and engine
    finish(tmp_path, 0, 1070.0, 70.0)
    finish(tmp_path, 1, 1071.0, 70.0)
    pace = continuation.seconds_per_rank([0, 1], conf, engines=2)
    assert pace == pytest.approx(71.0)
    conf["tiles_per_node"] = 2
    assert continuation.continuation_minutes(conf, left=2, nodes=1, per_rank_s=pace) == 2
    # 100 ranks left on 12 engines at 30 s: 9 rounds x 1 min (rank_minutes is the floor)
    conf = settings(tmp_path)
    assert continuation.continuation_minutes(conf, left=100, nodes=1, per_rank_s=30) == 15 + 9 + 10
    # nothing finished: the engines' start is what did not fit, its allowance doubles
    assert (
        continuation.continuation_minutes(conf, left=100, nodes=1, per_rank_s=None) == 30 + 9 + 10
    )


def test_continuation_names_fit_pbs():
    assert continuation.continuation_name("r0-479", 1) == "r0-479.c1"
    assert continuation.continuation_name("r0-479.c1", 2) == "r0-479.c2"
    assert continuation.continuation_name("r1000-29999_96", 1) == "r1000-29999_.c1"


def test_restrict_targets_keeps_only_the_left_ranks():
    text = (
        "#!/bin/bash\n# properties = {}\n"
        "cd /w && python -m snakemake --target-jobs 'infer:rank=0' 'infer:rank=1' "
        "'infer:rank=2' --cores 4 --mode remote && exit 0 || exit 1\n"
    )
    line = restrict_targets(text, [1, 2]).splitlines()[2]
    assert line == (
        "cd /w && python -m snakemake --target-jobs infer:rank=1 infer:rank=2 --cores 4 "
        "--mode remote && exit 0 || exit 1"
    )


class Ended:
    """A scheduler that says job "1" was killed at its walltime, and "2" succeeded."""

    def __call__(self, ids):
        walltime = {"job_state": "F", "Exit_status": -29, "substate": 93}
        done = {"job_state": "F", "Exit_status": 0, "substate": 92}
        answers = {"1": walltime, "2": done}
        return {i: pbs.verdict(answers[i]) for i in ids if i in answers}


def test_a_job_pbs_ended_reads_running_while_its_continuation_runs(tmp_path):
    conf = settings(tmp_path)
    with pbs.StateStore(conf["state_dir"]).locked() as state:
        state["jobs"]["1"] = pbs.new_job_record(0, "r0-3", pbs.settings.run_id(conf), "capacity")
    continued = []

    def resubmit(job_id, conf):
        continued.append(job_id)
        with pbs.StateStore(conf["state_dir"]).locked() as state:
            state["jobs"]["1"] |= {"continued_by": "2", "continuing": False}
            state["jobs"]["2"] = pbs.new_job_record(0, "r0-3.c1", pbs.settings.run_id(conf)) | {
                "attempt": 1
            }

    def ask(t):
        return pbs.job_status(
            "1", conf, query=Ended(), now=lambda: t, warn=lambda m: None, resubmit=resubmit
        )

    assert ask(100.0) == "running" and continued == ["1"]
    assert ask(120.0) == "success"  # its continuation's answer
    assert continued == ["1"]


def status_never_continued(conf: dict, query) -> str:
    """Job "1" (submission r0-3) asked about once, on a scheduler ``query``; the test fails
    if it is continued."""
    with pbs.StateStore(conf["state_dir"]).locked() as state:
        state["jobs"]["1"] = pbs.new_job_record(0, "r0-3", pbs.settings.run_id(conf), "capacity")
    return pbs.job_status(
        "1",
        conf,
        query=query,
        now=lambda: 100.0,
        warn=lambda m: None,
        resubmit=lambda *a: pytest.fail("continued"),
    )


def test_no_continuation_beyond_pbs_resubmit(tmp_path):
    assert status_never_continued(settings(tmp_path, resubmit=0), Ended()) == "failed"


def test_no_continuation_of_a_job_pbs_cancel_deleted_during_the_query(tmp_path):
    """pbs-cancel (Ctrl-C) noted the job cancelled and deleted it while this status query
    held the state: the query reads it ended by PBS, and does not continue it."""
    conf = settings(tmp_path)
    store = pbs.StateStore(conf["state_dir"])

    class CancelledDuringTheQuery(Ended):
        def __call__(self, ids):
            store.note_cancelled(["1"])  # what pbs-cancel does without the lock
            return super().__call__(ids)

    assert status_never_continued(conf, CancelledDuringTheQuery()) == "failed"
    assert store.read()["jobs"]["1"]["detail"] == "cancelled (pbs-cancel)"


def test_a_continuation_that_left_out_bad_ranks_fails_naming_them(tmp_path):
    conf = settings(tmp_path)
    with pbs.StateStore(conf["state_dir"]).locked() as state:
        state["jobs"]["2"] = pbs.new_job_record(0, "r0-3.c1", pbs.settings.run_id(conf)) | {
            "attempt": 1,
            "left_out": [3],
        }
    warned = []
    answer = pbs.job_status("2", conf, query=Ended(), now=lambda: 100.0, warn=warned.append)
    assert answer == "failed"
    assert "rank 3 (logs/infer/3.log)" in warned[0]


def test_nothing_left_but_bad_ranks_fails_without_a_continuation(tmp_path):
    conf = settings(tmp_path)
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "submissions.tsv").write_text(
        "2026-12-03 07:00:00\t1\tr0-1\t1\t00:35:00\tcapacity\t0,1\n"
    )
    finish(tmp_path, 0, 1.0, 1.0)
    failure_note.write_failure_note(tmp_path / "x" / "1.log", 1, failure_note.INPUT_FAULT, "bad")
    conf["failed_dir"] = str(tmp_path / "x" / "failed")
    with pbs.StateStore(conf["state_dir"]).locked() as state:
        state["jobs"]["1"] = pbs.new_job_record(0, "r0-1", pbs.settings.run_id(conf)) | {
            "continuing": True,
            "detail": "Exit_status -29 (killed by PBS: walltime exceeded)",
        }
    warned = []
    new = continuation.continue_submission(
        "1", conf, warn=warned.append, submit_fn=lambda *a, **k: pytest.fail("submitted")
    )
    assert new is None
    job = pbs.StateStore(conf["state_dir"]).read()["jobs"]["1"]
    assert (job["state"], job["continuing"]) == ("failed", False)
    assert "rank 1 (logs/infer/1.log)" in warned[0] and "walltime exceeded" in warned[0]


def test_the_local_line_says_what_the_ranks_wait_for():
    p = progress.Progress(total=6)

    def engines():
        return 0, 2, "starting: the ranks wait for them to load the model; logs/engines/h-tile*.log"

    assert progress.local_line(p, 15.0, 10.0, engines) == (
        "progress 0:05 | engines 0/2 ready (starting: the ranks wait for them to load the "
        "model; logs/engines/h-tile*.log) | ranks 0/6 done"
    )
    assert progress.local_line(p, 15.0, 10.0, lambda: None) == "progress 0:05 | ranks 0/6 done"


class ScriptFailed:
    """A scheduler that says job "1" ended with its script's Exit_status 1."""

    def __call__(self, ids):
        return {i: pbs.verdict({"job_state": "F", "Exit_status": 1, "substate": 92}) for i in ids}


@pytest.mark.parametrize("cut_off", [True, False])
def test_a_job_whose_nodes_the_infrastructure_cut_off_is_continued(tmp_path, cut_off):
    """pbs/node.py notes nodes whose Snakemake died and was not brought back, or that
    never reported: the job is continued as one PBS ended; a job whose ranks failed by
    themselves is not."""
    conf = settings(tmp_path, registry_root=str(tmp_path / "engines"))
    if cut_off:
        registry = tmp_path / "engines" / "1"
        node_report.write_note(registry, {"node2": "247 infrastructure: its Snakemake died"})
    with pbs.StateStore(conf["state_dir"]).locked() as state:
        state["jobs"]["1"] = pbs.new_job_record(0, "r0-3", pbs.settings.run_id(conf), "capacity")
    continued = []
    answer = pbs.job_status(
        "1", conf, query=ScriptFailed(), now=lambda: 100.0, warn=lambda m: None,
        resubmit=lambda job_id, conf: continued.append(job_id),
    )  # fmt: skip
    job = pbs.StateStore(conf["state_dir"]).read()["jobs"]["1"]
    if cut_off:
        assert (answer, continued, job["continuing"]) == ("running", ["1"], True)
        assert job["detail"] == (
            "Exit_status 1; ranks cut off by the infrastructure: node2: 247 infrastructure: "
            "its Snakemake died"
        )
    else:
        assert (answer, continued, job["detail"]) == ("failed", [], "Exit_status 1")


def test_a_requeued_job_names_its_lost_node_when_and_what_it_cost(tmp_path):
    """PBS started job "1" again (run_count 2) on node1 and node3: pbsnodes says node2
    is down since 1000 s; its first run on node1 and node2 started at 400 s."""
    conf = settings(tmp_path)
    down = {"nodes": {"node1": {"state": "job-busy"},
                      "node2": {"state": "down", "last_state_change_time": 1000}}}  # fmt: skip

    def run(argv, **kwargs):
        assert argv == ["pbsnodes", "-a", "-F", "json"]
        return subprocess.CompletedProcess(argv, 0, json.dumps(down), "")

    with pbs.StateStore(conf["state_dir"]).locked() as state:
        job = pbs.new_job_record(0, "r0-3", pbs.settings.run_id(conf), "capacity")
        job |= {"hosts": ["node1", "node2"], "started_at": 400.0, "run_count": 1}
        state["jobs"]["1"] = job
    answer = pbs.verdict({"job_state": "R", "run_count": 2, "exec_host": "node1/0+node3/0"})
    assert (answer.hosts, answer.run_count) == (("node1", "node3"), 2)
    warned = []
    node_faults.note_requeue(conf, "1", job, answer, 4000.0, warn=warned.append, run=run)
    (fault,) = faults.read_faults(conf["log_dir"])
    assert (fault.kind, fault.nodes, fault.node_hours) == ("node lost", ("node2",), 2 * 3600 / 3600)
    at = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(1000))
    assert warned == [
        f"pbs-status: job 1 r0-3: PBS requeued it (run 2) after losing node2 at {at}; it runs "
        "again on node1, node3, only its ranks not yet whole; the run it ended cost 2.000 "
        "node-hours (2 nodes)"
    ]
    assert faults.read_faults(conf["log_dir"], since=4001.0) == []


def test_a_warm_job_pbs_reports_finished_with_ranks_not_done_is_continued(tmp_path):
    """PBS ended job "1" (a node of it lost) with Exit_status 0: rank 1 is not whole."""
    conf = settings(tmp_path)
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "submissions.tsv").write_text(
        "2026-12-06 19:45:20\t1\tr0-1\t2\t00:15:00\tcapacity\t0,1\n"
    )
    finish(tmp_path, 0, 1.0, 1.0)
    with pbs.StateStore(conf["state_dir"]).locked() as state:
        state["jobs"]["1"] = pbs.new_job_record(0, "r0-1", pbs.settings.run_id(conf), "capacity")
    continued = []
    finished = {"job_state": "F", "Exit_status": 0, "substate": 92}
    answer = pbs.job_status(
        "1", conf, query=lambda ids: {"1": pbs.verdict(finished)}, now=lambda: 100.0,
        warn=lambda m: None, resubmit=lambda job_id, conf: continued.append(job_id),
    )  # fmt: skip
    assert (answer, continued) == ("running", ["1"])
    job = pbs.StateStore(conf["state_dir"]).read()["jobs"]["1"]
    assert (
        job["detail"] == "Exit_status 0; but 1 of its ranks are not done (rank 1): ended under them"
    )
