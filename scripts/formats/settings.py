"""The run's settings: the workflow config (config/config.yaml, the profile's file and
--config), checked against config/schema.yaml once when the Snakefile loads, made into
one frozen, typed `Settings`, and the file that carries it to the run's other processes,
``.snakemake/settings/<digest>.json`` (`write_settings`, `read_settings`): the main
Snakemake writes it when it loads, the Snakemakes of its PBS jobs read it (`of_process`),
and so does a rank's task with an engine of its own (scripts/rank/task.py).

The classes below name every key of config/schema.yaml with its Python type
(tests/test_settings.py holds them against the schema); config/config.yaml gives the
defaults, config/README.md the meanings. A key the schema does not require has its
default here. `key_table`: each key's type and default as config/README.md's tables
write them (tests/test_docs.py holds the tables against it).

What follows from the config is derived here, once, when the object is made
(`from_config`), and carried as it is from then on, file included: a process that reads
the file does not derive it again in another folder or under another Python.
    engine_env          what every engine (and a rank's task) runs with: no hub, vLLM's
                        cache (absolute), config task_env over them
    inference_python    the Python that runs inference (config python, else the one
                        running Snakemake)
    served_model_names  config vllm.served_model_name as a list (null: config model)
    chat_template_file  config vllm.chat_template, absolute (or None)

The file: one JSON object, every field of `Settings` (lists for tuples) and ``format``
(`FORMAT`). Its name is the digest of its content, so the processes that make the same
settings agree on one file and two runs with different settings never share one; it is
written atomically (formats/files.py).

Stdlib only, and importable by Python 3.9 (the PBS provider's commands, under a login
node's Python, import it through formats/engine_spec.py); made and read under Python 3.10
or later (the workflow's and the engines').
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from formats.files import write_atomic

FORMAT = 1
FOLDER = ".snakemake/settings"
# The file of the run, in the environment of the processes the main Snakemake starts and
# of its PBS jobs (the job script exports it: pbs/submission.py).
VARIABLE = "WORKFLOW_SETTINGS"


@dataclass(frozen=True)
class Dataset:
    input: str
    rank_size: int
    column: str
    carry: tuple[str, ...]
    embed: bool


@dataclass(frozen=True)
class Sampling:
    temperature: float
    top_p: float
    max_tokens: int
    seed: int | None
    ignore_eos: bool


@dataclass(frozen=True)
class Vllm:
    dtype: str
    max_model_len: int | None
    enforce_eager: bool
    cpu_kv_cache_gib: float | None
    gpu_memory_utilization: float
    long_prompts: str
    engine_args: tuple[str, ...]
    bad_requests: str = "error_line"
    embeddings_npy: bool = False
    chat_template: str | None = None
    served_model_name: str | tuple[str, ...] | None = None


@dataclass(frozen=True)
class Warm:
    ranks_in_flight: int
    max_restarts: int
    node_restarts: int
    ready_timeout_s: float | None
    ranks_per_engine: int
    start_minutes: int | None
    rank_minutes: int | None
    server: str
    retry_after_engine_death: int
    stall_timeout_s: float
    listen: str


@dataclass(frozen=True)
class Tiles:
    per_node: int
    per_job: int
    hierarchy: str
    cpu_bind: tuple[str, ...]
    base_port: int


@dataclass(frozen=True)
class Weights:
    shared_hf_home: str
    hf_home: str
    stage: bool
    stage_dir: str
    broadcast_host: str = "{host}"


@dataclass(frozen=True)
class Pbs:
    account: str
    queue: str
    filesystems: str
    place: str
    nodes_per_submission: int
    walltime_margin_minutes: int
    setup: tuple[str, ...]
    status_interval: int
    resubmit: int
    estimate_margin_percent: float = 0
    budget_node_hours: float | None = None


@dataclass(frozen=True)
class Settings:
    """The run's settings: config keys (config/schema.yaml), then what is derived from
    them (the module's docstring)."""

    data_dir: str
    results_dir: str
    model: str
    engine: str
    python: str
    sampling: Sampling
    vllm: Vllm
    warm_engines: bool
    warm: Warm
    engine_launcher: tuple[str, ...]
    task_env: Mapping[str, str]
    tiles: Tiles
    launcher: tuple[str, ...]
    node_launcher: tuple[str, ...]
    weights: Weights
    vllm_cache_root: str
    progress_interval_s: float
    runtime_minutes: int
    pbs: Pbs
    dataset: Dataset | None = None
    # Derived once (from_config), carried as they are.
    engine_env: Mapping[str, str] = field(default_factory=dict, metadata={"derived": True})
    inference_python: str = field(default="", metadata={"derived": True})
    served_model_names: tuple[str, ...] = field(default=(), metadata={"derived": True})
    chat_template_file: str | None = field(default=None, metadata={"derived": True})

    def task(self, model: str) -> dict:
        """What a rank's task needs (scripts/rank/task.py's settings, rank/checks.py),
        with ``model`` the folder it loads (a node's copy, when staged)."""
        settings = {"engine": self.engine, "model": model, "sampling": plain(self.sampling)}
        settings |= plain(self.vllm)
        settings["served_model_name"] = list(self.served_model_names)
        settings["chat_template"] = self.chat_template_file
        return settings

    def config(self) -> dict:
        """The config keys as plain JSON values (mappings and lists), for the code that
        still takes the config's shape."""
        return {
            f.name: plain(getattr(self, f.name))
            for f in dataclasses.fields(self)
            if not f.metadata.get("derived") and not (f.name == "dataset" and self.dataset is None)
        }


def config_fields(cls) -> list[dataclasses.Field]:
    """The fields of ``cls`` that are config keys (derived ones aside)."""
    return [f for f in dataclasses.fields(cls) if not f.metadata.get("derived")]


def _frozen(kind, value):
    """``value`` (a JSON value) as type ``kind`` holds it: lists as tuples, mappings as
    read-only mappings, a mapping of a class of this module as that class."""
    if value is None:
        return None
    for option in typing.get_args(kind) or (kind,):
        if dataclasses.is_dataclass(option) and isinstance(value, Mapping):
            return _make(option, value)
    if isinstance(value, list):
        return tuple(value)
    if isinstance(value, Mapping):
        return types.MappingProxyType(dict(value))
    return value


def _make(cls, values: Mapping):
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: _frozen(hints[k], v) for k, v in values.items() if k in known})


def plain(value):
    """A value of `Settings` as JSON takes it: tuples as lists, mappings as dicts."""
    if dataclasses.is_dataclass(value):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def from_config(config: Mapping, python: str = sys.executable) -> Settings:
    """The settings of a config checked against config/schema.yaml, what follows from it
    derived once (file names absolute in this folder). ``python``: the one running
    Snakemake, config python's fallback."""
    base = _make(Settings, {k: v for k, v in config.items() if k in _CONFIG_KEYS})
    cache_root = os.path.abspath(os.path.expanduser(base.vllm_cache_root))
    env = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_CACHE_ROOT": cache_root}
    names = base.vllm.served_model_name or base.model
    template = base.vllm.chat_template
    return dataclasses.replace(
        base,
        engine_env=types.MappingProxyType(env | dict(base.task_env)),
        inference_python=base.python or python,
        served_model_names=(names,) if isinstance(names, str) else tuple(names),
        chat_template_file=os.path.abspath(template) if template else None,
    )


_CONFIG_KEYS = {f.name for f in config_fields(Settings)}


def to_json(settings: Settings) -> str:
    return json.dumps({**plain(settings), "format": FORMAT}, sort_keys=True)


def from_json(text: str) -> Settings:
    values = json.loads(text)
    values.pop("format", None)
    return _make(Settings, values)


def settings_path(settings: Settings, folder: str | os.PathLike = FOLDER) -> Path:
    """The file of ``settings`` in ``folder``: named by the digest of its content."""
    digest = hashlib.sha256(to_json(settings).encode()).hexdigest()[:16]
    return Path(folder).absolute() / f"{digest}.json"


def write_settings(settings: Settings, folder: str | os.PathLike = FOLDER) -> Path:
    """Write the file of ``settings`` (atomically) unless it is there; its path, absolute."""
    path = settings_path(settings, folder)
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, to_json(settings))
    return path


def read_settings(path: str | os.PathLike) -> Settings:
    return from_json(Path(path).read_text())


def of_process(config: Mapping, *, main: bool, environ=os.environ) -> tuple[Settings, Path]:
    """The settings of this Snakemake and their file. The main one makes them from
    ``config`` (checked), writes their file and names it in ``environ`` (`VARIABLE`) for
    the processes it starts; the Snakemake of a PBS job reads the file its job script
    names, as the main one made it, and leaves ``config`` aside."""
    given = environ.get(VARIABLE)
    if given and not main:
        return read_settings(given), Path(given)
    settings = from_config(config)
    path = write_settings(settings)
    if main:
        environ[VARIABLE] = str(path)
    return settings, path


# ----------------------------------------------------------------------------- key table
# config/README.md's tables, column by column: key, type, default (tests/test_docs.py).


def key_table(schema: Mapping, defaults: Mapping) -> list[tuple[str, str, str]]:
    """(dotted key, type, default) of every key of config/schema.yaml (``schema``), in its
    order, as config/README.md writes them: the type from the schema, the default from
    config/config.yaml (``defaults``), else from these classes ("(optional)")."""
    return list(_rows(schema, defaults, Settings, ""))


def _rows(schema: Mapping, defaults: Mapping | None, cls, prefix: str):
    fields = {f.name: f for f in dataclasses.fields(cls)} if cls else {}
    hints = typing.get_type_hints(cls) if cls else {}
    for name, sub in schema.get("properties", {}).items():
        if isinstance(defaults, Mapping) and name in defaults:
            default = default_text(defaults[name])
        elif name in fields and fields[name].default is not dataclasses.MISSING:
            default = f"{default_text(fields[name].default)} (optional)"
        else:
            default = ""
        yield f"{prefix}{name}", type_text(sub), default
        inner = [c for c in typing.get_args(hints.get(name)) or (hints.get(name),)]
        inner = next((c for c in inner if dataclasses.is_dataclass(c)), None)
        value = defaults.get(name) if isinstance(defaults, Mapping) else None
        yield from _rows(sub, value, inner, f"{prefix}{name}.")


def default_text(value) -> str:
    """A default as config/README.md writes it: `data`, empty, null, 0.8, `[]`."""
    if isinstance(value, Mapping):
        return "`{}`" if not value else ""
    if value is None or isinstance(value, bool):
        return json.dumps(value)
    if value == "":
        return "empty"
    if isinstance(value, (list, tuple)):
        return ", ".join(f"`{v}`" for v in value) if value else "`[]`"
    if isinstance(value, str):
        return f"`{value}`"
    return str(value)


_TYPE_NAMES = {"string": "string", "integer": "integer", "number": "number"}
_TYPE_NAMES |= {"boolean": "boolean", "object": "mapping", "null": "null"}


def type_text(schema: Mapping) -> str:
    """A key's type as config/README.md writes it: `integer >= 1 or null`,
    `number in (0, 1]`, `` `error` or `truncate` ``, `list of strings`."""
    if "oneOf" in schema:
        parts = [type_text(option) for option in schema["oneOf"]]
        null = ", or null" if "null" in parts else ""
        return ", ".join(p for p in parts if p != "null") + null
    if "enum" in schema:
        values = [f"`{v}`" for v in schema["enum"]]
        return " or ".join(values) if len(values) == 2 else ", ".join(values)
    kinds = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
    kind = next((k for k in kinds if k != "null"), "null")
    null = " or null" if kind != "null" and "null" in kinds else ""
    if kind == "array":
        return "list of strings" + null
    if kind == "object" and "properties" not in schema:
        return "mapping of strings" + null
    low, high = schema.get("minimum"), schema.get("maximum")
    above = schema.get("exclusiveMinimum")
    if above is not None and high is not None:
        bounds = f" in ({above}, {high}]"
    elif low is not None and high is not None:
        bounds = f" {low}-{high}"
    elif above is not None:
        bounds = f" > {above}"
    elif low is not None:
        bounds = f" >= {low}"
    else:
        bounds = ""
    return _TYPE_NAMES[kind] + bounds + null
