"""Status and cancellation: one scheduler query per polling round for all jobs of the
run, cached in ``.snakemake/pbs/`` under a file lock; qdel for jobs that are given up,
held for good, cancelled, or left behind by a Snakemake that is gone (`watch`).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path

from formats import failure_note
from formats import record as rank_record
from formats.files import write_atomic
from formats.registry import registry_dir
from reporting import progress  # stdlib only, like this package (scripts/ is on the path)

from .continuation import continue_submission
from .node_faults import cut_off_by_infrastructure, note_requeue, ranks_left
from .parse import (
    FAILED,
    FINAL,
    RUNNING,
    SUCCESS,
    QueryError,
    Verdict,
    match_ids,
    parse_json,
    parse_text,
    verdict,
)
from .settings import LOG_DIR, QUERY_TIMEOUT, owner_alive, run_id
from .state import (
    StateStore,
    new_job_record,
    no_submission_under_way,
    submission_ranks,
)

# A job whose status cannot be read (qstat fails, bad output, unknown id) is reported
# as running until this many consecutive rounds AND seconds have failed, then failed.
PROBLEM_ROUNDS = 10
PROBLEM_SECONDS = 300
# A job that qstat -x has never listed since qsub accepted it: PBS dropped it (a known
# PBS bug with jobs that break a queue's limits). Failed after this many rounds/seconds.
VANISH_ROUNDS = 4
VANISH_SECONDS = 60
CANCEL_WAIT = 1.5  # seconds pbs-cancel waits for qdel (the plugin kills it after 2 s)
CANCEL_LOCK_S = 0.3  # seconds pbs-cancel waits for the state before it qdels anyway
FORGET_SECONDS = 7 * 24 * 3600  # drop state entries not touched for a week
WATCH_INTERVAL = 1.0  # seconds between the watchdog's looks at the main Snakemake


# ---------------------------------------------------------------------------- query


def _qstat(argv: Sequence[str], run) -> subprocess.CompletedProcess:
    try:
        # Its own session: the terminal's Ctrl-C must not kill it halfway.
        return run(
            list(argv),
            capture_output=True,
            text=True,
            timeout=QUERY_TIMEOUT,
            start_new_session=True,
        )
    except FileNotFoundError as error:
        raise QueryError(f"{argv[0]} not found: {error}") from error
    except (OSError, subprocess.TimeoutExpired) as error:
        raise QueryError(f"{argv[0]} failed: {error}") from error


def _ask(ids: Sequence[str], form: str, run) -> dict[str, dict]:
    """{id: attributes} for the ids qstat knows, in JSON or text form."""
    argv = ["qstat", "-x", "-f", *(["-F", "json"] if form == "json" else []), *ids]
    result = _qstat(argv, run)
    if not result.stdout.strip():
        complaints = [line for line in result.stderr.splitlines() if line.strip()]
        if result.returncode != 0 and not all("Unknown Job Id" in c for c in complaints):
            raise QueryError(
                f"{' '.join(argv[:5])} exited {result.returncode}: {result.stderr.strip()[:300]}"
            )
        return {}  # every id unknown (exit 153, "qstat: Unknown Job Id ..." on stderr)
    # A non-zero exit with output: qstat -x names unknown ids on stderr, prints the rest.
    jobs = parse_json(result.stdout) if form == "json" else parse_text(result.stdout)
    return match_ids(ids, jobs)


def query_scheduler(
    ids: Sequence[str],
    *,
    run=subprocess.run,
    log: Callable[[str], None] = lambda m: None,
    memory: dict | None = None,
) -> dict[str, Verdict]:
    """What PBS says of ``ids`` -> {id: Verdict} for the ids it knows.

    ``qstat -x -f -F json`` first. When it prints invalid JSON (seen on PBS Pro), or
    lists fewer jobs than asked for (OpenPBS 23.06 lists only the first of several
    ids: openpbs issue 2672), the plain text form is asked for the rest in the same
    round. Raises QueryError when the scheduler could not be asked at all.

    ``memory`` (the status store's state) remembers a JSON form that fell short:
    later rounds then ask in the text form only, one call per round again.
    """
    if not ids:
        return {}
    memory = {} if memory is None else memory
    jobs: dict[str, dict] = {}
    if not memory.get("text_only"):
        try:
            jobs = _ask(ids, "json", run)
        except QueryError as error:
            log(f"qstat -F json: {error}; asking for the text form")
            memory["text_only"] = "invalid JSON"
    missing = [i for i in ids if i not in jobs]
    if missing:
        text = _ask(missing, "text", run)
        if jobs and text:
            log(
                f"qstat -F json listed {len(jobs)} of {len(ids)} job(s); text form for the "
                "rest, and from now on for all"
            )
            memory["text_only"] = "JSON lists fewer jobs than asked for"
        jobs.update(text)
    return {job_id: verdict(job) for job_id, job in jobs.items()}


# ------------------------------------------------------------------------------ state


# ----------------------------------------------------------------------------- status


def job_status(
    job_id: str,
    settings: Mapping,
    *,
    query: Callable[[Sequence[str]], dict] | None = None,
    now: Callable[[], float] = time.time,
    problem_rounds: int | None = None,
    problem_seconds: float | None = None,
    warn: Callable[[str], None] = lambda message: print(message, file=sys.stderr),
    delete: Callable[[Sequence[str]], object] | None = None,
    resubmit: Callable[[str, Mapping], object] | None = None,
    show_progress: bool = True,
) -> str:
    """running, success or failed for one job, from at most one query per round.

    Snakemake asks about every active job once per round, one call after another.
    The cache keeps the time of the last query and the ids answered since; a request
    for an id already answered means a new round, which queries the scheduler once
    for all open jobs of the run. A query younger than status_interval/2 is never
    repeated (new jobs read as running meanwhile); one older than 3 intervals is.
    Jobs the provider fails while PBS may still hold them are deleted (``delete``).
    The unknown-job bounds come from the arguments, else from the settings (tests
    shorten them), else PROBLEM_ROUNDS and PROBLEM_SECONDS.

    A job PBS ended (walltime, qdel, node failure) is continued (``resubmit``, by
    default `continuation.continue_submission`) at most settings' resubmit times: its
    id then stands for its latest continuation. Each round also prints one progress
    line per submission in flight (stderr reaches the user's terminal: cluster-generic
    does not capture it) and appends them to the progress log.
    """
    if problem_rounds is None:
        problem_rounds = settings.get("problem_rounds", PROBLEM_ROUNDS)
    if problem_seconds is None:
        problem_seconds = settings.get("problem_seconds", PROBLEM_SECONDS)
    store = StateStore(settings["state_dir"])
    if delete is None:

        def delete(ids):
            return qdel(ids, store)

    interval = float(settings["status_interval"])
    doomed: list[str] = []
    ended: list[str] = []
    lines: list[str] = []
    with store.locked() as state:
        if query is None:

            def query(ids):
                return query_scheduler(ids, log=store.log, memory=state)

        t = now()
        jobs = state["jobs"]
        jobs.setdefault(job_id, new_job_record(t))  # e.g. resumed from an older run
        job = jobs[current_job(jobs, job_id)]
        job["seen"] = jobs[job_id]["seen"] = t
        if job["state"] not in FINAL:
            age = t - state["queried_at"] if state["queried_at"] is not None else math.inf
            new_round = (
                job_id in state["answered"]
                or current_job(jobs, job_id) not in state["queried_ids"]
                or age > 3 * interval
            )
            if new_round and age >= interval / 2:
                doomed, ended, answers = _query_round(
                    state,
                    store,
                    query,
                    t,
                    interval,
                    (problem_rounds, problem_seconds),
                    warn,
                    int(settings.get("resubmit", 0)),
                    lambda ended_id: cut_off_by_infrastructure(settings, ended_id),
                    lambda *seen: note_requeue(settings, *seen, warn=warn),
                    lambda ended_id: ranks_left(settings, ended_id),
                )
                if show_progress:
                    lines = _progress(state, answers, settings, store, t)
        if job_id not in state["answered"]:
            state["answered"].append(job_id)
        for old in [i for i, j in jobs.items() if t - j["seen"] > FORGET_SECONDS]:
            del jobs[old]
    if lines:
        # After the lock, like the deletions: the other status calls go on meanwhile.
        for line in lines:
            print(line, file=sys.stderr, flush=True)
        with contextlib.suppress(OSError):
            progress.append_log(_progress_log(settings), lines, t)
    if doomed:
        # After the lock: qdel may take a while, other status calls go on meanwhile.
        delete(doomed)
    if ended:
        if resubmit is None:
            resubmit = continue_submission
        for ended_id in ended:
            resubmit(ended_id, settings)
    return _answer(store.read()["jobs"], job_id)


def current_job(jobs: Mapping, job_id: str) -> str:
    """The job that stands for ``job_id`` now: its latest continuation, or itself."""
    seen = set()
    while job_id in jobs and jobs[job_id].get("continued_by") and job_id not in seen:
        seen.add(job_id)
        job_id = jobs[job_id]["continued_by"]
    return job_id


def _answer(jobs: Mapping, job_id: str) -> str:
    job = jobs.get(current_job(jobs, job_id))
    if job is None or job.get("continuing"):
        return RUNNING
    return job["state"]


def _query_round(
    state,
    store,
    query,
    t,
    interval,
    bounds,
    warn,
    resubmit=0,
    cut_off=lambda job_id: None,
    requeued=lambda *seen: None,
    left=lambda job_id: [],
):
    """Ask the scheduler once about every open job of the run and record the answers.

    Returns the ids that were failed while PBS may still hold them (to be deleted),
    the ids PBS ended that are to be continued (marked ``continuing``, read as
    running meanwhile), and PBS's answers ({id: Verdict}). A job whose script failed
    because the infrastructure cut off ranks of it (``cut_off``: a node's Snakemake
    died, a node never reported) is continued as one PBS ended.
    """
    problem_rounds, problem_seconds = bounds
    jobs = state["jobs"]
    # Jobs nobody asked about for this long belong to a run that is gone.
    stale = max(600.0, 30 * interval)
    ids = [
        i
        for i, j in jobs.items()
        if j["state"] not in FINAL
        and not j.get("continuing")
        and not j.get("continued_by")
        and t - j["seen"] < stale
    ]
    try:
        answers, whole = query(ids), None
    except QueryError as error:
        answers, whole = {}, str(error)
    except Exception as error:  # a surprise must not abort the whole workflow at once
        answers, whole = {}, f"{type(error).__name__}: {error}"
    counts: dict[str, int] = {}
    for answer in answers.values():
        counts[answer.state] = counts.get(answer.state, 0) + 1
    summary = ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "no answer"
    store.log(f"query for {len(ids)} job(s): {summary}", t)
    doomed, ended = [], []
    for job_id in ids:
        job = jobs[job_id]
        job["rounds"] += 1
        if job_id in answers:
            answer = answers[job_id]
            if answer.state == FAILED and not answer.ended_by_pbs and answer.phase != "held":
                why = cut_off(job_id)
                if why:
                    detail = f"{answer.detail}; ranks cut off by the infrastructure: {why}"
                    answer = replace(answer, detail=detail, ended_by_pbs=True, infrastructure=True)
            if answer.state == SUCCESS and (unfinished := left(job_id)):
                shown = ", ".join(map(str, unfinished[:5]))
                detail = (
                    f"{answer.detail}; but {len(unfinished)} of its ranks are not done "
                    f"(rank {shown}{' ...' if len(unfinished) > 5 else ''}): ended under them"
                )
                answer = replace(answer, state=FAILED, detail=detail, ended_by_pbs=True)
            if answer.run_count and job["run_count"] and answer.run_count > job["run_count"]:
                store.log(f"{job_id}: PBS started it again (run {answer.run_count})", t)
                requeued(job_id, job, answer, t)
            job["run_count"] = answer.run_count or job["run_count"]
            if answer.hosts:
                job["hosts"], job["started_at"] = list(answer.hosts), answer.started
            job["state"], job["detail"] = answer.state, answer.detail
            job["problems"], job["since"], job["listed"] = 0, None, True
            if answer.state == SUCCESS and job.get("left_out"):
                # A continuation that ran all it was given; ranks left out of it
                # because their input is at fault still fail the submission.
                bad = ", ".join(f"rank {r} (logs/infer/{r}.log)" for r in job["left_out"][:5])
                more = len(job["left_out"]) - 5
                job["state"] = FAILED
                job["detail"] = (
                    f"{answer.detail}; failed by their input and not run again: {bad}"
                    + (f" and {more} more" if more > 0 else "")
                )
                answer = Verdict(FAILED, job["detail"])
            if answer.ended_by_pbs and job_id in store.cancelled():
                # pbs-cancel deleted it while this query held the state: not continued
                job.update(state=FAILED, detail="cancelled (pbs-cancel)", continuing=False)
            elif answer.ended_by_pbs and job.get("attempt", 0) < resubmit and job.get("name"):
                # Read as running until its continuation is submitted (after the lock).
                job["state"], job["continuing"] = RUNNING, True
                store.log(f"{job_id}: ended by PBS: {answer.detail}; continuing it", t)
                ended.append(job_id)
            elif answer.state == FAILED:
                store.log(f"{job_id}: failed: {answer.detail}", t)
                warn(_failure_message(job_id, job))
                if answer.delete:
                    doomed.append(job_id)
            elif answer.held and job["warned"] != answer.detail:
                job["warned"] = answer.detail
                store.log(f"{job_id}: {answer.detail}", t)
                warn(
                    f"pbs-status: job {job_id} {job['name']} is {answer.detail}; it waits "
                    f"until released (qrls {job_id}) or deleted (qdel {job_id})"
                )
            continue
        if whole is None and not job["listed"] and _vanished(job, t):
            job["state"] = FAILED
            job["detail"] = (
                f"PBS has never listed this submission in {t - job['submitted']:.0f} s "
                f"since qsub accepted it: queue {job['queue']!r} probably refused it (PBS "
                "can drop a job that breaks a queue's limits without a word); check "
                "pbs.queue and pbs.nodes_per_submission against the queue table in README"
            )
            store.log(f"{job_id}: failed: {job['detail']}", t)
            warn(_failure_message(job_id, job))
            doomed.append(job_id)
            continue
        reason = whole or "the scheduler does not know this job id"
        job["problems"] += 1
        job["since"] = job["since"] if job["since"] is not None else t
        waited = t - job["since"]
        store.log(
            f"{job_id}: status unknown ({job['problems']}. round, {waited:.0f} s): {reason}", t
        )
        if job["problems"] >= problem_rounds and waited >= problem_seconds:
            job["state"] = FAILED
            job["detail"] = (
                f"status unreadable for {job['problems']} rounds / {waited:.0f} s: {reason}"
            )
            store.log(f"{job_id}: reported as failed; deleting it", t)
            warn(_failure_message(job_id, job))
            doomed.append(job_id)
        elif job["problems"] == 1:
            warn(
                f"pbs-status: cannot read the status of job {job_id} ({reason}); reading it "
                f"as running for now (details: {store.log_path})"
            )
    state["queried_at"], state["queried_ids"], state["answered"] = t, ids, []
    return doomed, ended, answers


def _progress_log(settings: Mapping) -> str:
    return settings.get("progress_log") or str(Path(settings["log_dir"]).parent / "progress.log")


def _progress(state, answers, settings, store, t) -> list[str]:
    """One line per submission of this run still in flight (never breaks a round)."""
    try:
        return progress_lines(state, answers, settings, t)
    except Exception as error:  # a progress line is not worth a failed status call
        store.log(f"progress: {type(error).__name__}: {error}", t)
        return []


def progress_lines(state: dict, answers: Mapping, settings: Mapping, t: float) -> list[str]:
    """The progress lines of this round, from the answers PBS just gave (no query of
    its own) and what the submissions wrote (scripts/reporting/progress.py); what was read is
    kept in state_dir/progress.json for the next round."""
    # Every submission PBS answered about this round (the open ones Snakemake asks
    # about, also those resumed from an earlier run), those that ended in it too:
    # their last line ends at their total.
    flying = [(i, j) for i, j in state["jobs"].items() if i in answers]
    # Its own file, read and written once per round (the status cache is read by
    # every status call, and this holds the ranks read so far).
    memory_path = Path(settings["state_dir"]) / "progress.json"
    memory = progress.load_memory(memory_path)
    known = memory.setdefault("jobs", {})
    missing = [i for i, _ in flying if i not in known]
    if missing:
        known.update(submission_ranks(settings, missing))
    for old in [i for i in known if i not in dict(flying)]:
        del known[old]
    subs = []
    registry_root = settings.get("registry_root") or ""
    for job_id, _job in flying:
        info = known.get(job_id)
        if not info:
            continue
        registry = str(registry_dir(settings, job_id)) if registry_root and info["engines"] else ""
        subs.append(
            progress.Submission(job_id, frozenset(info["ranks"]), info["engines"], registry)
        )
    results = settings.get("results_dir") or "results"
    failed_dir = settings.get("failed_dir") or failure_note.NOTES_DIR
    read = progress.read_progress(subs, rank_record.records_dir(results), failed_dir, memory)
    write_atomic(memory_path, json.dumps(memory))
    lines = []
    for job_id, job in flying:
        answer = answers[job_id]
        name = job.get("name") or job_id
        if job.get("continuing"):
            phase = "ended by PBS"
        elif job["state"] in FINAL:
            phase = "finished" if job["state"] == SUCCESS else FAILED
        else:
            phase = answer.phase or "running"
        lines.append(
            progress.progress_line(
                name,
                job_id,
                phase,
                read.get(job_id),
                t,
                since=answer.started,
                comment=answer.comment if phase in ("queued", "held", "waiting") else "",
            )
        )
    return lines


def _vanished(job: Mapping, t: float) -> bool:
    return job["rounds"] >= VANISH_ROUNDS and t - job["submitted"] >= VANISH_SECONDS


def _failure_message(job_id: str, job: Mapping) -> str:
    name = job.get("name") or ""
    log = f"; PBS log: {LOG_DIR}/{name}.log" if name else ""
    return f"pbs-status: job {job_id} {name} failed: {job['detail']}{log}"


# ----------------------------------------------------------------------------- cancel


def qdel(
    ids: Sequence[str], store: StateStore, *, popen=subprocess.Popen, wait: float | None = None
) -> None:
    """qdel ``ids`` in a session of its own, output to state_dir/cancel.log.

    With ``wait`` set, return after that many seconds even if qdel still runs: killing
    this process then does not stop qdel.
    """
    if not ids:
        return
    store.dir.mkdir(parents=True, exist_ok=True)
    argv = ["qdel", *ids]
    with open(store.dir / "cancel.log", "a") as log:
        log.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(argv)}\n")
        log.flush()
        try:
            process = popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        except OSError as error:
            log.write(f"qdel could not start: {error}\n")
            return
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=wait)


def cancel(
    ids: Sequence[str], settings: Mapping, *, popen=subprocess.Popen, wait: float = CANCEL_WAIT
) -> list[str]:
    """qdel the given jobs except those known to have ended; returns the ids passed on.

    They are marked cancelled first: no status round continues them. A status query holds
    the state for its whole qstat, and cluster-generic kills this command after 2 s: past
    CANCEL_LOCK_S they are noted beside it (`StateStore.note_cancelled`), then qdel'd."""
    store = StateStore(settings["state_dir"])
    try:
        with store.locked(timeout=CANCEL_LOCK_S) as state:
            open_ids = _mark_cancelled(state, ids)
    except TimeoutError:
        open_ids = _mark_cancelled(store.read(), ids)
        store.note_cancelled(open_ids)
        qdel(open_ids, store, popen=popen, wait=0)
        with store.locked() as state:
            _mark_cancelled(state, open_ids)
        return open_ids
    qdel(open_ids, store, popen=popen, wait=wait)
    return open_ids


def _mark_cancelled(state: dict, ids: Sequence[str]) -> list[str]:
    """Mark the open jobs among ``ids`` (their latest continuations) cancelled; return them."""
    known = state["jobs"]
    # A continued submission: its latest continuation is what runs now.
    ids = list(dict.fromkeys(current_job(known, i) for i in ids))
    open_ids = [i for i in ids if known.get(i, {}).get("state") not in FINAL]
    for job_id in open_ids:
        if job_id in known:
            known[job_id].update(state=FAILED, detail="cancelled (pbs-cancel)", continuing=False)
    return open_ids


def open_jobs_of_run(settings: Mapping) -> list[str]:
    store, run = StateStore(settings["state_dir"]), run_id(settings)
    gone = store.cancelled()  # deleted by pbs-cancel already
    jobs = {i: j for i, j in store.read()["jobs"].items() if i not in gone}
    return [i for i, j in jobs.items() if j.get("run") == run and j["state"] not in FINAL]


def watch(
    settings: Mapping, *, interval: float = WATCH_INTERVAL, popen=subprocess.Popen
) -> list[str]:
    """Wait for the main Snakemake of this run to end, then delete what it left.

    Snakemake cancels its active jobs on Ctrl-C, but not a submission whose id it never
    learned (Ctrl-C during qsub), and nothing when it is SIGKILLed. One watchdog per
    run (a flock) covers both. Returns the ids it deleted.
    """
    store = StateStore(settings["state_dir"])
    store.dir.mkdir(parents=True, exist_ok=True)
    lock_path = store.dir / f"watchdog.{run_id(settings)}.lock"
    with open(lock_path, "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return []  # another watchdog guards this run
        while owner_alive(settings):
            time.sleep(interval)
        # A qsub that Snakemake gave up on may still be under way: it records its job.
        no_submission_under_way(settings)
        left = open_jobs_of_run(settings)
        if left:
            store.log(
                f"watchdog: Snakemake (pid {settings['owner']['pid']}) is gone; deleting "
                f"{len(left)} submission(s) it left: {' '.join(left)}"
            )
            cancel(left, settings, popen=popen, wait=30)
        with contextlib.suppress(OSError):
            lock_path.unlink()
    return left


def start_watchdog(settings: Mapping, environ: Mapping = os.environ) -> None:
    """Start `watch` for this run in a detached process (no-op if one runs already)."""
    state_dir = Path(settings["state_dir"])
    state_dir.mkdir(parents=True, exist_ok=True)
    lock_path = state_dir / f"watchdog.{run_id(settings)}.lock"
    if lock_path.exists():
        with open(lock_path, "a") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return  # running
            fcntl.flock(lock, fcntl.LOCK_UN)
    scripts = str(Path(__file__).resolve().parents[1])
    env = {**environ, "PYTHONPATH": scripts}
    subprocess.Popen(
        [sys.executable, "-m", "pbs", "watchdog"],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=open(state_dir / "watchdog.log", "a"),  # noqa: SIM115
        start_new_session=True,
        close_fds=True,
    )
