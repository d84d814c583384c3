"""The workflow's config file (config/config.yaml, its schema config/schema.yaml): values
from the command line read as the schema's types, and the error of a config value that
cannot work, named by its key.

Stdlib only at import (yaml is imported where the config is loaded).
"""

import re


class ConfigError(ValueError):
    """A config value that cannot work, named by its key."""


_BOOLEANS = {"true": True, "yes": True, "on": True, "false": False, "no": False, "off": False}


def _from_string(text: str, types) -> object:
    """``text`` as the first of the JSON schema ``types`` it reads as, else unchanged."""
    for kind in [types] if isinstance(types, str) else types:
        word = text.strip()
        if kind == "integer" and re.fullmatch(r"[+-]?\d+", word):
            return int(word)
        if kind == "number" and re.fullmatch(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?", word):
            return float(word) if re.search(r"[.eE]", word) else int(word)
        if kind == "boolean" and word.lower() in _BOOLEANS:
            return _BOOLEANS[word.lower()]
        if kind == "null" and word.lower() in ("null", "none", "~", ""):
            return None
    return text


def coerce_config(config: dict, schema: dict) -> dict:
    """Turn strings into the numbers, booleans and nulls the schema asks for, in place.

    ``--config 'pbs={nodes_per_submission: 8}'`` hands Snakemake's config the values of
    such a mapping as strings; without this the schema refuses "'8'".
    """
    properties = schema.get("properties", {})
    for key, value in config.items():
        sub = properties.get(key)
        if not isinstance(sub, dict):
            continue
        if isinstance(value, dict):
            coerce_config(value, sub)
        elif isinstance(value, str) and sub.get("type") not in (None, "string"):
            config[key] = _from_string(value, sub["type"])
    return config


def load_config(config: dict, schema_path: str) -> dict:
    """`coerce_config` with the schema file, before Snakemake validates against it."""
    import yaml

    with open(schema_path) as handle:
        return coerce_config(config, yaml.safe_load(handle))
