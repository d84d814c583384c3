"""The PBS provider (scripts/pbs/, profiles/aurora): fast tests, no scheduler needed.

Scheduler outputs come from tests/data/openpbs/ (recorded on a real OpenPBS 23.06
server) and tests/data/pbspro/ (PBS Pro, written by hand after published outputs: see
its README). Tests against the real scheduler are in tests/test_aurora_runs.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from snakemake import cli as snakemake_cli
from snakemake.settings.enums import Quietness
from snakemake_interface_executor_plugins.settings import ExecMode

import pbs
from formats.settings import from_config
from workflow import aurora_config, wait_until

REPO = Path(__file__).resolve().parents[1]
PROFILE = REPO / "profiles" / "aurora"
PBSPRO = Path(__file__).parent / "data" / "pbspro"
OPENPBS = Path(__file__).parent / "data" / "openpbs"
AURORA_ID = "8101204.aurora-pbs-0001.hostmgmt.cm.aurora.alcf.anl.gov"


def recording(folder: Path, case: str) -> dict:
    return json.loads((folder / f"{case}.json").read_text())


def replay(record: dict):
    """A `run` for query_scheduler/submit that answers with a recorded command result."""

    def run(argv, **kwargs):
        assert isinstance(argv, list), "commands must be argument lists"
        assert not kwargs.get("shell"), "never through a shell"
        if record.get("argv", argv)[:5] != argv[:5]:  # the text form of a recorded JSON answer
            return subprocess.CompletedProcess(argv, 153, "", "qstat: Unknown Job Id")
        return subprocess.CompletedProcess(
            argv, record["returncode"], record["stdout"], record["stderr"]
        )

    return run


def merged_config() -> dict:
    """config/config.yaml with the Aurora profile's aurora.yaml on top (as Snakemake does)."""

    def merge(base, over):
        for key, value in over.items():
            if isinstance(value, dict) and isinstance(base.get(key), dict):
                merge(base[key], value)
            else:
                base[key] = value
        return base

    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    return merge(config, yaml.safe_load((PROFILE / "aurora.yaml").read_text()))


def settings(tmp_path: Path | None = None, **changes) -> dict:
    config = merged_config()
    config["pbs"]["account"] = "MyProject"
    result = pbs.provider_settings(from_config(config))
    result["warm_engines"] = False  # per-rank engines unless a test asks for warm ones
    if tmp_path is not None:
        result["state_dir"] = str(tmp_path / "state")
        result["log_dir"] = str(tmp_path / "logs")
        result["results_dir"] = str(tmp_path / "results")
        result["failed_dir"] = str(tmp_path / "logs-infer-failed")
        result["registry_root"] = str(tmp_path / "engines")
        result["progress_log"] = str(tmp_path / "progress.log")
    result.update(changes)
    return result


def profile_keys() -> dict:
    return yaml.safe_load((PROFILE / "config.yaml").read_text())


# ------------------------------------------- parsing, on a real PBS server's answers


class OpenPbs:
    """A `run` for query_scheduler that answers from what OpenPBS 23.06 printed
    (tests/data/openpbs/): JSON lists only the first of several ids (openpbs issue 2672),
    the text form lists all; unknown ids go to stderr with exit 153."""

    def __init__(self, invalid_json: bool = False):
        self.calls: list[list[str]] = []
        self.invalid_json = invalid_json

    def __call__(self, argv, **kwargs):
        assert isinstance(argv, list) and not kwargs.get("shell"), "argument lists only"
        assert kwargs.get("start_new_session"), "qstat must not get the terminal's Ctrl-C"
        self.calls.append(argv)
        json_form = argv[3:5] == ["-F", "json"]
        ids = argv[5:] if json_form else argv[3:]
        known = [i for i in ids if (OPENPBS / f"text-{i.split('.')[0]}.txt").exists()]
        unknown = [i for i in ids if i not in known]
        stderr = "".join(f"qstat: Unknown Job Id {i}\n" for i in unknown)
        code = 153 if unknown else 0
        if json_form:
            if self.invalid_json:
                out = (OPENPBS / "json-7.json").read_text().replace('"R"', '"R\\q"')
            elif known:
                out = (OPENPBS / f"json-{known[0].split('.')[0]}.json").read_text()
            else:
                out = (OPENPBS / "json-unknown.txt").read_text().split("\n", 1)[1]
                out = out.rsplit("exit", 1)[0]
        else:
            out = "\n".join((OPENPBS / f"text-{i.split('.')[0]}.txt").read_text() for i in known)
        return subprocess.CompletedProcess(argv, code, out, stderr)


@pytest.mark.parametrize(
    ("number", "state", "detail"),
    [
        (0, "success", "Exit_status 0"),
        (2, "failed", "Exit_status -29 (killed by PBS: walltime exceeded)"),
        (3, "failed", "deleted while running (qdel)"),
        (4, "failed", "Exit_status 1"),
        (5, "failed", "held by the system (Hold_Types su)"),
        (7, "running", "job_state R"),
        (9, "running", "job_state Q"),
    ],
)
@pytest.mark.parametrize("form", ["json", "text"])
def test_verdicts_on_recorded_answers(number, state, detail, form):
    path = OPENPBS / (f"json-{number}.json" if form == "json" else f"text-{number}.txt")
    parse = pbs.parse.parse_json if form == "json" else pbs.parse.parse_text
    (job,) = parse(path.read_text()).values()
    answer = pbs.verdict(job)
    assert (answer.state, answer.detail.split("; comment")[0]) == (state, detail)


def test_qdel_while_running_is_failed_although_exit_status_is_0():
    (job,) = pbs.parse.parse_json((OPENPBS / "json-3.json").read_text()).values()
    assert job["Exit_status"] == 0 and job["substate"] == 91
    answer = pbs.verdict(job)
    assert answer.state == "failed" and "terminated by" in answer.detail


def test_text_form_joins_wrapped_values():
    (job,) = pbs.parse.parse_text((OPENPBS / "text-3.txt").read_text()).values()
    assert job["comment"].endswith("and terminated by alice@aurora-uan-0010")
    assert "PBS_O_WORKDIR=/lus/flare/projects/MyProject/run" in job["Variable_List"]
    assert job["Exit_status"] == "0" and job["substate"] == "91"


def test_text_form_lists_every_job_of_a_multi_id_answer():
    jobs = pbs.parse.parse_text((OPENPBS / "text-multi-7-9-0-2.txt").read_text())
    assert list(jobs) == ["7.pbs-head", "9.pbs-head", "0.pbs-head", "2.pbs-head"]
    assert [pbs.verdict(j).state for j in jobs.values()] == [
        "running", "running", "success", "failed"
    ]  # fmt: skip


def test_system_hold_after_failed_attempts_is_failed_and_deleted():
    job = {
        "job_state": "H",
        "Hold_Types": "n",
        "comment": "job held, too many failed attempts to run",
    }
    answer = pbs.verdict(job)
    assert (answer.state, answer.delete) == ("failed", True)
    assert "too many failed attempts" in answer.detail


def test_user_hold_waits_with_a_warning():
    answer = pbs.verdict({"job_state": "H", "Hold_Types": "u", "comment": "Job held by alice"})
    assert (answer.state, answer.held, answer.delete) == ("running", True, False)


def test_multi_id_json_lists_only_the_first_and_text_fills_in_the_rest():
    run = OpenPbs()
    ids = ["7.pbs-head", "9.pbs-head", "0.pbs-head", "2.pbs-head"]
    answers = pbs.query_scheduler(ids, run=run)
    assert {i: a.state for i, a in answers.items()} == {
        "7.pbs-head": "running", "9.pbs-head": "running",
        "0.pbs-head": "success", "2.pbs-head": "failed",
    }  # fmt: skip
    assert run.calls == [
        ["qstat", "-x", "-f", "-F", "json", *ids],
        ["qstat", "-x", "-f", "9.pbs-head", "0.pbs-head", "2.pbs-head"],
    ]


def test_after_a_short_json_answer_later_rounds_ask_the_text_form_only():
    run, memory = OpenPbs(), {}
    ids = ["7.pbs-head", "9.pbs-head"]
    first = pbs.query_scheduler(ids, run=run, memory=memory)
    second = pbs.query_scheduler(ids, run=run, memory=memory)
    assert first == second and len(first) == 2
    assert [call[3] for call in run.calls] == ["-F", "9.pbs-head", "7.pbs-head"]  # 3 calls
    assert memory == {"text_only": "JSON lists fewer jobs than asked for"}


def test_invalid_json_falls_back_to_the_text_form():
    run, logged = OpenPbs(invalid_json=True), []
    answers = pbs.query_scheduler(["7.pbs-head", "3.pbs-head"], run=run, log=logged.append)
    assert {i: a.state for i, a in answers.items()} == {
        "7.pbs-head": "running",
        "3.pbs-head": "failed",
    }
    assert run.calls[1] == ["qstat", "-x", "-f", "7.pbs-head", "3.pbs-head"]
    assert "no valid JSON" in logged[0]


def test_hand_written_invalid_json_is_a_query_error_of_the_parser():
    record = recording(PBSPRO, "qstat_invalid_json")
    with pytest.raises(pbs.QueryError, match="no valid JSON"):
        pbs.parse.parse_json(record["stdout"])


def test_unknown_ids_are_left_out():
    answers = pbs.query_scheduler(["7.pbs-head", "99999.pbs-head"], run=OpenPbs())
    assert list(answers) == ["7.pbs-head"]


def test_all_ids_unknown_is_no_answer_but_a_failure_is_a_query_error():
    assert pbs.query_scheduler(["99999.pbs-head"], run=OpenPbs()) == {}

    def broken(argv, **kwargs):
        return subprocess.CompletedProcess(argv, 2, "", "qstat: cannot connect to server")

    with pytest.raises(pbs.QueryError, match="cannot connect"):
        pbs.query_scheduler(["1.pbs-head"], run=broken)


def test_ids_match_by_sequence_number():
    record = recording(PBSPRO, "qstat_running")
    answers = pbs.query_scheduler(["8101204.aurora-pbs-0001"], run=replay(record))
    assert answers["8101204.aurora-pbs-0001"].detail.startswith("job_state R")


def test_missing_qstat_is_a_query_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(pbs.QueryError, match="qstat not found"):
        pbs.query_scheduler(["1"])


# -------------------------------------------------------------- status and caching


class Scheduler:
    """Answers like query_scheduler, counting the calls (stands in for one qstat call)."""

    def __init__(self, states: dict[str, str]):
        self.states = states
        self.calls: list[list[str]] = []
        self.error: str | None = None

    def __call__(self, ids):
        self.calls.append(list(ids))
        if self.error:
            raise pbs.QueryError(self.error)
        return {i: pbs.Verdict(self.states[i], "x") for i in ids if i in self.states}


class Clock:
    def __init__(self, t=1000.0):
        self.t = t

    def __call__(self):
        return self.t


def submitted(conf: dict, *ids: str, at: float = 1000.0, listed: bool = True) -> None:
    """Jobs as pbs-submit records them; ``listed``: qstat has shown them already."""
    with pbs.StateStore(conf["state_dir"]).locked() as state:
        for job_id in ids:
            record = pbs.new_job_record(at, f"r{job_id}", "run", conf["queue"])
            state["jobs"][job_id] = record | {"listed": listed}


def ask(conf, job_id, scheduler, clock, **kwargs):
    return pbs.job_status(job_id, conf, query=scheduler, now=clock, warn=lambda m: None, **kwargs)


def test_one_scheduler_call_per_round(tmp_path):
    conf = settings(tmp_path, status_interval=10)
    ids = [str(i) for i in range(1, 21)]
    submitted(conf, *ids)
    scheduler, clock = Scheduler(dict.fromkeys(ids, "running")), Clock()
    for _ in range(3):  # three polling rounds, 10 s apart, 20 active jobs each
        assert [ask(conf, i, scheduler, clock) for i in ids] == ["running"] * 20
        clock.t += 10
    assert len(scheduler.calls) == 3
    assert all(sorted(call) == sorted(ids) for call in scheduler.calls)


def test_a_repeated_id_starts_the_next_round(tmp_path):
    conf = settings(tmp_path, status_interval=10)
    submitted(conf, "a", "b")
    scheduler, clock = Scheduler({"a": "running", "b": "running"}), Clock()
    ask(conf, "a", scheduler, clock)
    ask(conf, "b", scheduler, clock)
    clock.t += 6  # older than status_interval / 2
    scheduler.states["b"] = "success"
    assert ask(conf, "b", scheduler, clock) == "success"  # b again: new round
    assert ask(conf, "a", scheduler, clock) == "running"
    assert len(scheduler.calls) == 2


def test_no_query_younger_than_half_the_interval(tmp_path):
    conf = settings(tmp_path, status_interval=10)
    submitted(conf, "a")
    scheduler, clock = Scheduler({"a": "running"}), Clock()
    for _ in range(5):
        ask(conf, "a", scheduler, clock)
        clock.t += 1
    assert len(scheduler.calls) == 1
    clock.t += 1  # now 5 s after the query
    ask(conf, "a", scheduler, clock)
    assert len(scheduler.calls) == 2


def test_new_job_reads_running_until_the_next_query(tmp_path):
    conf = settings(tmp_path, status_interval=10)
    submitted(conf, "a")
    scheduler, clock = Scheduler({"a": "running", "b": "success"}), Clock()
    ask(conf, "a", scheduler, clock)
    submitted(conf, "b", at=clock.t)
    clock.t += 1
    assert ask(conf, "b", scheduler, clock) == "running"  # guard: no query yet
    clock.t += 5
    assert ask(conf, "b", scheduler, clock) == "success"
    assert scheduler.calls == [["a"], ["a", "b"]]


def test_finished_jobs_are_not_queried_again(tmp_path):
    conf = settings(tmp_path, status_interval=10)
    submitted(conf, "a", "b")
    scheduler, clock = Scheduler({"a": "success", "b": "running"}), Clock()
    assert ask(conf, "a", scheduler, clock) == "success"
    assert ask(conf, "b", scheduler, clock) == "running"
    clock.t += 10
    assert ask(conf, "b", scheduler, clock) == "running"  # next round
    assert ask(conf, "a", scheduler, clock) == "success"
    assert scheduler.calls == [["a", "b"], ["b"]]


def test_unknown_to_us_is_still_queried(tmp_path):
    # e.g. Snakemake resuming an incomplete job with its external id from an older run
    conf = settings(tmp_path, status_interval=10)
    scheduler, clock = Scheduler({"old": "success"}), Clock()
    assert ask(conf, "old", scheduler, clock) == "success"


def test_concurrent_calls_query_once(tmp_path):
    conf = settings(tmp_path, status_interval=10)
    ids = [str(i) for i in range(8)]
    submitted(conf, *ids)

    class Slow(Scheduler):
        def __call__(self, ids):
            time.sleep(0.2)
            return super().__call__(ids)

    scheduler, answers = Slow(dict.fromkeys(ids, "running")), []
    threads = [
        threading.Thread(target=lambda i=i: answers.append(ask(conf, i, scheduler, Clock())))
        for i in ids
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert answers == ["running"] * 8
    assert len(scheduler.calls) == 1


# ----------------------------------------------------- bounded transient failures


def poll_rounds(conf, job_id, scheduler, clock, rounds, step=10.0, **bounds):
    answers = []
    for _ in range(rounds):
        answers.append(ask(conf, job_id, scheduler, clock, **bounds))
        clock.t += step
    return answers


def test_scheduler_errors_read_as_running_then_failed(tmp_path):
    conf = settings(tmp_path, status_interval=10)
    submitted(conf, "a")
    scheduler, clock = Scheduler({}), Clock()
    scheduler.error = "qstat: cannot connect to server aurora-pbs-0001"
    # 10 rounds AND 300 s: with 10-s rounds the time bound decides (round 31, at 300 s)
    answers = poll_rounds(conf, "a", scheduler, clock, 32)
    assert answers[:30] == ["running"] * 30
    assert answers[30:] == ["failed"] * 2
    log = (tmp_path / "state" / "status.log").read_text()
    assert "cannot connect to server" in log and "reported as failed" in log


def test_round_bound_applies_when_rounds_are_slow(tmp_path):
    conf = settings(tmp_path, status_interval=60)
    submitted(conf, "a")
    scheduler, clock = Scheduler({}), Clock()  # "a" unknown to the scheduler
    answers = poll_rounds(conf, "a", scheduler, clock, 11, step=60)
    assert answers == ["running"] * 9 + ["failed"] * 2


def test_a_job_pbs_never_lists_fails_soon_naming_the_queue_and_is_deleted(tmp_path):
    conf = settings(tmp_path, status_interval=10, queue="prod")
    submitted(conf, "a", "b", listed=False)
    scheduler, clock, messages, deleted = Scheduler({"b": "running"}), Clock(), [], []
    answers = []
    for _ in range(8):
        answers.append(
            pbs.job_status(
                "a",
                conf,
                query=scheduler,
                now=clock,
                warn=messages.append,
                delete=deleted.append,
            )  # fmt: skip
        )
        clock.t += 10
    # bounded: 4 rounds and 60 s since qsub, then failed and deleted
    assert answers == ["running"] * 6 + ["failed"] * 2
    assert deleted == [["a"]]
    first, message = messages  # reading it as running, then why it failed
    assert "reading it as running" in first
    assert "never listed" in message and "queue 'prod'" in message
    assert "probably refused" in message


def test_a_listed_job_that_goes_missing_is_given_up_and_deleted(tmp_path):
    conf = settings(tmp_path, status_interval=10)
    submitted(conf, "a")
    scheduler, clock, deleted = Scheduler({}), Clock(), []
    for _ in range(3):
        pbs.job_status(
            "a", conf, query=scheduler, now=clock, warn=lambda m: None,
            delete=deleted.append, problem_rounds=3, problem_seconds=0,
        )  # fmt: skip
        clock.t += 10
    assert deleted == [["a"]]


def test_held_by_the_system_is_failed_and_deleted_user_hold_warns_once(tmp_path):
    conf = settings(tmp_path, status_interval=10)
    submitted(conf, "sys", "user")
    failed_attempts = "job held, too many failed attempts to run"
    held = {
        "sys": pbs.verdict({"job_state": "H", "Hold_Types": "s", "comment": failed_attempts}),
        "user": pbs.verdict({"job_state": "H", "Hold_Types": "u", "comment": "Job held by alice"}),
    }
    messages, deleted, clock = [], [], Clock()
    for _ in range(3):
        for job_id in ("sys", "user"):
            answer = pbs.job_status(
                job_id, conf, query=lambda ids: {i: held[i] for i in ids}, now=clock,
                warn=messages.append, delete=deleted.append,
            )  # fmt: skip
            assert answer == ("failed" if job_id == "sys" else "running")
        clock.t += 10
    assert deleted == [["sys"]]
    assert len(messages) == 2
    assert "too many failed attempts" in messages[0]
    assert "held (Hold_Types u)" in messages[1] and "qrls" in messages[1]
    log = (tmp_path / "state" / "status.log").read_text()
    assert "too many failed attempts to run" in log


def test_a_good_answer_resets_the_failure_count(tmp_path):
    conf = settings(tmp_path, status_interval=10)
    submitted(conf, "a")
    scheduler, clock = Scheduler({"a": "running"}), Clock()
    bounds = {"problem_rounds": 3, "problem_seconds": 0}
    scheduler.error = "timeout"
    assert poll_rounds(conf, "a", scheduler, clock, 2, **bounds) == ["running"] * 2
    scheduler.error = None
    assert poll_rounds(conf, "a", scheduler, clock, 1, **bounds) == ["running"]
    scheduler.error = "timeout"
    assert poll_rounds(conf, "a", scheduler, clock, 3, **bounds) == ["running"] * 2 + ["failed"]


def test_unreadable_status_warns_once_then_explains_the_failure(tmp_path):
    conf = settings(tmp_path, status_interval=10)
    submitted(conf, "a")
    scheduler, clock, messages = Scheduler({}), Clock(), []
    for _ in range(4):
        pbs.job_status(
            "a", conf, query=scheduler, now=clock, warn=messages.append,
            problem_rounds=3, problem_seconds=0,
        )  # fmt: skip
        clock.t += 10
    assert len(messages) == 2
    assert "reading it as running" in messages[0]
    assert "failed" in messages[1] and "logs/pbs/ra.log" in messages[1]


# ------------------------------------------------------------- submission planning


def properties(tiles: int, ranks=(), runtime=30, **extra) -> dict:
    """Job properties as Snakemake 9.27.1 writes them for a group job (captured)."""
    outputs = [p for r in ranks for p in (f"results/{r}.out", f"results/records/{r}.json")]
    return {
        "type": "group",
        "groupid": "node",
        "local": False,
        "input": [f"data/{r}.in" for r in ranks],
        "output": outputs,
        "threads": len(ranks),
        "resources": {"tiles": tiles, "runtime": runtime},
        "jobid": "0bf19f0e-cd02-522c-bafd-16de090487a5",
    } | extra


@pytest.mark.parametrize(
    ("tiles", "per_job", "jobs", "nodes"),
    [(13, 1, 13, 2), (8, 2, 4, 1), (48, 1, 48, 4), (12, 1, 12, 1), (1, 1, 1, 1), (24, 2, 12, 2)],
)
def test_nodes_from_tiles(tiles, per_job, jobs, nodes):
    plan = pbs.plan_submission(properties(tiles), settings(tiles_per_job=per_job))
    assert (plan.jobs, plan.nodes) == (jobs, nodes)


def test_too_many_jobs_for_one_submission_are_refused():
    with pytest.raises(pbs.SubmitError, match="would need 5 nodes.*nodes_per_submission is 4"):
        pbs.plan_submission(properties(49), settings())


def test_walltime_is_runtime_plus_margin():
    assert pbs.plan_submission(properties(48, runtime=30), settings()).walltime == "00:40:00"
    plan = pbs.plan_submission(properties(1, runtime=1490), settings(queue="capacity"))
    assert plan.walltime == "25:00:00"


def test_walltime_over_the_queue_limit_is_refused():
    with pytest.raises(pbs.SubmitError, match="exceeds queue 'debug-scaling'"):
        pbs.plan_submission(properties(48, runtime=90), settings(queue="debug-scaling"))


def test_partial_submission_gets_the_queue_minimum():
    plan = pbs.plan_submission(properties(3), settings(queue="debug-scaling"))
    assert plan.nodes == 2


def test_job_names():
    assert pbs.plan_submission(properties(48, range(48)), settings()).name == "r0-47"
    assert pbs.job_name([5], "x") == "r5"
    assert pbs.job_name([3, 9, 40], "x") == "r3-40_3"
    assert pbs.job_name([], "0bf19f0e-cd02") == "snk0bf19f0e"
    long = pbs.job_name(list(range(123456, 123456 + 48, 2)), "x")
    assert len(long) <= 15 and long[0].isalpha()


def test_ranks_come_from_the_out_files_else_the_inputs():
    assert pbs.job_ranks(properties(3, [7, 2, 11])) == [2, 7, 11]
    assert pbs.job_ranks(properties(60, range(60)) | {"output": None}) == list(range(60))
    assert pbs.job_ranks(properties(3) | {"output": None, "input": None}) == []  # > 100 each


def test_missing_tiles_resource_is_refused():
    with pytest.raises(pbs.SubmitError, match="'tiles' resource"):
        pbs.plan_submission({"resources": {"runtime": 3}}, settings())


# ------------------------------------------------------------ jobscript and qsub


def jobscript(props: dict, exec_job="cd /w && python -m snakemake --mode 'remote'") -> str:
    """profiles/aurora/jobscript.sh filled in as Snakemake does (str.format)."""
    template = (PROFILE / "jobscript.sh").read_text()
    return template.format(properties=json.dumps(props), exec_job=exec_job)


def test_jobscript_template_formats_and_keeps_shell_braces():
    text = jobscript(properties(2, [0, 1]))
    assert pbs.read_properties(text)["resources"]["tiles"] == 2
    assert '"${PBS_O_WORKDIR:-.}"' in text
    assert pbs.SETUP_MARKER in text.splitlines()
    assert text.splitlines()[-1].startswith("cd /w && python -m snakemake")


def test_setup_lines_replace_the_marker_before_the_job():
    text = pbs.insert_setup(jobscript(properties(1, [0])), ["module load frameworks", "x=1"])
    lines = text.splitlines()
    assert pbs.SETUP_MARKER not in lines
    assert lines.index("module load frameworks") < lines.index("x=1") < len(lines) - 1
    assert lines.index("set -e") < lines.index("module load frameworks") < lines.index("set +e")
    assert lines[-1].startswith("cd /w && python -m snakemake")


def test_setup_lines_stop_the_job_when_they_fail(tmp_path):
    text = pbs.insert_setup(jobscript(properties(1), exec_job="echo REACHED"), ["false"])
    script = tmp_path / "job.sh"
    script.write_text(text)
    res = subprocess.run(["bash", str(script)], capture_output=True, text=True, cwd=tmp_path)
    assert res.returncode != 0
    assert "REACHED" not in res.stdout
    assert "pbs.setup" in res.stderr


def test_empty_setup_runs_the_job(tmp_path):
    text = pbs.insert_setup(jobscript(properties(1), exec_job="echo REACHED"), [])
    script = tmp_path / "job.sh"
    script.write_text(text)
    res = subprocess.run(["bash", str(script)], capture_output=True, text=True, cwd=tmp_path)
    assert (res.returncode, res.stdout.splitlines()[-1]) == (0, "REACHED")


def test_qsub_argv_keeps_each_setting_one_element():
    tricky = "proj x; rm -rf ~ 'q' \"d\" $(id)"
    conf = settings(account=tricky, queue="my queue", filesystems="home:flare;x", place="scatter")
    plan = pbs.Plan(name="r0-47", jobs=48, nodes=4, walltime="00:40:00", ranks=())
    argv = pbs.qsub_argv(conf, plan, "logs/pbs/r0-47.sh", "logs/pbs/r0-47.log")
    assert argv == [
        "qsub", "-A", tricky, "-q", "my queue",
        "-l", "select=4,walltime=00:40:00,filesystems=home:flare;x,place=scatter",
        "-N", "r0-47", "-j", "oe", "-o", "logs/pbs/r0-47.log", "logs/pbs/r0-47.sh",
    ]  # fmt: skip
    assert argv.count("-l") == 1


def test_submit_runs_qsub_without_shell_and_records_the_job(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    conf = pbs.provider_settings(
        from_config(
            merged_config()
            | {
                "warm_engines": False,
                "pbs": merged_config()["pbs"]
                | {"account": "p; echo injected", "setup": ["module load frameworks"]},
            }
        )
    )
    script = tmp_path / "snakejob.sh"
    script.write_text(jobscript(properties(13, range(13))))
    calls = []

    def run(argv, **kwargs):
        calls.append((argv, kwargs))
        return subprocess.CompletedProcess(argv, 0, "8101204.aurora-pbs-0001.hostmgmt\n", "")

    job_id = pbs.submit(str(script), conf, run=run)
    assert job_id == "8101204.aurora-pbs-0001.hostmgmt"
    (argv, kwargs), = calls  # fmt: skip
    assert "shell" not in kwargs
    assert argv[argv.index("-A") + 1] == "p; echo injected"
    assert argv[argv.index("-l") + 1].startswith("select=2,walltime=00:40:00,")
    assert kwargs["start_new_session"]  # the terminal's Ctrl-C must not reach qsub
    submitted_script = Path(argv[-1])
    # absolute: PBS starts the job in $HOME
    assert submitted_script.parent == tmp_path / "logs" / "pbs"
    assert "module load frameworks" in submitted_script.read_text()
    assert argv[argv.index("-o") + 1] == str(tmp_path / "logs" / "pbs" / "r0-12.log")
    state = pbs.StateStore(tmp_path / ".snakemake" / "pbs").read()
    assert state["jobs"][job_id]["name"] == "r0-12"
    assert state["jobs"][job_id]["run"] == pbs.settings.run_id(conf)
    index = (tmp_path / "logs" / "pbs" / "submissions.tsv").read_text().split("\t")
    assert index[1:4] == [job_id, "r0-12", "2"]


def test_submit_reports_qsub_refusal_with_the_scheduler_message(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    message, code = (OPENPBS / "qsub-prod-4nodes.txt").read_text().splitlines()
    record = {"returncode": int(code.split()[1]), "stdout": "", "stderr": message + "\n"}
    script = tmp_path / "snakejob.sh"
    script.write_text(jobscript(properties(13, range(13))))
    with pytest.raises(pbs.SubmitError) as error:
        pbs.submit(str(script), settings(tmp_path), run=replay(record))
    message = str(error.value)
    assert "qsub refused r0-12 (13 jobs on 2 node(s)" in message
    assert "(exit 188)" in message
    assert "Job violates queue and/or server resource limits" in message
    assert message in (tmp_path / "logs" / "r0-12.log").read_text()


# ---------------------------------------------------------------- export / validate


def test_export_puts_settings_into_the_environment():
    environ = {}
    config = merged_config()
    pbs.export_settings(from_config(config), environ)
    exported = json.loads(environ[pbs.SETTINGS_VARIABLE])
    assert exported == pbs.provider_settings(from_config(config))
    assert exported["state_dir"] == os.path.abspath(".snakemake/pbs")
    assert exported["log_dir"] == os.path.abspath("logs/pbs")
    assert {"account", "queue", "filesystems", "place", "nodes_per_submission"} <= set(exported)
    assert {"walltime_margin_minutes", "setup", "status_interval", "owner"} <= set(exported)
    assert exported["owner"]["pid"] == os.getpid()
    assert {"tiles_per_node", "tiles_per_job"} <= set(exported)


def test_provider_settings_are_the_run_settings_the_commands_read():
    """The provider's settings of the default Aurora config, each value written here from
    the config itself: the wire format pbs-submit, pbs-status and pbs-cancel read."""
    config = aurora_config()
    settings = from_config(config)
    engines = {"engine": "vllm", "listen": "{host}"}
    got = pbs.provider_settings(
        settings, model="org/m", marker="results/model/m.json", owner_pid=os.getpid(),
        engines=engines, settings_file="/run/settings.json",
    )  # fmt: skip
    queue, tiles, warm, weights = config["pbs"], config["tiles"], config["warm"], config["weights"]
    expected = {
        "account": queue["account"], "queue": queue["queue"],
        "filesystems": queue["filesystems"], "place": queue["place"],
        "nodes_per_submission": queue["nodes_per_submission"],
        "walltime_margin_minutes": queue["walltime_margin_minutes"],
        "budget_node_hours": queue.get("budget_node_hours"), "setup": queue["setup"],
        "status_interval": queue["status_interval"], "resubmit": queue["resubmit"],
        "tiles_per_node": tiles["per_node"], "tiles_per_job": tiles["per_job"],
        "tiles_cpu_bind": tiles["cpu_bind"], "runtime_minutes": config["runtime_minutes"],
        "warm_engines": config["warm_engines"], "ranks_per_engine": warm["ranks_per_engine"],
        "ranks_in_flight": warm["ranks_in_flight"],
        "start_minutes": 15 if warm["start_minutes"] is None else warm["start_minutes"],
        "rank_minutes": 1 if warm["rank_minutes"] is None else warm["rank_minutes"],
        "engines": engines, "settings_file": "/run/settings.json", "engine": config["engine"],
        "tiles_hierarchy": tiles["hierarchy"], "state_dir": os.path.abspath(".snakemake/pbs"),
        "log_dir": os.path.abspath("logs/pbs"),
        "stage": weights["stage"] and config["engine"] != "echo", "model": "org/m",
        "model_marker": os.path.abspath("results/model/m.json"),
        "stage_dir": weights["stage_dir"], "broadcast_host": weights["broadcast_host"],
        "node_launcher": config["node_launcher"], "data_dir": config["data_dir"],
        "results_dir": os.path.abspath(config["results_dir"]),
        "registry_root": os.path.abspath("logs/engines"),
        "failed_dir": os.path.abspath("logs/infer/failed"),
        "progress_log": os.path.abspath("logs/progress.log"),
        "task_python": config["python"] or sys.executable, "python": sys.executable,
        "owner": {"pid": os.getpid(), "start": got["owner"]["start"]},
    }  # fmt: skip
    assert got == expected
    assert got["owner"]["start"] and pbs.settings.owner_alive(got)
    # the Python of the inference: the one the run's settings derived, config python's
    assert got["task_python"] == settings.inference_python == "python3"  # aurora.yaml's
    other = pbs.provider_settings(from_config(aurora_config(python="/x/python")))
    assert other["task_python"] == "/x/python"
    unset = pbs.provider_settings(from_config(aurora_config(python="")))
    assert unset["task_python"] == sys.executable  # the one running Snakemake


AURORA_RUN = pbs.RunInfo(configfiles=(str(PROFILE / "aurora.yaml"),), jobs=10, cores=480)


def test_profile_is_recognised_by_its_config_file():
    assert pbs.profile_in_use([PROFILE / "aurora.yaml"])
    assert not pbs.profile_in_use([REPO / "config" / "config.yaml"])
    assert not pbs.profile_in_use([])


def test_missing_account_fails_only_with_the_profile():
    config = merged_config()
    assert config["pbs"]["account"] == ""
    pbs.export_settings(from_config(config), {}, workflow=pbs.RunInfo())  # another profile: fine
    with pytest.raises(pbs.PbsConfigError, match=r"pbs\.account is empty.*--config"):
        pbs.export_settings(from_config(config), {}, workflow=AURORA_RUN)


def problems(**changes) -> str:
    return "\n".join(pbs.settings_problems(settings(**changes), jobs=1))


def test_queue_limits():
    assert problems() == ""  # the profile's own defaults are valid
    assert "pbs.nodes_per_submission (4) is outside queue 'debug'" in problems(queue="debug")
    assert "00:40:00" not in problems(queue="debug", nodes_per_submission=2)
    assert "outside queue 'debug-scaling'" in problems(
        queue="debug-scaling", nodes_per_submission=1
    )
    assert "walltime 01:10:00" in problems(
        queue="debug", nodes_per_submission=1, runtime_minutes=60
    )
    assert "runtime_minutes" in problems(queue="debug", nodes_per_submission=1, runtime_minutes=60)
    assert (
        problems(queue="capacity", nodes_per_submission=16, runtime_minutes=7 * 24 * 60 - 10) == ""
    )
    assert "capacity" in problems(queue="capacity", nodes_per_submission=17)
    assert problems(queue="somewhere-else", nodes_per_submission=9999, runtime_minutes=99999) == ""


def test_one_job_queues_need_jobs_1():
    conf = settings(queue="debug-scaling")
    assert pbs.settings_problems(conf, jobs=1) == []
    (message,) = pbs.settings_problems(conf, jobs=10)
    assert "--jobs 1" in message


def test_tiles_per_job_must_fit_a_node():
    assert "tiles.per_job (13)" in problems(tiles_per_job=13)


def test_validation_error_is_a_value_error_naming_keys():
    with pytest.raises(ValueError, match="pbs.nodes_per_submission"):
        pbs.check_settings(settings(queue="debug"))


def test_group_packing():
    conf = settings()
    assert pbs.expected_group_size(conf) == 48
    assert pbs.group_packing_problems({"node": 48}, conf, cores=480) == []
    (wrong,) = pbs.group_packing_problems({"node": 12}, conf)
    assert "node=12" in wrong and "group-components: {node: 48}" in wrong
    (missing,) = pbs.group_packing_problems({}, conf)
    assert "no node= entry" in missing
    (cores,) = pbs.group_packing_problems({"node": 48}, conf, cores=8)
    assert "cores is 8" in cores
    assert pbs.expected_group_size(settings(tiles_per_job=2, nodes_per_submission=2)) == 12


# ----------------------------------------------------------------- profile files


def test_profile_agrees_with_its_settings():
    keys, conf = profile_keys(), settings(warm_engines=merged_config()["warm_engines"])
    assert keys["executor"] == "cluster-generic"
    assert keys["group-components"] == {"node": pbs.expected_group_size(conf)}
    assert keys["cores"] >= pbs.expected_group_size(conf)
    assert keys["seconds-between-status-checks"] == conf["status_interval"]
    assert keys["keep-incomplete"] is True and keys["keep-going"] is True
    assert keys["cluster-generic-cancel-nargs"] >= keys["jobs"]
    assert pbs.settings_problems(conf, jobs=keys["jobs"]) == []
    for key in ("submit", "status", "cancel"):
        command = PROFILE / keys[f"cluster-generic-{key}-cmd"]
        assert command.is_file() and os.access(command, os.X_OK)
    assert (PROFILE / keys["jobscript"]).is_file()
    assert (PROFILE / keys["configfile"]).is_file()
    assert not (REPO / "profiles" / "default").exists()


def test_aurora_defaults():
    config = merged_config()
    assert config["tiles"]["cpu_bind"] == [
        "1-8", "9-16", "17-24", "25-32", "33-40", "41-48",
        "53-60", "61-68", "69-76", "77-84", "85-92", "93-100",
    ]  # fmt: skip
    assert config["launcher"] == [
        "mpiexec", "-n", "1", "--hosts", "{host}", "--cpu-bind", "list:{cpus}", "--no-vni"
    ]  # fmt: skip
    assert config["node_launcher"] == ["mpiexec", "-n", "{nodes}", "--ppn", "1", "--no-vni"]
    assert config["weights"] == {
        "shared_hf_home": "/flare/datasets/model-weights",
        "hf_home": "cache/huggingface",
        "stage": True,
        "stage_dir": "/tmp",
        "broadcast_host": "{short}.hsn.cm.aurora.alcf.anl.gov",
    }
    assert config["pbs"]["queue"] == "capacity"
    assert "module load frameworks" in config["pbs"]["setup"]
    # warm engines: one mpiexec per submission, 12 engines per node, ALCF's vLLM settings
    assert config["warm_engines"] is True
    assert config["engine_launcher"] == [
        "mpiexec", "-n", "{engines}", "--ppn", "{engines_per_node}",
        "--cpu-bind", "list:{cpu_lists}", "--no-vni",
    ]  # fmt: skip
    assert config["vllm"]["enforce_eager"] is True
    # module frameworks/2025.3.1 needs no extra variable (profiles/aurora/aurora.yaml)
    assert config["task_env"] == {}


# ------------------------------------------------ the commands, run as Snakemake does


def command_env(conf: dict | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != pbs.SETTINGS_VARIABLE}
    if conf is not None:
        env[pbs.SETTINGS_VARIABLE] = json.dumps(conf)
    return env


def test_submit_command_without_account_explains(tmp_path):
    conf = settings(tmp_path, account="")
    script = tmp_path / "job.sh"
    script.write_text(jobscript(properties(1, [0])))
    res = subprocess.run(
        f'{PROFILE / "pbs-submit"} "{script}"',
        shell=True,
        capture_output=True,
        text=True,
        env=command_env(conf),
        cwd=tmp_path,
    )  # fmt: skip  (the plugin's own call, through a shell)
    assert res.returncode == 1
    assert "pbs.account is empty" in res.stderr
    assert res.stdout == ""  # no job id


def test_commands_need_the_exported_settings(tmp_path):
    res = subprocess.run(
        [PROFILE / "pbs-submit", tmp_path / "job.sh"], capture_output=True, text=True,
        env=command_env(None),
    )  # fmt: skip
    assert res.returncode == 1 and pbs.SETTINGS_VARIABLE in res.stderr


def test_status_command_reads_a_broken_scheduler_as_running(tmp_path):
    conf = settings(tmp_path)
    bin_dir = tmp_path / "bin"  # python3 but no qstat on PATH: a failed query
    bin_dir.mkdir()
    (bin_dir / "python3").symlink_to(sys.executable)
    res = subprocess.run(
        f"{PROFILE / 'pbs-status'} '{AURORA_ID}'", shell=True, capture_output=True,
        text=True, env=command_env(conf) | {"PATH": f"{bin_dir}:/usr/bin:/bin"}, cwd=tmp_path,
    )  # fmt: skip
    assert (res.returncode, res.stdout) == (0, "running\n")
    assert AURORA_ID in (tmp_path / "state" / "status.log").read_text()


def test_status_command_needs_only_the_standard_library(tmp_path):
    # The system Python has none of the venv's packages.
    system_python = "/usr/bin/python3"
    if not os.path.exists(system_python):
        pytest.skip("no system python3")
    conf = settings(tmp_path) | {"python": sys.executable}
    res = subprocess.run(
        [system_python, PROFILE / "pbs-status", "1"], capture_output=True, text=True,
        env=command_env(conf), cwd=tmp_path,
    )  # fmt: skip
    assert (res.returncode, res.stdout) == (0, "running\n"), res.stderr


def test_cancel_skips_finished_jobs_and_returns_in_time(tmp_path):
    conf = settings(tmp_path)
    submitted(conf, "1", "2", "3")
    with pbs.StateStore(conf["state_dir"]).locked() as state:
        state["jobs"]["2"]["state"] = "success"
    started, processes = [], []

    def popen(argv, **kwargs):  # a qdel that never ends by itself
        started.append(argv)
        assert kwargs["start_new_session"]  # killing pbs-cancel does not stop qdel
        processes.append(subprocess.Popen(["sleep", "600"], **kwargs))
        return processes[-1]

    try:
        assert pbs.cancel(["1", "2", "3"], conf, popen=popen) == ["1", "3"]
        # returned with qdel still running: it waited CANCEL_WAIT, below the 2 s after
        # which the executor plugin kills a cancel command
        assert processes[0].poll() is None and pbs.status.CANCEL_WAIT < 2
    finally:
        for process in processes:
            process.kill()
            process.wait()
    assert started == [["qdel", "1", "3"]]
    assert "qdel 1 3" in (tmp_path / "state" / "cancel.log").read_text()
    assert pbs.cancel(["2"], conf, popen=popen) == []


def test_cancel_qdels_first_while_a_status_query_holds_the_state(tmp_path):
    """A status query holds the state for its whole qstat; the plugin kills pbs-cancel
    after 2 s: past CANCEL_LOCK_S the jobs are noted cancelled beside the state, qdel
    goes, and they are marked cancelled (not to be continued) once the query lets go."""
    conf = settings(tmp_path)
    submitted(conf, "1", "2")
    store = pbs.StateStore(conf["state_dir"])
    qdels, query_over = [], threading.Event()

    def popen(argv, **kwargs):
        qdels.append((argv, query_over.is_set()))
        return subprocess.Popen(["true"], **kwargs)

    def status_query():  # holds the state until the qdel has gone
        with store.locked():
            holding.set()
            wait_until(lambda: qdels, timeout=10)
            query_over.set()

    holding = threading.Event()
    query = threading.Thread(target=status_query)
    query.start()
    holding.wait(5)
    try:
        assert pbs.cancel(["1", "2"], conf, popen=popen) == ["1", "2"]
    finally:
        query.join(10)
    assert qdels == [(["qdel", "1", "2"], False)]  # sent while the query held the state
    # noted beside the state for the watchdog and the next status round, had the plugin
    # killed pbs-cancel before the query let go
    assert store.cancelled() == {"1", "2"}
    jobs = store.read()["jobs"]
    assert [jobs[i]["detail"] for i in "12"] == ["cancelled (pbs-cancel)"] * 2
    assert not any(jobs[i]["continuing"] for i in "12")


def test_cancel_command_exits_0_even_without_qdel(tmp_path):
    conf = settings(tmp_path)
    bin_dir = tmp_path / "bin"  # python3 but no qdel on PATH
    bin_dir.mkdir()
    (bin_dir / "python3").symlink_to(sys.executable)
    res = subprocess.run(
        [PROFILE / "pbs-cancel", "999999"], capture_output=True, text=True,
        env=command_env(conf) | {"PATH": str(bin_dir)}, cwd=tmp_path, timeout=5,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert "qdel could not start" in (tmp_path / "state" / "cancel.log").read_text()


# -------------------------------------------------------------- the dry run's plan


@pytest.mark.parametrize(
    ("pending", "changes", "plan"),
    [
        (13, {}, [(13, 2)]),  # 13 one-tile ranks: one submission, 2 nodes
        (48, {}, [(48, 4)]),
        (100, {}, [(48, 4), (48, 4), (4, 1)]),
        (4, {"tiles_per_job": 2}, [(4, 1)]),  # 6 two-tile jobs per node
        (30, {"tiles_per_job": 2}, [(24, 4), (6, 1)]),
        (49, {"queue": "debug-scaling"}, [(48, 4), (1, 2)]),  # its minimum is 2 nodes
        (5, {"nodes_per_submission": 1, "tiles_per_node": 4}, [(4, 1), (1, 1)]),
        (0, {}, []),
    ],
)
def test_plan_run(pending, changes, plan):
    assert pbs.plan_run(pending, settings(**changes)) == plan


@pytest.mark.parametrize(
    ("pending", "changes", "text"),
    [
        (48, {}, "48 rank job(s) -> 1 submission(s) to queue 'capacity' (1 x 4 node(s)), "
                 "walltime 00:40:00 each, at most 2.67 node-hours"),
        (100, {}, "100 rank job(s) -> 3 submission(s) to queue 'capacity' (2 x 4 node(s), "
                  "1 x 1 node(s)), walltime 00:40:00 each, at most 6.00 node-hours; 2 in "
                  "the system or running at once, the rest wait; 8 tile(s) idle (the last "
                  "submission is not full)"),
        (49, {"queue": "debug-scaling"}, "49 rank job(s) -> 2 submission(s) to queue "
         "'debug-scaling' (1 x 4 node(s), 1 x 2 node(s)), walltime 00:40:00 each, at most "
         "4.00 node-hours; 1 in the system or running at once, the rest wait; 23 tile(s) "
         "idle (the last submission is not full)"),
        (13, {"runtime_minutes": 50}, "13 rank job(s) -> 1 submission(s) to queue "
         "'capacity' (1 x 2 node(s)), walltime 01:00:00 each, at most 2.00 node-hours; "
         "11 tile(s) idle (the last submission is not full)"),
        (10000, {"queue": "prod", "nodes_per_submission": 256}, "10000 rank job(s) -> 4 "
         "submission(s) to queue 'prod' (4 x 256 node(s)), walltime 00:40:00 each, at most "
         "682.67 node-hours; 2288 tile(s) idle (the last submission is not full)"),
    ],
)  # fmt: skip
def test_describe_plan(pending, changes, text):
    assert pbs.describe_plan(pending, settings(**changes)) == f"PBS plan: {text}"


def test_describe_plan_with_nothing_pending():
    assert pbs.describe_plan(0, settings()) == "PBS plan: nothing to submit."


# ---------------------------------------------------------- Aurora's queues (2026)

# queue: (nodes ok, nodes refused, longest walltime ok in minutes, user jobs allowed)
QUEUE_TABLE = {
    "debug": ((1, 2), (0, 3), 60, 1),
    "debug-scaling": ((2, 256), (1, 257), 60, 1),
    "capacity": ((1, 16), (0, 17), 168 * 60, 5),
    "prod": ((256, 10624), (255, 10625), 12 * 60, 100),
}


@pytest.mark.parametrize("queue", sorted(QUEUE_TABLE))
def test_queue_table_both_sides_of_each_boundary(queue):
    (low, high), (below, above), longest, jobs = QUEUE_TABLE[queue]
    assert pbs.queue_problems(queue, low, 5, jobs) == []
    assert pbs.queue_problems(queue, high, 5, jobs) == []
    for nodes in (below, above):
        (problem,) = pbs.queue_problems(queue, nodes, 5, jobs)
        assert f"pbs.nodes_per_submission ({nodes})" in problem and queue in problem
    assert pbs.queue_problems(queue, low, longest, jobs) == []
    (too_long,) = pbs.queue_problems(queue, low, longest + 1, jobs)
    assert "walltime" in too_long and "runtime_minutes" in too_long
    (too_short,) = pbs.queue_problems(queue, low, 4, jobs)
    assert "walltime 00:04:00" in too_short
    (too_many,) = pbs.queue_problems(queue, low, 5, jobs + 1)
    assert f"--jobs {jobs}" in too_many and "profile key jobs" in too_many


@pytest.mark.parametrize(
    ("nodes", "longest", "route"),
    [(256, 12 * 60, "small"), (1024, 12 * 60, "small"), (1025, 18 * 60, "medium"),
     (1999, 18 * 60, "medium"), (2000, 24 * 60, "large"), (10624, 24 * 60, "large")],
)  # fmt: skip
def test_prod_walltime_follows_its_routing(nodes, longest, route):
    assert pbs.queue_problems("prod", nodes, longest, 1) == []
    (problem,) = pbs.queue_problems("prod", nodes, longest + 1, 1)
    assert f"execution queue {route!r}" in problem


def test_prod_refuses_the_seed_shape_and_says_what_to_use():
    (problem,) = pbs.queue_problems("prod", 4, 40, 5)
    assert "256 nodes or more" in problem and "capacity" in problem


def test_default_profile_plan_is_accepted_by_its_queue():
    conf = settings()
    assert conf["queue"] == "capacity" and conf["nodes_per_submission"] == 4
    assert pbs.settings_problems(conf, jobs=profile_keys()["jobs"]) == []
    assert profile_keys()["jobs"] == 5


# ------------------------------------------------------------------------ watchdog


def test_watchdog_deletes_the_open_submissions_of_its_run_when_snakemake_is_gone(tmp_path):
    owner = subprocess.Popen(["sleep", "60"])
    conf = pbs.provider_settings(from_config(merged_config()), owner_pid=owner.pid)
    conf |= {"state_dir": str(tmp_path / "state")}
    run = pbs.settings.run_id(conf)
    with pbs.StateStore(conf["state_dir"]).locked() as state:
        state["jobs"]["1.s"] = pbs.new_job_record(0, "r0", run)  # open, this run
        state["jobs"]["2.s"] = pbs.new_job_record(0, "r1", run) | {"state": "success"}
        state["jobs"]["3.s"] = pbs.new_job_record(0, "r2", "another-run")
        state["jobs"]["4.s"] = pbs.new_job_record(0, "r3", run)  # open, but pbs-cancel
    pbs.StateStore(conf["state_dir"]).note_cancelled(["4.s"])  # deleted it already
    started, result = [], []

    def popen(argv, **kwargs):
        started.append(argv)
        return subprocess.Popen(["true"], **kwargs)

    watcher = threading.Thread(
        target=lambda: result.append(pbs.watch(conf, popen=popen, interval=0.05))
    )
    watcher.start()
    time.sleep(0.3)
    assert watcher.is_alive() and started == []  # Snakemake still runs: nothing deleted
    # a second watchdog for the same run steps aside at once
    assert pbs.watch(conf, popen=popen, interval=0.05) == []
    owner.kill()
    owner.wait()
    watcher.join(timeout=5)
    assert result == [["1.s"]]
    assert started == [["qdel", "1.s"]]
    assert "watchdog: Snakemake" in (tmp_path / "state" / "status.log").read_text()
    jobs = pbs.StateStore(conf["state_dir"]).read()["jobs"]
    assert jobs["1.s"]["state"] == "failed" and jobs["3.s"]["state"] == "running"


def test_run_id_names_one_process_even_if_its_pid_is_reused():
    conf = pbs.provider_settings(from_config(merged_config()))
    assert pbs.settings.owner_alive(conf)
    conf["owner"] = conf["owner"] | {"start": "1"}  # same pid, another start time
    assert not pbs.settings.owner_alive(conf)


# ------------------------------------------------------ warm engines in submissions


def warm(tmp_path: Path | None = None, **changes) -> dict:
    """The Aurora profile's settings: warm engines, 10 ranks per engine."""
    return settings(tmp_path, warm_engines=True, **changes)


@pytest.mark.parametrize(
    ("pending", "changes", "text"),
    [
        (480, {}, "480 rank job(s) -> 1 submission(s) to queue 'capacity' with warm "
                  "engines: 1 x (4 node(s), 48 engines, 480 ranks, 120 per node, 10 per "
                  "engine, walltime 00:35:00); at most 2.33 node-hours"),
        (1000, {}, "1000 rank job(s) -> 3 submission(s) to queue 'capacity' with warm "
                   "engines: 2 x (4 node(s), 48 engines, 480 ranks, 120 per node, 10 per "
                   "engine, walltime 00:35:00), 1 x (1 node(s), 12 engines, 40 ranks, 40 per "
                   "node, 4 per engine, walltime 00:29:00); at most 5.15 node-hours; 2 in "
                   "the system or running at once, the rest wait"),
        # prod: 256 nodes = 3,072 engines per submission
        (10000, {"queue": "prod", "nodes_per_submission": 256}, "10000 rank job(s) -> 1 "
         "submission(s) to queue 'prod' with warm engines: 1 x (256 node(s), 3072 engines, "
         "10000 ranks, 40 per node, 4 per engine, walltime 00:29:00); at most 123.73 node-hours"),
    ],
)  # fmt: skip
def test_describe_plan_with_warm_engines(pending, changes, text):
    assert pbs.describe_plan(pending, warm(**changes)) == f"PBS plan: {text}"


def test_warm_packing_counts_ranks_per_engine():
    conf = warm(nodes_per_submission=4)
    assert pbs.expected_group_size(conf) == 480
    problems = pbs.group_packing_problems({"node": 48}, conf, cores=2400)
    assert problems and "x 10 ranks per engine (warm.ranks_per_engine)" in problems[0]
    assert pbs.group_packing_problems({"node": 480}, conf, cores=2400) == []


def test_warm_walltime_beyond_the_queue_names_the_warm_keys():
    conf = warm(queue="debug", nodes_per_submission=1, ranks_per_engine=60)
    (problem,) = pbs.settings_problems(conf)
    assert "warm.start_minutes + warm.ranks_per_engine x warm.rank_minutes" in problem


def test_warm_submission_plan_and_job_script(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    conf = warm(tmp_path, engines={"engine": "echo", "registry_root": str(tmp_path)})
    conf["setup"] = ["module load frameworks"]
    conf["settings_file"] = "/w/.snakemake/settings/0123.json"
    targets = " ".join(f"'infer:rank={r}'" for r in range(130))
    exec_job = f"cd /w && python -m snakemake --target-jobs {targets} --cores 2400 --mode 'remote'"
    text = jobscript(properties(130, ()), exec_job)
    script = tmp_path / "snakejob.sh"
    script.write_text(text)
    calls = []

    def run(argv, **kwargs):
        calls.append(argv)
        return subprocess.CompletedProcess(argv, 0, "12.pbs\n", "")

    pbs.submit(str(script), conf, run=run)
    (argv,) = calls
    # 130 ranks at 10 per engine: 2 nodes (24 engines), 6 ranks per engine
    assert argv[argv.index("-l") + 1].startswith("select=2,walltime=00:31:00,")
    # the name comes from the targets when Snakemake leaves the file lists out
    assert argv[argv.index("-N") + 1] == "r0-129"
    submitted = Path(argv[-1]).read_text()
    lines = submitted.splitlines()
    launch = next(i for i, line in enumerate(lines) if " launch " in line)
    assert lines[launch].endswith(f"supervisor.py launch {tmp_path}/logs/r0-129.engines.json &")
    # the group job's one Snakemake is replaced by one Snakemake per node
    (ranks,) = [line for line in lines if " ranks " in line]
    assert ranks.endswith(
        f"node.py ranks {tmp_path}/logs/r0-129.engines.json {tmp_path}/logs/r0-129.nodes.json"
    )
    assert "-m snakemake" not in submitted
    assert lines.index("module load frameworks") < launch < lines.index(ranks)
    # the node Snakemakes read the run's settings file (formats/settings.py)
    export = lines.index("export WORKFLOW_SETTINGS=/w/.snakemake/settings/0123.json")
    assert lines.index("module load frameworks") < export < lines.index(ranks)
    trap = next(line for line in lines if line.startswith("trap ") and "stop" in line)
    assert "supervisor.py stop" in trap and trap.endswith(" EXIT")
    nodes = json.loads((tmp_path / "logs" / "r0-129.nodes.json").read_text())
    assert nodes["workdir"] == "/w"
    # threads, 12 engines x 4 ranks in flight per node, after Snakemake's own --cores;
    # each node gets its own --target-jobs
    assert nodes["argv"] == [
        "python", "-m", "snakemake", "--cores", "2400", "--force-use-threads", "--keep-going",
        "--cores", "48", "--scheduler", "greedy", "--max-jobs-per-timespan", "100000/1s",
        "--scheduler-subsample", "48", "--default-resources", "mem_mb=0", "disk_mb=0",
        "--quiet", "progress", "rules", "--mode", "remote",
    ]  # fmt: skip
    # no rank files here: one prompt each, 65 ranks per node, every rank once
    assert [len(share) for share in nodes["shares"]] == [65, 65]
    assert sorted(r for share in nodes["shares"] for r in share) == list(range(130))
    spec = json.loads((tmp_path / "logs" / "r0-129.engines.json").read_text())
    assert (spec["engine"], spec["model"], spec["stage"]) == ("echo", "", False)


def test_node_shares_balance_prompts_not_rank_numbers():
    # rank 0 holds as many prompts as ranks 1-9 together
    weights = {0: 9, **{r: 1 for r in range(1, 10)}}
    assert pbs.submission.node_shares(weights, 2) == [[0], list(range(1, 10))]
    weights = {r: 1 + r % 7 for r in range(1000)}
    loads = [sum(weights[r] for r in s) for s in pbs.submission.node_shares(weights, 4)]
    assert max(loads) - min(loads) <= 1


def test_the_group_jobs_command_is_split_without_a_shell():
    line = (
        "cd '/w/my run' && /v/bin/python3 -m snakemake --snakefile '/w/my run/Snakefile' "
        "--target-jobs 'infer:rank=0' 'infer:rank=1' --cores all --mode remote "
        "&& exit 0 || exit 1"
    )
    number, workdir, argv = pbs.submission.exec_job_argv(f"#!/bin/bash\n# x\n{line}\n")
    assert (number, workdir) == (2, "/w/my run")
    assert argv[:5] == ["/v/bin/python3", "-m", "snakemake", "--snakefile", "/w/my run/Snakefile"]
    node = pbs.submission.node_argv(argv, 48)
    assert "--target-jobs" not in node and "infer:rank=0" not in node
    assert node[-2:] == ["--mode", "remote"]
    # what Snakemake makes of it: the node's options win over the group job's
    _, args = snakemake_cli.parse_args(node[3:])
    assert (args.cores, args.scheduler, args.scheduler_subsample) == (48, "greedy", 48)
    assert (args.max_jobs_per_timespan.max_jobs, args.mode) == (100000, ExecMode.REMOTE)
    assert (args.keep_going, args.force_use_threads) == (True, True)
    assert args.quiet == {Quietness.PROGRESS, Quietness.RULES}
    # constants: no rank's input size evaluated for them
    sized = [args.default_resources[name] for name in ("mem_mb", "disk_mb")]
    assert [(r.is_evaluable(), r.value) for r in sized] == [(False, 0), (False, 0)]
    with pytest.raises(pbs.SubmitError, match="pre-commands"):
        pbs.submission.exec_job_argv("cd /w && export A='1' && python -m snakemake --mode remote")
    with pytest.raises(pbs.SubmitError, match="no --mode"):
        pbs.submission.node_argv(["python", "-m", "snakemake", "--cores", "4"], 8)


def test_a_job_ended_with_exit_status_0_but_failed_is_ended_by_pbs():
    """OpenPBS 23.06 (2026-12-06): a sister node's mom, lost and started again, no longer
    knew the job; its first mom ended it, and PBS reported Exit_status 0, substate 93."""
    comment = "Job run at Sun Dec 06 at 19:45 on (node1:ncpus=1)+(node2:ncpus=1)"
    job = {"job_state": "F", "Exit_status": 0, "substate": 93, "comment": comment}
    answer = pbs.verdict(job)
    assert (answer.state, answer.ended_by_pbs) == ("failed", True)
    assert answer.detail.startswith("ended by PBS with Exit_status 0 and substate 93")
    finished = {"job_state": "F", "Exit_status": 0, "substate": 92, "comment": "... and finished"}
    assert pbs.verdict(finished).state == "success"
