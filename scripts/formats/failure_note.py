"""A rank's failure note: ``logs/infer/failed/<rank>.json`` beside its log
``logs/infer/<rank>.log``.

Written by the rule that runs the rank (scripts/pipeline/rank_job.py) when the rank
fails, removed when it starts again. Read by the progress lines (reporting/progress.py:
ranks failed) and the PBS provider's continuations (pbs/continuation.py: a rank that
failed by its input is not run again).

A JSON object:
    rank     int
    cause    INPUT_FAULT ("input": its rank file is at fault), "engine", "task", ...
    error    the error's text (at most 500 characters)
    log      the rank's log
    at       UNIX time of the write
    format   FORMAT (notes written before 2026-12-05 have none: format 1)

Stdlib only: the PBS provider reads notes under a login node's Python.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path

from formats.files import write_atomic

FORMAT = 1
NOTES_DIR = "logs/infer/failed"  # beside the rank logs, logs/infer/<rank>.log
FAILED_DIR = os.path.basename(NOTES_DIR)  # the notes' folder in the rank logs' folder
INPUT_FAULT = "input"


def failure_note_path(log: str | os.PathLike, rank) -> Path:
    """``logs/infer/failed/<rank>.json`` for the rank log ``logs/infer/<rank>.log``."""
    return Path(log).parent / FAILED_DIR / f"{rank}.json"


def write_failure_note(log: str | os.PathLike, rank, cause: str, error: str) -> None:
    """Record that ``rank`` failed (``cause``: INPUT_FAULT, or what else it was)."""
    path = failure_note_path(log, rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    note = {"rank": int(rank), "cause": cause, "error": error[:500], "log": str(log)}
    note["at"] = round(time.time(), 3)
    note["format"] = FORMAT
    write_atomic(path, json.dumps(note))


def clear_failure_note(log: str | os.PathLike, rank) -> None:
    """A rank that starts again is no longer failed."""
    with contextlib.suppress(OSError):
        failure_note_path(log, rank).unlink()


def read_note(path: str | os.PathLike) -> dict | None:
    """The note at ``path``, or None when there is none (or it is being replaced)."""
    try:
        note = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return note if isinstance(note, dict) else None


def cause(failed_dir: str | os.PathLike, rank) -> str:
    """Why ``rank`` failed, by its note in ``failed_dir`` ("" without a note)."""
    note = read_note(Path(failed_dir, f"{rank}.json")) or {}
    return note.get("cause", "")
