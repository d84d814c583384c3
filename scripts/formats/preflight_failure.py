"""A submission's preflight failure: ``logs/pbs/<name>.failed.json``, beside the
submission's job script and PBS log ``<name>.log``.

pbs-submit names it in the submission's staging settings (pbs/submission.py) and removes
an earlier run's; the preflight (scripts/model/stage.py) writes it when a node fails its
checks, before any engine starts; the run's end reports it (reporting/summary.py
preflight_failures: the submission, its job and each cause).

A JSON object:
    job_id   the PBS job
    causes   one line per failed node: the node and what failed
    format   FORMAT (files written before 2026-12-07 have none: format 1)

Stdlib only: the preflight runs under the inference Python before anything else.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

from formats.files import write_atomic

FORMAT = 1
SUFFIX = ".failed.json"


def failure_file(log_dir: str | os.PathLike, name: str) -> Path:
    """The preflight failure of submission ``name`` in ``log_dir`` (logs/pbs)."""
    return Path(log_dir) / f"{name}{SUFFIX}"


def write_failure(path: str | os.PathLike, job_id: str, causes: Sequence[str]) -> None:
    write_atomic(
        path, json.dumps({"job_id": job_id, "causes": list(causes), "format": FORMAT}) + "\n"
    )


def read_failures(log_dir: str | os.PathLike, since: float) -> Iterator[tuple[str, Path, dict]]:
    """(submission name, file, its failure) of the failures in ``log_dir`` written at or
    after ``since`` (UNIX time), by name; unreadable ones are skipped."""
    for path in sorted(Path(log_dir).glob(f"*{SUFFIX}")):
        try:
            if path.stat().st_mtime < since:
                continue
            failure = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        yield path.name[: -len(SUFFIX)], path, failure
