"""The submission state of a run, in ``.snakemake/pbs/`` (config-free: ``state_dir``),
and the index of its submissions, ``logs/pbs/submissions.tsv``. Only the PBS provider
reads them.

``status.json`` (`StateStore`, replaced atomically, changed under the flock of ``lock``):
    format        FORMAT (states written before 2026-12-05 have none: format 1)
    queried_at    when qstat was last asked; queried_ids, answered: what and which answered
    text_only     why qstat's JSON form is no longer asked (status.query_scheduler)
    jobs          job id -> `new_job_record`: name, run, queue, seen, submitted, state
                  (running, success, failed), detail, listed, rounds, problems, since,
                  warned; for continuations (pbs.resubmit) attempt, continued_by,
                  continuing, left_out; hosts, started_at, run_count as PBS last
                  answered. Fields missing from older records take those
                  defaults when read under the lock.
``status.log``: what the status command did, a line each.
``submitting.lock``: held (shared) while a submission is under way (`submitting`).

``submissions.tsv``, one line per submission, appended by pbs-submit (`append_index`):
    time  job id  name  nodes  walltime  queue  ranks (comma-separated)

Stdlib only: the provider runs under a login node's Python.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from formats.files import write_atomic

from .parse import RUNNING

FORMAT = 1
INDEX = "submissions.tsv"


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
        # Continuations (pbs.resubmit): which one this is (0: the first submission),
        # the job that continues it, set while its continuation is being submitted,
        # and the ranks left out of it because their input is at fault.
        "attempt": 0,
        "continued_by": None,
        "continuing": False,
        "left_out": [],
        # Where and since when PBS runs it, and how often it started it: a run count
        # that grows means PBS requeued it (status.note_requeue: a node was lost).
        "hosts": [],
        "started_at": None,
        "run_count": None,
    }


def empty_state() -> dict:
    return {"format": FORMAT, "queried_at": None, "queried_ids": [], "answered": [], "jobs": {}}


class StateStore:
    """The status cache in ``state_dir``: JSON replaced atomically, guarded by a flock."""

    def __init__(self, state_dir: str | os.PathLike):
        self.dir = Path(state_dir)
        self.path = self.dir / "status.json"
        self.lock_path = self.dir / "lock"
        self.log_path = self.dir / "status.log"
        # job ids pbs-cancel deleted while a status query held the state, one a line,
        # appended without the lock: every status round and the watchdog read them
        self.cancelled_path = self.dir / "cancelled"

    def read(self) -> dict:
        """Read without the lock (safe: writes are atomic renames)."""
        try:
            state = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return empty_state()
        return state if isinstance(state, dict) and "jobs" in state else empty_state()

    def note_cancelled(self, ids: list[str]) -> None:
        """Append ``ids`` to the cancelled jobs (one small append: no lock needed)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.cancelled_path, "a") as noted:
            noted.write("".join(f"{job_id}\n" for job_id in ids))

    def cancelled(self) -> set[str]:
        """The job ids `note_cancelled` noted."""
        try:
            return set(self.cancelled_path.read_text().split())
        except FileNotFoundError:
            return set()

    def write(self, state: dict) -> None:
        state["format"] = FORMAT
        write_atomic(self.path, json.dumps(state))

    @contextlib.contextmanager
    def locked(self, timeout: float | None = None) -> Iterator[dict]:
        """The state, exclusively; written back when the block ends without error.
        TimeoutError when another process holds it for more than ``timeout`` seconds."""
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.lock_path, "a") as lock:
            if timeout is None:
                fcntl.flock(lock, fcntl.LOCK_EX)
            else:
                deadline = time.monotonic() + timeout
                while True:
                    try:
                        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        break
                    except BlockingIOError:
                        if time.monotonic() >= deadline:
                            raise TimeoutError(f"{self.lock_path} is held") from None
                        time.sleep(0.02)
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


@contextlib.contextmanager
def submitting(settings: Mapping) -> Iterator[None]:
    """Held (shared) while a submission is under way; `watch` waits for all of them."""
    path = Path(settings["state_dir"]) / "submitting.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_SH)
        yield


def no_submission_under_way(settings: Mapping) -> None:
    path = Path(settings["state_dir"]) / "submitting.lock"
    with open(path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)


def submission_ranks(settings: Mapping, ids: Sequence[str]) -> dict[str, dict]:
    """{job id: {"ranks": [...], "engines": n}} from logs/pbs/submissions.tsv (read
    once per new submission: its ranks are its last column)."""
    found = {}
    path = Path(settings["log_dir"]) / INDEX
    wanted = set(ids)
    per_node = settings.get("tiles_per_node", 12) // max(1, settings.get("tiles_per_job", 1))
    with contextlib.suppress(OSError), open(path) as lines:
        for line in lines:
            fields = line.rstrip("\n").split("\t")
            if len(fields) >= 7 and fields[1] in wanted:
                ranks = [int(r) for r in fields[6].split(",") if r.strip().isdigit()]
                nodes = int(fields[3]) if fields[3].isdigit() else 0
                engines = nodes * per_node if settings.get("warm_engines") else 0
                found[fields[1]] = {"ranks": ranks, "engines": engines}
    return found


def append_index(log_dir: str | os.PathLike, now: float, job_id: str, plan, queue: str) -> None:
    """One line of ``submissions.tsv`` for a submission (``plan``: its name, nodes,
    walltime and ranks)."""
    with open(Path(log_dir) / INDEX, "a") as index:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now))
        ranks = ",".join(str(r) for r in plan.ranks)
        index.write(
            f"{stamp}\t{job_id}\t{plan.name}\t{plan.nodes}\t{plan.walltime}\t{queue}\t{ranks}\n"
        )
