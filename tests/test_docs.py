"""The docs agree with what they describe: every config key of config/schema.yaml is in
config/README.md and no other, with the schema's type and config/config.yaml's default,
and the README stays a short guide with no session diary.

Pure file reading: no Snakemake, vLLM or PBS.
"""

import re
from pathlib import Path

import pytest
import yaml

from formats import settings

ROOT = Path(__file__).resolve().parent.parent
SCHEMA = ROOT / "config" / "schema.yaml"
CONFIG_README = ROOT / "config" / "README.md"
README = ROOT / "README.md"
PRODUCT_DOCS = [
    "README.md",
    "config/README.md",
    "profiles/aurora/README.md",
    "benchmarks/README.md",
    "tests/README.md",
]
README_MAX_LINES = 450
SESSION = re.compile(r"session \d+", re.IGNORECASE)
# The first cell of a Markdown table row when it is one backticked name: `key`, `a.b`.
TABLE_KEY = re.compile(r"^\|\s*`([A-Za-z_][A-Za-z0-9_.]*)`\s*\|")


def schema_keys(schema: dict, prefix: str = "") -> set[str]:
    """Every property of the schema, nested ones as dotted names (`warm.server`)."""
    keys = set()
    for name, sub in schema.get("properties", {}).items():
        dotted = f"{prefix}{name}"
        keys.add(dotted)
        keys |= schema_keys(sub, f"{dotted}.")
    return keys


def documented_keys(text: str) -> set[str]:
    """The keys named in the first column of config/README.md's tables."""
    return {m.group(1) for line in text.splitlines() if (m := TABLE_KEY.match(line))}


def test_schema_keys_walks_nested_properties():
    schema = {
        "properties": {
            "a": {"type": "string"},
            "b": {"type": "object", "properties": {"c": {"type": "integer"}}},
        }
    }
    assert schema_keys(schema) == {"a", "b", "b.c"}


def test_documented_keys_reads_first_table_column_only():
    text = "| key | meaning |\n|---|---|\n| `warm.server` | see `other.key` |\nText `x.y`.\n"
    assert documented_keys(text) == {"warm.server"}


def test_every_schema_key_is_in_config_readme():
    keys = schema_keys(yaml.safe_load(SCHEMA.read_text()))
    assert "warm.server" in keys and "pbs.nodes_per_submission" in keys
    documented = documented_keys(CONFIG_README.read_text())
    missing = sorted(keys - documented)
    assert not missing, f"config/README.md lacks a table row for: {missing}"


def test_config_readme_names_no_key_the_schema_lacks():
    keys = schema_keys(yaml.safe_load(SCHEMA.read_text()))
    extra = sorted(documented_keys(CONFIG_README.read_text()) - keys)
    assert not extra, f"config/README.md documents keys config/schema.yaml lacks: {extra}"


def test_config_readme_gives_each_keys_type_and_default_as_the_schema_and_config_yaml():
    """The type and default columns of config/README.md's tables, against config/schema.yaml
    and config/config.yaml (formats/settings.py key_table)."""
    schema = yaml.safe_load(SCHEMA.read_text())
    defaults = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    table = {key: (kind, default) for key, kind, default in settings.key_table(schema, defaults)}
    assert table["warm.ready_timeout_s"] == ("number > 0 or null", "null")
    assert table["weights.broadcast_host"] == ("string", "`{host}` (optional)")
    documented = {}
    for line in CONFIG_README.read_text().splitlines():
        if match := TABLE_KEY.match(line):
            cells = [cell.strip() for cell in line.split("|")[2:4]]
            documented[match.group(1)] = tuple(cells)
    wrong = {key: (cells, table[key]) for key, cells in documented.items() if cells != table[key]}
    assert wrong == {}, "config/README.md (type, default) vs the schema and config.yaml"


def test_readme_is_a_short_guide():
    lines = README.read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines"


@pytest.mark.parametrize("name", PRODUCT_DOCS)
def test_no_session_numbers_in_product_docs(name):
    text = (ROOT / name).read_text()
    found = [f"{i}: {line}" for i, line in enumerate(text.splitlines(), 1) if SESSION.search(line)]
    assert not found, f"{name} says who worked when; use dates and commits:\n" + "\n".join(found)
