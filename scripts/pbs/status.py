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
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import prompts  # stdlib only, like this package (scripts/ is on the path)

from .parse import (
    FAILED,
    FINAL,
    RUNNING,
    QueryError,
    Verdict,
    match_ids,
    parse_json,
    parse_text,
    verdict,
)
from .settings import LOG_DIR, owner_alive, run_id

# A job whose status cannot be read (qstat fails, bad output, unknown id) is reported
# as running until this many consecutive rounds AND seconds have failed, then failed.
PROBLEM_ROUNDS = 10
PROBLEM_SECONDS = 300
# A job that qstat -x has never listed since qsub accepted it: PBS dropped it (a known
# PBS bug with jobs that break a queue's limits). Failed after this many rounds/seconds.
VANISH_ROUNDS = 4
VANISH_SECONDS = 60
QUERY_TIMEOUT = 60  # seconds for one qstat call
CANCEL_WAIT = 1.5  # seconds pbs-cancel waits for qdel (the plugin kills it after 2 s)
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


def new_job_record(now: float, name: str = "", run: str = "", queue: str = "") -> dict:
    return {
        "name": name,
        "run": run,
        "queue": queue,
        "seen": now,
        "submitted": now,
        "state": RUNNING,
        "detail": "",
        "listed": False,  # qstat has listed it at least once
        "rounds": 0,  # rounds asked about
        "problems": 0,
        "since": None,
        "warned": "",
    }


def empty_state() -> dict:
    return {"queried_at": None, "queried_ids": [], "answered": [], "jobs": {}}


class StateStore:
    """The status cache in ``state_dir``: JSON replaced atomically, guarded by a flock."""

    def __init__(self, state_dir: str | os.PathLike):
        self.dir = Path(state_dir)
        self.path = self.dir / "status.json"
        self.lock_path = self.dir / "lock"
        self.log_path = self.dir / "status.log"

    def read(self) -> dict:
        """Read without the lock (safe: writes are atomic renames)."""
        try:
            state = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return empty_state()
        return state if isinstance(state, dict) and "jobs" in state else empty_state()

    def write(self, state: dict) -> None:
        prompts.write_atomic(self.path, json.dumps(state))

    @contextlib.contextmanager
    def locked(self) -> Iterator[dict]:
        """The state, exclusively; written back when the block ends without error."""
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.lock_path, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            state = self.read()
            for job in state["jobs"].values():  # records of older versions
                for key, value in new_job_record(0).items():
                    job.setdefault(key, value)
            yield state
            self.write(state)

    def log(self, message: str, now: float | None = None) -> None:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now))
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "a") as out:
            out.write(f"{stamp} {message}\n")


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
    with store.locked() as state:
        if query is None:

            def query(ids):
                return query_scheduler(ids, log=store.log, memory=state)

        t = now()
        jobs = state["jobs"]
        job = jobs.setdefault(job_id, new_job_record(t))  # e.g. resumed from an older run
        job["seen"] = t
        if job["state"] not in FINAL:
            age = t - state["queried_at"] if state["queried_at"] is not None else math.inf
            new_round = (
                job_id in state["answered"]
                or job_id not in state["queried_ids"]
                or age > 3 * interval
            )
            if new_round and age >= interval / 2:
                doomed = _query_round(
                    state, store, query, t, interval, (problem_rounds, problem_seconds), warn
                )
        if job_id not in state["answered"]:
            state["answered"].append(job_id)
        for old in [i for i, j in jobs.items() if t - j["seen"] > FORGET_SECONDS]:
            del jobs[old]
        answer = job["state"]
    if doomed:
        # After the lock: qdel may take a while, other status calls go on meanwhile.
        delete(doomed)
    return answer


def _query_round(state, store, query, t, interval, bounds, warn) -> list[str]:
    """Ask the scheduler once about every open job of the run and record the answers.

    Returns the ids that were failed while PBS may still hold them (to be deleted).
    """
    problem_rounds, problem_seconds = bounds
    jobs = state["jobs"]
    # Jobs nobody asked about for this long belong to a run that is gone.
    stale = max(600.0, 30 * interval)
    ids = [i for i, j in jobs.items() if j["state"] not in FINAL and t - j["seen"] < stale]
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
    doomed = []
    for job_id in ids:
        job = jobs[job_id]
        job["rounds"] += 1
        if job_id in answers:
            answer = answers[job_id]
            job["state"], job["detail"] = answer.state, answer.detail
            job["problems"], job["since"], job["listed"] = 0, None, True
            if answer.state == FAILED:
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
    return doomed


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
    """qdel the given jobs except those known to have ended; returns the ids passed on."""
    store = StateStore(settings["state_dir"])
    with store.locked() as state:
        known = state["jobs"]
        open_ids = [i for i in ids if known.get(i, {}).get("state") not in FINAL]
        for job_id in open_ids:
            if job_id in known:
                known[job_id].update(state=FAILED, detail="cancelled (pbs-cancel)")
    qdel(open_ids, store, popen=popen, wait=wait)
    return open_ids


def open_jobs_of_run(settings: Mapping) -> list[str]:
    run = run_id(settings)
    jobs = StateStore(settings["state_dir"]).read()["jobs"]
    return [i for i, j in jobs.items() if j.get("run") == run and j["state"] not in FINAL]


@contextlib.contextmanager
def submitting(settings: Mapping) -> Iterator[None]:
    """Held (shared) while a submission is under way; `watch` waits for all of them."""
    path = Path(settings["state_dir"]) / "submitting.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_SH)
        yield


def _no_submission_under_way(settings: Mapping) -> None:
    path = Path(settings["state_dir"]) / "submitting.lock"
    with open(path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)


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
        _no_submission_under_way(settings)
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
