"""How far a run is, read from what it writes on the shared file system: the ranks'
records (``results/records/<rank>.json``), their failure notes
(``logs/infer/failed/<rank>.json``) and a PBS submission's engine registry
(``logs/engines/<job id>/<host>-tile<N>.json``, written by scripts/engine/supervisor.py),
each read through its format's module in scripts/formats/.

One reading per status round must stay cheap at 30,720 ranks and 3,072 engines on
Lustre, where every open and stat is a metadata request: a round lists each folder
once (names and inode numbers come with the listing, no stat) and opens only the
files that are new or were replaced (an atomic replace gives a new inode). What was
read is kept in ``memory``, a JSON-able dict the caller keeps between rounds (the PBS
status command is a new process every round: it stores it next to its status cache).

`progress_line` turns one submission's figures into the line the user sees:
``r0-479 123456.aurora-pbs running 12:04 | engines 48/48 ready | ranks 212/480 done,
1 failed | 3,100 tok/s | ETA 8 min``.

Stdlib only: the PBS status command runs it under a login node's Python.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import console
from formats import failure_note, registry
from formats import record as rank_record

# ----------------------------------------------------------------------------- reading


class Reads:
    """Counts the files opened and the folders listed (for the benchmark)."""

    def __init__(self):
        self.files = 0
        self.listings = 0


def listing(folder: str | os.PathLike, suffix: str, reads: Reads) -> dict[str, int]:
    """{name without ``suffix``: inode} of a folder, from one listing (no stat)."""
    found = {}
    reads.listings += 1
    with contextlib.suppress(FileNotFoundError, NotADirectoryError):
        for entry in os.scandir(folder):
            name = entry.name
            if name.endswith(suffix) and not name.startswith("."):
                found[name[: -len(suffix)]] = entry.inode()
    return found


def _read(reader, path: Path, reads: Reads) -> dict | None:
    """``reader(path)`` (a formats module's), counted; None while it is being replaced
    (the next round reads it)."""
    reads.files += 1
    return reader(path)


@dataclass(frozen=True)
class Submission:
    """What the reader needs of one submission (or of a local run)."""

    key: str  # the job id (a local run: "local")
    ranks: frozenset[int]
    engines: int = 0  # engines it starts (0: unknown)
    registry: str = ""  # its engine registry folder ("" for none)


@dataclass
class Progress:
    total: int
    done: int = 0
    failed: list[int] = field(default_factory=list)
    tokens: int = 0
    first: float | None = None  # start of its first request (records' written_at - request_s)
    last: float | None = None  # its last record's written_at
    engines_total: int = 0
    engines_ready: int = 0
    engines_starting: int = 0
    engines_stopped: int = 0
    # (name, state, restarts, log) of engines that failed or were restarted
    engines_trouble: list[tuple[str, str, int, str]] = field(default_factory=list)
    engines_seen: int = 0


def _ranks_of(names: Iterable[str]) -> dict[int, str]:
    found = {}
    for name in names:
        if name.isdigit():
            found[int(name)] = name
    return found


def read_progress(
    submissions: Iterable[Submission],
    records_dir: str | os.PathLike,
    failed_dir: str | os.PathLike,
    memory: dict,
    reads: Reads | None = None,
) -> dict[str, Progress]:
    """One round: {submission key: Progress}; ``memory`` is updated in place.

    The records folder and the failure notes are listed once for all submissions; a
    record is opened once (its tokens and times are kept), a note or a registry entry
    again only when it was replaced. Submissions no longer asked about are forgotten.
    """
    reads = reads or Reads()
    submissions = list(submissions)
    records = _ranks_of(listing(records_dir, ".json", reads))
    notes = listing(failed_dir, ".json", reads)
    seen_notes = memory.setdefault("notes", {})  # name -> [inode, cause]
    for name, inode in notes.items():
        if seen_notes.get(name, [None])[0] != inode:
            note = _read(failure_note.read_note, Path(failed_dir, name + ".json"), reads) or {}
            seen_notes[name] = [inode, note.get("cause", "")]
    for name in [n for n in seen_notes if n not in notes]:
        del seen_notes[name]
    failed_ranks = _ranks_of(seen_notes)
    subs = memory.setdefault("submissions", {})
    for key in [k for k in subs if k not in {s.key for s in submissions}]:
        del subs[key]
    result = {}
    for sub in submissions:
        mine = subs.setdefault(
            sub.key, {"read": [], "tokens": 0, "first": None, "last": None, "engines": {}}
        )
        read = set(mine["read"])
        present = records.keys() & sub.ranks  # set operations: no Python loop per rank
        for rank in present - read:
            record = _read(rank_record.load, Path(records_dir, records[rank] + ".json"), reads)
            if record is None:
                continue
            read.add(rank)
            mine["tokens"] += int(record.get("output_tokens") or 0)
            written = record.get("written_at")
            if isinstance(written, (int, float)):
                began = rank_record.began(record)
                mine["first"] = began if mine["first"] is None else min(mine["first"], began)
                mine["last"] = written if mine["last"] is None else max(mine["last"], written)
        mine["read"] = sorted(read)
        progress = Progress(
            total=len(sub.ranks),
            done=len(present),
            failed=sorted((failed_ranks.keys() & sub.ranks) - present),
            tokens=mine["tokens"],
            first=mine["first"],
            last=mine["last"],
            engines_total=sub.engines,
        )
        if sub.registry:
            _read_engines(sub.registry, mine, progress, reads)
        result[sub.key] = progress
    return result


# A folder's mtime this close to the reader's clock may change again without changing
# its value (file systems that keep whole seconds): the next round reads it all again.
SETTLED_S = 2.0


def _folder_mtime(folder: str) -> int | None:
    """The folder's mtime in ns if it settled (see SETTLED_S), else None."""
    try:
        mtime = os.stat(folder).st_mtime_ns
    except OSError:
        return None
    return mtime if time.time() - mtime / 1e9 > SETTLED_S else None


def _read_engines(folder: str, mine: dict, progress: Progress, reads: Reads) -> None:
    """Engine states from the registry, opening only the entries replaced since.

    An entry is replaced by a rename, so a new inode says it changed; but an entry
    replaced twice between two rounds can get its first inode back (ready, restarting,
    ready again: the restart unseen). Renames change the folder's mtime, so when that
    changed since the last round (or had not settled), every entry is read again."""
    known = mine["engines"]
    mtime = _folder_mtime(folder)
    every = mtime is None or mtime != mine.get("registry_mtime")
    mine["registry_mtime"] = mtime
    entries = listing(folder, registry.SUFFIX, reads)
    for name, inode in entries.items():
        if every or known.get(name, [None])[0] != inode:
            entry = _read(registry.read_entry, Path(folder, name + ".json"), reads)
            if entry is not None:
                log = entry.get("log") or str(Path(folder, name + ".log"))
                known[name] = [inode, entry.get("state", ""), int(entry.get("restarts") or 0), log]
    states = [known[n] for n in entries if n in known]
    progress.engines_seen = len(states)
    progress.engines_total = max(progress.engines_total, len(states))
    progress.engines_ready = sum(1 for s in states if s[1] == registry.READY)
    progress.engines_starting = sum(1 for s in states if s[1] in registry.COMING)
    progress.engines_stopped = sum(1 for s in states if s[1] == registry.STOPPED)
    progress.engines_trouble = sorted(
        (name, s[1], s[2], s[3])
        for name, s in ((n, known[n]) for n in entries if n in known)
        if s[1] in (registry.FAILED, registry.RESTARTING) or s[2] > 0
    )


# ---------------------------------------------------------------------------- the line


def _clock(seconds: float) -> str:
    """12:04 (minutes:seconds), 1:02:03 past an hour."""
    seconds = max(0, int(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def _minutes(seconds: float) -> str:
    if seconds < 60:
        return "< 1 min"
    if seconds < 3600:
        return f"{round(seconds / 60)} min"
    return f"{seconds / 3600:.1f} h"


def rates(progress: Progress, now: float) -> tuple[float | None, float | None]:
    """(output tok/s, ETA seconds) since the first request; None until there is one."""
    if progress.first is None or progress.done == 0:
        return None, None
    span = max(1e-3, (progress.last if progress.last else now) - progress.first)
    tok_s = progress.tokens / span
    left = progress.total - progress.done - len(progress.failed)
    per_rank = max(1e-3, now - progress.first) / progress.done
    return tok_s, max(0.0, left * per_rank)


def engines_part(progress: Progress, limit: int = 3) -> str:
    if not progress.engines_total:
        return ""
    if progress.engines_stopped and not progress.engines_ready:
        # the end of the submission: its job script stopped them
        text = f"engines {progress.engines_stopped}/{progress.engines_total} stopped"
    else:
        text = f"engines {progress.engines_ready}/{progress.engines_total} ready"
    if progress.engines_seen < progress.engines_total and not progress.engines_ready:
        text += f" ({progress.engines_seen} reported)"
    trouble = progress.engines_trouble
    if trouble:
        named = [
            f"{name} {state}" + (f" after {restarts} restart(s)" if restarts else "") + f" ({log})"
            for name, state, restarts, log in trouble[:limit]
        ]
        more = f" and {len(trouble) - limit} more" if len(trouble) > limit else ""
        text += ": " + ", ".join(named) + more
    return text


def ranks_part(progress: Progress) -> str:
    text = f"ranks {progress.done:,}/{progress.total:,} done"
    if progress.failed:
        text += f", {len(progress.failed):,} failed"
    return text


def figures(progress: Progress, now: float) -> list[str]:
    """The parts after the state: engines, ranks, tok/s, ETA."""
    parts = [p for p in (engines_part(progress), ranks_part(progress)) if p]
    tok_s, eta = rates(progress, now)
    if tok_s is not None:
        parts.append(f"{tok_s:,.1f} tok/s" if tok_s < 10 else f"{tok_s:,.0f} tok/s")
    if eta is not None and progress.done + len(progress.failed) < progress.total:
        parts.append(f"ETA {_minutes(eta)}")
    return parts


def progress_line(
    name: str,
    job_id: str,
    state: str,
    progress: Progress | None,
    now: float,
    *,
    since: float | None = None,
    comment: str = "",
) -> str:
    """One submission's line. ``state``: what PBS says (queued, running, held, ...);
    ``since``: when it started running; ``comment``: PBS's comment, shown while queued
    or held."""
    head = f"{name} {job_id} {state}"
    if since is not None and state == "running":
        head += f" {_clock(now - since)}"
    if comment and state != "running":
        head += f" ({comment})"
    if progress is None or state in ("queued", "held"):
        return head
    return " | ".join([head, *figures(progress, now)])


def local_line(progress: Progress, now: float, started: float, engines=None) -> str:
    """A local run's line: ``progress 0:40 | engines 2/2 ready | ranks 12/48 done |
    310 tok/s | ETA 1 min``; ``engines()`` gives (ready, total, what they wait for)."""
    if engines is not None:
        with contextlib.suppress(Exception):  # a line without engines rather than none
            ready, total, waiting = engines() or (0, 0, "")
            progress.engines_total, progress.engines_ready = total, ready
            progress.engines_seen = total
            parts = figures(progress, now)
            if waiting and total:
                parts[0] += f" ({waiting})"  # what the ranks wait for
            return " | ".join([f"progress {_clock(now - started)}", *parts])
    return " | ".join([f"progress {_clock(now - started)}", *figures(progress, now)])


class LocalWatch:
    """A local run's progress line every ``interval`` seconds (stderr and the progress
    log), from a thread of the main Snakemake that the first rank job starts: a dry run,
    ``--dag`` or ``--summary`` never starts it, nor do the Snakemakes of a PBS
    submission (they are not the main process)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._settings: dict | None = None
        self._thread: threading.Thread | None = None
        self._finish = threading.Event()

    def configure(self, workflow, results_dir: str, interval: float, engines=None, log=None):
        """From the Snakefile: ``engines()`` gives (ready, total, what they wait for)."""
        if not interval or not getattr(workflow, "is_main_process", False):
            return
        self._settings = {
            "workflow": workflow,
            "records_dir": str(rank_record.records_dir(results_dir)),
            "notes_dir": failure_note.NOTES_DIR,
            "interval": float(interval),
            "engines": engines,
            "log": log or os.path.join("logs", "progress.log"),
        }

    def start(self) -> None:
        """From each rank job (cheap after the first): start the thread once."""
        if self._settings is None or self._thread is not None:
            return
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="progress", args=(time.time(),), daemon=True
                )
                self._thread.start()

    def finish(self, timeout: float = 30.0) -> None:
        """From onsuccess and onerror: the last line, which reaches the total, before
        the run's summary; the thread prints it and ends (at most ``timeout`` s)."""
        thread = self._thread
        if thread is not None:
            self._finish.set()
            thread.join(timeout)

    def _ranks(self) -> frozenset[int]:
        """The rank jobs this run runs (Snakemake's DAG; none if that cannot be read)."""
        workflow = self._settings["workflow"]
        for _ in range(5):  # the scheduler may change the set while it is read
            with contextlib.suppress(Exception):  # Snakemake's internals: may change
                jobs = list(workflow.dag.needrun_jobs(exclude_finished=False))
                return frozenset(
                    int(job.wildcards_dict["rank"]) for job in jobs if job.rule.name == "infer"
                )
            time.sleep(0.2)
        return frozenset()

    def _run(self, started: float) -> None:
        settings = self._settings
        ranks = self._ranks()
        if not ranks:
            return
        memory: dict = {}
        sub = Submission("local", ranks)
        shown = started
        # Looks every second at most, prints every interval, and once more at the end
        # (the line that reaches the total, or the run's last state when `finish` asks).
        while True:
            finishing = self._finish.wait(min(1.0, settings["interval"]))
            now = time.time()
            found = read_progress([sub], settings["records_dir"], settings["notes_dir"], memory)
            ended = finishing or found["local"].done + len(found["local"].failed) >= len(ranks)
            if now - shown < settings["interval"] and not ended:
                continue
            shown = now
            line = local_line(found["local"], now, started, settings["engines"])
            console.say(line)
            with contextlib.suppress(OSError):
                append_log(settings["log"], [line], now)
            if ended:
                return


LOCAL = LocalWatch()


def append_log(path: str | os.PathLike, lines: Iterable[str], now: float | None = None) -> None:
    """Append the lines, each with its time, to the progress log."""
    lines = list(lines)
    if not lines:
        return
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as out:
        out.write("".join(f"{stamp} {line}\n" for line in lines))


def load_memory(path: str | os.PathLike) -> dict:
    try:
        memory = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    return memory if isinstance(memory, dict) else {}
