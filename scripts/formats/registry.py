"""The engine registry of a run: one folder per PBS job (or local run),
``<logs/engines>/<job id>/``, written by the engines' supervisors
(scripts/engine/supervisor.py) and read by the ranks' pool (engine/routing.py), the
progress lines (reporting/progress.py) and the accounting (reporting/accounting.py).

The folder holds, per engine, ``<host>-tile<N>.json`` (its entry, replaced atomically
at each change of state) and ``<host>-tile<N>.log`` (its output); and for the job
``stop`` (written by ``supervisor.py stop``: the engines end), ``launcher.pid`` and
``launcher.exit`` (the launcher's exit status: the ranks stop waiting for engines).

An entry is a JSON object:
    name         "<host>/tile<ids>"
    url          where the engine answers
    log          its output file
    state        starting, ready, restarting, failed or stopped
    restarts     restarts so far
    time         UNIX time of the write
    env          ZE_AFFINITY_MASK, TILE_HOST, TILE_IDS of the engine
    versions     vLLM, torch and IPEX as rule fetch_model found them
    started_at, ready_at   first start and first ready (UNIX time, or null)
    restart_s    seconds spent restarting
    format       FORMAT (entries written before 2026-12-05 have none: format 1)
and, by state: ready_s (seconds to ready), error (failed).

Stdlib only: the PBS provider and the login node's reporting read it.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Mapping
from pathlib import Path

from formats.files import safe_name, write_atomic

FORMAT = 1
REGISTRY_ROOT = "logs/engines"  # the run's registry root, under the working folder
# An entry's state: starting, then ready; restarting after its engine died; at the end
# failed or stopped.
STARTING, READY, RESTARTING = "starting", "ready", "restarting"
FAILED, STOPPED = "failed", "stopped"
COMING = (STARTING, RESTARTING)  # on its way to ready
UP = (STARTING, READY, RESTARTING)  # serving, or on its way
ENDED = (STOPPED, FAILED)  # settled for good: its supervisor is done with it
STOP_FILE = "stop"
LAUNCHER_EXIT = "launcher.exit"
LAUNCHER_PID = "launcher.pid"
SUFFIX = ".json"


def registry_dir(spec: Mapping, job_id: str) -> Path:
    """The registry folder of ``job_id`` under the spec's ``registry_root``."""
    return job_registry(spec["registry_root"], job_id)


def job_registry(root: str | os.PathLike, job_id: str) -> Path:
    """The registry folder of ``job_id`` under the registry root ``root``."""
    return Path(root) / safe_name(job_id)


def engine_file(slot) -> str:
    """The engine's name in the registry (``.json`` entry, ``.log`` output) for a tile
    slot (placement.node_layout.Slot: its host and tiles)."""
    return f"{safe_name(slot.host)}-tile{slot.tiles[0]}"


def write_state(
    path: str | os.PathLike, engine, state: str, versions: Mapping | None = None, **extra
) -> None:
    """One engine's entry (``engine``: an engine.lifecycle.Engine), replaced atomically;
    ``versions``: vLLM, torch and IPEX as rule fetch_model found them (the spec's)."""
    entry = {
        "name": engine.name,
        "url": engine.url,
        "log": str(engine.log_path),
        "state": state,
        "restarts": engine.restarts,
        "time": time.time(),
        "env": {k: engine.env.get(k, "") for k in ("ZE_AFFINITY_MASK", "TILE_HOST", "TILE_IDS")},
        "versions": dict(versions or {}),
        # first start and first ready (epoch s), seconds of restarts: reporting/accounting.py
        "started_at": engine.started_at,
        "ready_at": engine.ready_at,
        "restart_s": round(engine.restart_s, 3),
        # the id this start of the engine proved on its port, and how (client.identify):
        # the ranks' pool checks the server at "url" the same way
        "engine_id": engine.engine_id,
        "proof": engine.proof,
        **extra,
        "format": FORMAT,
    }
    write_atomic(path, json.dumps(entry))


def read_entry(path: str | os.PathLike) -> dict | None:
    """One entry, or None when it cannot be read now (missing, or being replaced: the
    next read gets it)."""
    try:
        entry = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return entry if isinstance(entry, dict) else None


def read_registry(registry: str | os.PathLike) -> dict[str, dict]:
    """Registry file name (without .json) -> its entry; unreadable entries are skipped
    (being replaced right now: the next read gets them)."""
    found = {}
    with contextlib.suppress(FileNotFoundError):
        for item in os.scandir(registry):
            if item.name.endswith(SUFFIX) and not item.name.startswith("."):
                entry = read_entry(item.path)
                if entry is not None:
                    found[item.name[: -len(SUFFIX)]] = entry
    return found


def launcher_exit(registry: str | os.PathLike) -> int | None:
    """The launcher's exit status once it has ended, else None."""
    with contextlib.suppress(OSError, ValueError):
        return int((Path(registry) / LAUNCHER_EXIT).read_text())
    return None


def write_launcher_exit(registry: str | os.PathLike, code: int) -> None:
    """The launcher's (or a local run's supervisor's) exit status: the ranks stop
    waiting for engines that will never come."""
    write_atomic(Path(registry) / LAUNCHER_EXIT, f"{code}\n")
