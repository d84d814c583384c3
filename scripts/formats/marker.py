"""The model marker: ``results/model/<slug>.json``, written last (atomically) by rule
fetch_model (scripts/model/fetch.py) once the model is ready for the engines.

Read by the Snakefile's helpers (pipeline/rank_job.py: the folder the engines load, the
versions a record names) and the PBS provider (pbs/submission.py: the staging); what the
engines take of it goes into their spec (formats/engine_spec.py) through `engine_fields`.

A JSON object (indent 2):
    model            config model as given
    path             the folder the engines load
    how              how the weights were found (local, shared cache, hf_home, download)
    vllm_cache_root  VLLM_CACHE_ROOT with the model-info cache
    architectures    the model's architectures
    versions         vLLM, torch and IPEX the engines run with
    weights_bytes    size of the model folder (engine ready timeouts)
    format           FORMAT (markers written before 2026-12-05 have none: format 1)

Stdlib only: the PBS provider reads it under a login node's Python.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

from formats.files import write_atomic

FORMAT = 1

_MARKERS: dict[str, tuple[int, dict]] = {}


def folder_bytes(folder: str | os.PathLike) -> int:
    """A model folder's ``weights_bytes``: the size of its files."""
    return sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file())


def write_marker(path: str | os.PathLike, marker: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps({**marker, "format": FORMAT}, indent=2) + "\n")


def read_marker(path: str | os.PathLike) -> dict:
    """The marker (``path``: folder the engines load, ``versions``, ``weights_bytes``),
    read once per process while the file stays the same: every warm rank asks for it."""
    path = os.fspath(path)
    stamp = os.stat(path).st_mtime_ns
    cached = _MARKERS.get(path)
    if cached is None or cached[0] != stamp:
        cached = _MARKERS[path] = (stamp, json.loads(Path(path).read_text()))
    return cached[1]


def _one(marker) -> str | os.PathLike | None:
    """The marker's path from its path or the Snakefile's list of it ([] for echo)."""
    if isinstance(marker, Sequence) and not isinstance(marker, str):
        return marker[0] if marker else None
    return marker or None


def marker_field(marker: str | os.PathLike | Sequence | None, name: str, quiet: bool = False):
    """A field of the marker; None without one (the echo engine has none).

    ``marker``: its path, or the Snakefile's list of it ([] for echo). ``quiet``: an
    unreadable marker gives None too (else its error)."""
    marker = _one(marker)
    if not marker:
        return None
    try:
        return read_marker(marker).get(name)
    except (OSError, ValueError):
        if quiet:
            return None
        raise


def marker_versions(marker, quiet: bool = False) -> dict:
    """vLLM, torch and IPEX as rule fetch_model found them ({} without a marker)."""
    return marker_field(marker, "versions", quiet) or {}


def model_folder(marker, model: str) -> str:
    """The folder (or id) the engines load: the marker's, else ``model`` (no marker)."""
    marker = _one(marker)
    return read_marker(marker)["path"] if marker else model


def engine_fields(marker, model: str, quiet: bool = False) -> dict:
    """What the engines take from the marker (or ``model`` without one): ``model``, the
    folder they load; ``versions`` and ``weights_bytes`` (engine ready timeouts), which
    ``quiet`` leaves empty when the marker cannot be read."""
    return {
        "model": model_folder(marker, model),
        "versions": marker_versions(marker, quiet),
        "weights_bytes": marker_field(marker, "weights_bytes", quiet),
    }
