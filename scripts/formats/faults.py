"""The infrastructure failures of a run: ``logs/pbs/faults.tsv``, one line each.

A failure of the infrastructure (a node lost, a node's Snakemake killed, a submission
ended by PBS) never counts against a rank: its ranks run again, on their node or in a
continuation (pbs.resubmit). The run summary (reporting/summary.py) tells these apart
from the ranks' own failures by this file.

Appended by a node's owner (pbs/node.py: its Snakemake died) and by the PBS provider
(pbs/status.py: PBS requeued a job after losing a node of it; pbs/continuation.py: a
submission continued). Tab-separated, no header:

    time (UNIX)  job id  submission name  kind  nodes (comma-separated)  node-hours  what

``node-hours``: what the failure cost, where known (a lost node: the nodes x hours of
the job's run it ended; the ranks whole by then are kept), else empty.

Stdlib only: the PBS provider appends to it under a login node's Python.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

FILE = "faults.tsv"
NODE_LOST = "node lost"
NODE_SNAKEMAKE = "node Snakemake died"
ENDED_BY_PBS = "ended by PBS"
CUT_OFF = "cut off by the infrastructure"


@dataclass(frozen=True)
class Fault:
    time: float
    job_id: str
    name: str
    kind: str
    nodes: tuple[str, ...]
    node_hours: float | None
    what: str


def _clean(text: str) -> str:
    return " ".join(str(text).split())


def append_fault(
    log_dir: str | os.PathLike,
    job_id: str,
    name: str,
    kind: str,
    nodes: Sequence[str] = (),
    what: str = "",
    node_hours: float | None = None,
    now: float | None = None,
) -> None:
    """One line of ``faults.tsv`` (one write: lines of several writers do not mix)."""
    fields = [
        f"{time.time() if now is None else now:.3f}",
        _clean(job_id),
        _clean(name),
        kind,
        ",".join(nodes),
        "" if node_hours is None else f"{node_hours:.6f}",
        _clean(what),
    ]
    Path(log_dir).mkdir(parents=True, exist_ok=True)
    with open(Path(log_dir) / FILE, "a") as out:
        out.write("\t".join(fields) + "\n")


def read_faults(log_dir: str | os.PathLike, since: float = 0.0) -> list[Fault]:
    """The faults noted at or after ``since``, oldest first."""
    found = []
    with contextlib.suppress(OSError), open(Path(log_dir) / FILE) as lines:
        for line in lines:
            fields = line.rstrip("\n").split("\t")
            if len(fields) != 7:
                continue
            try:
                at = float(fields[0])
                hours = float(fields[5]) if fields[5] else None
            except ValueError:
                continue
            if at >= since:
                nodes = tuple(n for n in fields[4].split(",") if n)
                found.append(Fault(at, fields[1], fields[2], fields[3], nodes, hours, fields[6]))
    return found
