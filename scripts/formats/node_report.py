"""What a warm submission's node Snakemakes report, in the job's engine registry
folder (formats/registry.py), ``<logs/engines>/<job id>/ranks/``.

``<host>.exit``: one line per node, written by its owner (pbs/node.py ``ranks-node``)
when its Snakemake has ended: the exit status, and, when the node's ranks were cut
off by the infrastructure rather than failed by themselves (its Snakemake died and
was not brought back), `INFRASTRUCTURE` and why: ``247 infrastructure: ...``.

``runs.json``: one entry per start of the job's ranks (`add_run`: time, hosts). PBS
runs a job again from its start when it requeues it (a node of it was lost, after the
server's node_fail_requeue); a second entry tells the nodes to run only the ranks not
yet whole.

``infrastructure.json``: written by the job's ``ranks`` step when nodes' ranks were
cut off (a report saying so, or none at all: the node or its owner is gone); read by
the PBS provider, which then continues the submission (pbs.resubmit) and counts it
apart from ranks' own failures. A JSON object:
    time     UNIX time of the write
    nodes    host -> what its report said (or that there was none)
    format   FORMAT

Stdlib only: the PBS provider reads it under a login node's Python.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from pathlib import Path

from formats.files import safe_name, write_atomic

FORMAT = 1
FOLDER = "ranks"
INFRASTRUCTURE = "infrastructure"
NOTE = "infrastructure.json"
RUNS = "runs.json"


def reports_dir(registry: Path) -> Path:
    return Path(registry) / FOLDER


def exit_file(registry: Path, host: str) -> Path:
    return reports_dir(registry) / f"{safe_name(host)}.exit"


def write_exit(registry: Path, host: str, code: int, cut_off: str = "") -> None:
    """A node's report: its Snakemake's status, and why the infrastructure cut its
    ranks off (``cut_off``), if it did."""
    line = f"{code} {INFRASTRUCTURE}: {cut_off}" if cut_off else str(code)
    reports_dir(registry).mkdir(parents=True, exist_ok=True)
    write_atomic(exit_file(registry, host), line + "\n")


def read_exit(registry: Path, host: str) -> str | None:
    """A node's report line, or None when it wrote none."""
    try:
        return exit_file(registry, host).read_text().strip()
    except OSError:
        return None


def is_cut_off(status: str) -> bool:
    return f" {INFRASTRUCTURE}: " in f" {status}" or status.startswith(f"{INFRASTRUCTURE}:")


def write_note(registry: Path, nodes: Mapping[str, str], now: float | None = None) -> None:
    note = {"time": round(time.time() if now is None else now, 3), "nodes": dict(nodes)}
    reports_dir(registry).mkdir(parents=True, exist_ok=True)
    write_atomic(reports_dir(registry) / NOTE, json.dumps(note | {"format": FORMAT}))


def read_note(registry: Path) -> dict | None:
    """The job's note of nodes whose ranks the infrastructure cut off, or None."""
    try:
        note = json.loads((reports_dir(registry) / NOTE).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(note, dict) or not isinstance(note.get("nodes"), dict):
        return None
    return note


def read_runs(registry: Path) -> list[dict]:
    """The starts of the job's ranks so far (`add_run`), oldest first."""
    try:
        runs = json.loads((reports_dir(registry) / RUNS).read_text())
    except (OSError, ValueError):
        return []
    return [r for r in runs if isinstance(r, dict)] if isinstance(runs, list) else []


def add_run(registry: Path, hosts: list[str], now: float | None = None) -> list[dict]:
    """Note a start of the job's ranks on ``hosts``; returns every start so far."""
    runs = read_runs(registry)
    runs.append({"time": round(time.time() if now is None else now, 3), "hosts": list(hosts)})
    reports_dir(registry).mkdir(parents=True, exist_ok=True)
    write_atomic(reports_dir(registry) / RUNS, json.dumps(runs))
    return runs
