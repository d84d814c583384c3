"""Run the real workflow in a scratch folder: the repo's code, the test's own data."""

import ast
import io
import json
import os
import re
import signal
import subprocess
import sys
import tokenize
from collections.abc import Mapping
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = [sys.executable, "-m", "snakemake"]
TINY_MODEL = REPO / "models" / "tiny-opt"
# A probe run with `python -c` prints its JSON after this mark: vLLM logs to stdout too,
# also after the probe's last line (an engine core's shutdown message).
PROBE_MARK = "PROBE-RESULT "


def probe_result(stdout: str):
    """The JSON a probe printed after PROBE_MARK."""
    (line,) = [line for line in stdout.splitlines() if line.startswith(PROBE_MARK)]
    return json.loads(line.removeprefix(PROBE_MARK))


def make_workdir(path: Path, ranks: dict[str, str | bytes]) -> Path:
    """Lay out a run folder: links to the workflow's code, and a data/ of the given rank files."""
    path.mkdir(parents=True, exist_ok=True)
    for name in ("Snakefile", "rules", "config", "report", "scripts", "profiles", "models"):
        (path / name).symlink_to(REPO / name)
    data = path / "data"
    data.mkdir()
    for name, content in ranks.items():
        target = data / name
        if isinstance(content, bytes):
            target.write_bytes(content)
        else:
            target.write_text(content, encoding="utf-8")
    return path


def write_config(workdir: Path, overrides: dict) -> Path:
    path = workdir / "test-config.yaml"
    path.write_text(yaml.safe_dump(overrides))
    return path


def default_ctrl_c() -> None:
    """Ctrl-C as in a terminal's foreground job: a test run started in the background
    with job control off (``cmd &`` in a script) inherits SIGINT ignored, and Snakemake
    would then ignore the tests' Ctrl-C."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def snakemake(workdir: Path, *args: str, profile="profiles/local", configfiles=(), **kwargs):
    """Run Snakemake as a user would; returns the CompletedProcess (or Popen with popen=True)."""
    command = [*SNAKEMAKE, "--profile", profile, *args]
    if configfiles:
        command += ["--configfile", *map(str, configfiles)]
    popen = kwargs.pop("popen", False)
    env = {**os.environ, **kwargs.pop("env", {})}
    if popen:
        return subprocess.Popen(
            command,
            cwd=workdir,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
            preexec_fn=default_ctrl_c,
        )
    return subprocess.run(
        command, cwd=workdir, env=env, capture_output=True, text=True, timeout=1800, **kwargs
    )


def deep_merge(base: Mapping, update: Mapping) -> dict:
    """``update`` over ``base``, mappings merged key by key (as Snakemake merges configs)."""
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def local_config(workdir: Path, **overrides) -> list[Path]:
    """The local profile's config files plus a test's own overrides (later wins)."""
    return [REPO / "profiles" / "local" / "local.yaml", write_config(workdir, overrides)]


def planned_ranks(dry_run_output: str) -> list[str]:
    """Ranks of the infer jobs a dry run would start."""
    return sorted(set(re.findall(r"rank=(\d+)", dry_run_output)), key=int)


def _string_literal(text: str, at: int) -> tuple[str, int]:
    """The Python string literal starting at ``at``, and the offset just past it."""
    token = next(tokenize.generate_tokens(io.StringIO(text[at:]).readline))
    assert token.type == tokenize.STRING and token.start == (1, 0), text[at : at + 40]
    lines = token.string.split("\n")
    assert len(lines) == 1, "a repr never spans lines"
    return ast.literal_eval(token.string), at + len(token.string)


def read_records(path: Path) -> list[tuple[str, str]]:
    """Parse a .out back into (prompt, generated) pairs; the whole file must be records."""
    text = path.read_text(encoding="utf-8")
    pairs, at = [], 0
    while at < len(text):
        assert text.startswith("Prompt: ", at), f"{path}: no record at offset {at}"
        prompt, at = _string_literal(text, at + len("Prompt: "))
        assert text.startswith(", Generated text: ", at), f"{path}: bad record at {at}"
        generated, at = _string_literal(text, at + len(", Generated text: "))
        assert text.startswith("\n\n", at), f"{path}: record not ended by a blank line"
        at += 2
        pairs.append((prompt, generated))
    return pairs
