"""The engine spec: what the warm engines of a PBS submission, or of a local run, need.
One JSON file per submission, ``logs/pbs/<name>.engines.json`` (written by pbs-submit,
pbs/submission.py), or per local run, ``<registry root>/<run>.engines.json`` (written by
the local run's service, engine/local.py); beside it ``<name>.key``, the engines' API key
(mode 0600, new for each).

Made in two steps: `from_settings`, in the main Snakemake, what the run's settings say
(formats/settings.py), carried to pbs-submit in the provider's settings; then
`with_model`, by pbs-submit or the local run, the model the engines load (from the model
marker, formats/marker.py), its staging and the Python that runs them. Read by the
engines' supervisor (engine/supervisor.py), a node's Snakemake (pbs/node.py) and the rank
jobs of a submission (pipeline/rank_job.py, through the variable the supervisor names).

A JSON object:
    engine           config engine (vllm or echo)
    vllm             config vllm, file names absolute (a node's supervisor may run in
                     another folder), served_model_name as a list
    tiles            config tiles (a local run: base_port the one it chose)
    env              what every engine runs with (the settings' engine_env)
    launcher         config engine_launcher
    max_restarts, node_restarts, ready_timeout_s, ranks_in_flight, server,
    stall_timeout_s, listen      config warm.*
    registry_root    the engine registry's root, absolute (formats/registry.py)
    model            the folder the engines load ("" for the echo engine)
    versions, weights_bytes      the model marker's (formats/marker.py engine_fields)
    stage, stage_dir whether the engines load a node-local copy, and where it lies
    python           the Python that runs the engines
    prepare          a local run's engines started beside rule fetch_model: what their
                     Python runs instead of engine/vllm_server.py, before its arguments
                     (model/fetch.py ... --serve; absent otherwise)
    api_key_file     the key file beside the spec
    format           FORMAT (specs written before 2026-12-07 have none: format 1)

Stdlib only: pbs-submit writes it under a login node's Python.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from formats import registry
from formats.files import write_atomic
from formats.settings import plain

if TYPE_CHECKING:
    from formats.settings import Settings

FORMAT = 1
SUFFIX = ".engines.json"
KEY_SUFFIX = ".key"


def from_settings(settings: Settings) -> dict:
    """What the run's settings (formats/settings.py) say of the engines."""
    warm = settings.warm
    vllm = plain(settings.vllm)
    vllm["served_model_name"] = list(settings.served_model_names)
    vllm["chat_template"] = settings.chat_template_file
    return {
        "engine": settings.engine,
        "vllm": vllm,
        "tiles": plain(settings.tiles),
        "env": dict(settings.engine_env),
        "launcher": list(settings.engine_launcher),
        "max_restarts": warm.max_restarts,
        "node_restarts": warm.node_restarts,
        "ready_timeout_s": warm.ready_timeout_s,
        "ranks_in_flight": warm.ranks_in_flight,
        "server": warm.server,
        "stall_timeout_s": warm.stall_timeout_s,
        "listen": warm.listen,
        "registry_root": os.path.abspath(registry.REGISTRY_ROOT),
    }


def with_model(
    spec: Mapping, marker_fields: Mapping, *, stage: bool, stage_dir: str, python: str
) -> dict:
    """``spec`` with the model the engines load: ``marker_fields``, what they take of the
    model marker (formats/marker.py engine_fields: the folder, "" here for the echo
    engine, the versions and the size); whether they load a node-local copy, and the
    Python that runs them."""
    fields = dict(marker_fields)
    if spec["engine"] == "echo":
        fields["model"] = ""
    return {**spec, **fields, "stage": stage, "stage_dir": stage_dir, "python": python}


def spec_path(folder: str | os.PathLike, name: str) -> Path:
    """The spec of submission (or local run) ``name`` in ``folder``."""
    return Path(folder) / f"{name}{SUFFIX}"


def key_path(path: str | os.PathLike) -> Path:
    """The engines' key file beside the spec at ``path``."""
    path = Path(path)
    return path.with_name(path.name.removesuffix(SUFFIX) + KEY_SUFFIX)


def write_spec(path: str | os.PathLike, spec: Mapping) -> None:
    write_atomic(path, json.dumps({**spec, "format": FORMAT}))


def read_spec(path: str | os.PathLike) -> dict:
    return json.loads(Path(path).read_text())
