"""The run's settings (scripts/formats/settings.py): its classes name every key of
config/schema.yaml with the schema's type, the object is made once from a config and read
back from its file as it was written. Pure Python: no Snakemake, vLLM or PBS."""

from __future__ import annotations

import dataclasses
import json
import os
import types
import typing
from collections.abc import Mapping

import pytest
import yaml

from formats import settings as run_settings
from workflow import REPO, aurora_config, local_profile_config

SCHEMA = yaml.safe_load((REPO / "config" / "schema.yaml").read_text())
# A JSON schema type -> the Python types a field of that type may be annotated with.
PYTHON_TYPES = {
    "string": {str},
    "integer": {int},
    "number": {float},
    "boolean": {bool},
    "null": {type(None)},
    "array": {tuple},
    "object": {Mapping},  # without properties: a mapping (task_env)
}


def annotated_types(hint) -> set:
    """The outer types a type hint allows (``int | None``: {int, NoneType})."""
    options = (
        typing.get_args(hint)
        if typing.get_origin(hint) in (typing.Union, types.UnionType)
        else (hint,)
    )
    return {typing.get_origin(o) or o for o in options}


def schema_types(schema: dict) -> set:
    """The Python types a schema property allows (oneOf and type lists alike)."""
    if "oneOf" in schema:
        return set().union(*(schema_types(s) for s in schema["oneOf"]))
    kinds = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
    return set().union(*(PYTHON_TYPES.get(k, {k}) for k in kinds))


def key_table(cls, schema: dict, prefix: str = "") -> list[tuple[str, set, set]]:
    """(dotted key, the field's types, the schema's types) of every config field of
    ``cls`` and every schema property, nested ones too; a side that lacks the key: None."""
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in run_settings.config_fields(cls)}
    properties = schema.get("properties", {})
    rows = []
    for name in sorted(fields | set(properties)):
        if name not in fields or name not in properties:
            rows.append((f"{prefix}{name}", name in fields, name in properties))
            continue
        hint, sub = hints[name], properties[name]
        classes = [c for c in annotated_types(hint) if dataclasses.is_dataclass(c)]
        if classes:
            assert sub["type"] == "object", f"{prefix}{name}"
            rows += key_table(classes[0], sub, f"{prefix}{name}.")
            continue
        rows.append((f"{prefix}{name}", annotated_types(hint), schema_types(sub)))
    return rows


def test_every_schema_key_is_a_field_of_the_settings_with_the_schema_type():
    rows = key_table(run_settings.Settings, SCHEMA)
    assert len(rows) > 60
    assert ("warm.server", {str}, {str}) in rows
    wrong = [row for row in rows if row[1] != row[2]]
    assert wrong == [], "config/schema.yaml and scripts/formats/settings.py disagree"


def test_keys_the_schema_does_not_require_have_a_default_and_required_ones_none():
    def walk(cls, schema, prefix=""):
        for f in run_settings.config_fields(cls):
            sub = schema["properties"][f.name]
            has_default = not (
                f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            )
            yield f"{prefix}{f.name}", has_default, f.name not in schema.get("required", [])
            for option in annotated_types(typing.get_type_hints(cls)[f.name]):
                if dataclasses.is_dataclass(option):
                    yield from walk(option, sub, f"{prefix}{f.name}.")

    wrong = [
        key for key, default, optional in walk(run_settings.Settings, SCHEMA) if default != optional
    ]
    assert wrong == []


@pytest.mark.parametrize("make", [local_profile_config, aurora_config])
def test_settings_hold_the_config_and_give_it_back(make):
    config = make()
    settings = run_settings.from_config(config, python="/usr/bin/python3")
    # a key the schema does not require comes back with its default
    assert settings.config() == config | {
        "weights": {"broadcast_host": "{host}"} | config["weights"]
    }
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.warm.server = "vllm"
    assert settings.tiles.cpu_bind == tuple(config["tiles"]["cpu_bind"])
    with pytest.raises(TypeError):
        settings.task_env["X"] = "1"


def test_what_follows_from_the_config_is_derived_once(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    vllm = local_profile_config()["vllm"] | {"chat_template": "t.jinja"}
    config = local_profile_config(python="", task_env={"A": "1"}, vllm=vllm)
    settings = run_settings.from_config(config, python="/the/python")
    assert settings.inference_python == "/the/python"
    assert settings.engine_env == {
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "VLLM_CACHE_ROOT": str(tmp_path / "cache" / "vllm"),
        "A": "1",
    }
    assert settings.served_model_names == (config["model"],)
    task = settings.task("/models/m")
    assert task["chat_template"] == str(tmp_path / "t.jinja")
    assert task["model"] == "/models/m" and task["served_model_name"] == [config["model"]]
    assert task["sampling"] == config["sampling"] and task["engine_args"] == []
    named = run_settings.from_config(local_profile_config(vllm=vllm | {"served_model_name": "a"}))
    assert named.served_model_names == ("a",)


def test_the_file_is_written_once_and_read_back_as_made_elsewhere(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    settings = run_settings.from_config(aurora_config(), python="/p")
    path = run_settings.write_settings(settings)
    assert path.is_absolute() and path.parent == tmp_path / run_settings.FOLDER
    assert json.loads(path.read_text())["format"] == run_settings.FORMAT
    assert run_settings.write_settings(settings) == path  # the same settings, the same file
    other = run_settings.from_config(aurora_config(warm={"server": "vllm"}), python="/p")
    assert run_settings.write_settings(other) != path
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    os.chdir(elsewhere)  # read in another folder: nothing derived again
    assert run_settings.read_settings(path) == settings


def test_the_main_snakemake_writes_the_file_and_a_jobs_snakemake_reads_it(tmp_path, monkeypatch):
    """formats/settings.py of_process: the main Snakemake makes the settings and names
    their file for its children; a PBS job's Snakemake reads that file, not its config."""
    monkeypatch.chdir(tmp_path)
    environ: dict = {}
    made, path = run_settings.of_process(aurora_config(), main=True, environ=environ)
    assert environ == {run_settings.VARIABLE: str(path)} and path.is_file()
    assert run_settings.read_settings(path) == made
    other = aurora_config(engine="echo")  # what a job's own config would say
    read, read_path = run_settings.of_process(other, main=False, environ=dict(environ))
    assert read == made and read_path == path
    assert run_settings.settings_path(read) == path  # read back, the same digest
    alone, _ = run_settings.of_process(other, main=False, environ={})
    assert alone.engine == "echo"  # no file named (a job script of before): its config


@pytest.mark.parametrize("make", [local_profile_config, aurora_config])
def test_a_ranks_settings_made_from_a_checked_config_need_no_second_check(make):
    """Settings.task gives what rank/checks.py's checked_settings would: every key, each
    value as the schema let it through (the rank jobs take it as it is)."""
    from rank import checks

    task = run_settings.from_config(make(), python="/p").task("/models/m")
    assert checks.checked_settings(task) == task
