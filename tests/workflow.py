"""The tests' shared helpers: the real workflow in a scratch folder (the repo's code, the
test's own data), the tiny models, the Aurora profile's config and engine spec, free ports
and waiting on a condition. PBS runs have theirs in tests/pbs_runs.py."""

import ast
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import tokenize
from collections.abc import Callable, Mapping
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "scripts"
PYTHON = sys.executable
SNAKEMAKE = [PYTHON, "-m", "snakemake"]
# The tiny models `make` builds (scripts/tools/build_model.py): tiny-opt is the local
# profile's model (make test-unit builds it too), the others the real-vLLM tier's
# (tiny_model(kind)).
TINY_MODEL = REPO / "models" / "tiny-opt"

# A warm engine's settings as profiles/local/local.yaml (vllm.* and task_env) with
# config.yaml's defaults.
ENGINE_SETTINGS = {
    "dtype": "bfloat16",
    "max_model_len": None,
    "enforce_eager": True,
    "cpu_kv_cache_gib": 1,
    "gpu_memory_utilization": 0.9,
}
# VLLM_ENABLE_V1_MULTIPROCESSING=0 keeps the model in the EngineCore process (uni
# executor) instead of adding a worker process: same ready time, ~0.6 GB less RSS.
TASK_ENV = {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
# Seconds a real vLLM server on the tiny model may take to start (40-80 s on 2 cores).
READY_TIMEOUT = 600
# A probe run with `python -c` prints its JSON after this mark: vLLM logs to stdout too,
# also after the probe's last line (an engine core's shutdown message).
PROBE_MARK = "PROBE-RESULT "


def probe_result(stdout: str):
    """The JSON a probe printed after PROBE_MARK."""
    (line,) = [line for line in stdout.splitlines() if line.startswith(PROBE_MARK)]
    return json.loads(line.removeprefix(PROBE_MARK))


def tiny_model(kind: str = "tiny") -> Path:
    """models/tiny-opt (``tiny``) or models/<kind> as `make` builds it, built here if
    missing (scripts/tools/build_model.py: seconds, and a whole folder or none)."""
    path = TINY_MODEL if kind == "tiny" else REPO / "models" / kind
    if not (path / "config.json").exists():
        build = [PYTHON, str(SCRIPTS / "tools" / "build_model.py"), kind, str(path)]
        subprocess.run(build, check=True, timeout=600)
    return path


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(predicate: Callable[[], object], timeout: float, poll: float = 0.1) -> bool:
    """Whether predicate() held within timeout seconds (asked every poll seconds)."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(poll)


def process_cmdline(pid: int) -> bytes:
    """The NUL-separated command line of a live process (empty once it is gone)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def local_profile_config(**changes) -> dict:
    """config/config.yaml under profiles/local/local.yaml, as Snakemake merges them, with
    ``changes`` replacing whole top-level keys. (local_config writes a run's files.)"""
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    local = yaml.safe_load((REPO / "profiles" / "local" / "local.yaml").read_text())
    return deep_merge(config, local) | changes


def aurora_config(**changes) -> dict:
    """config/config.yaml under profiles/aurora/aurora.yaml under ``changes``."""
    config = {}
    for path in (REPO / "config" / "config.yaml", REPO / "profiles" / "aurora" / "aurora.yaml"):
        config = deep_merge(config, yaml.safe_load(path.read_text()))
    return deep_merge(config, changes)


def aurora_engine_spec(model: str, **changes) -> dict:
    """The engine spec of an Aurora submission of ``model`` (not staged), as pbs-submit
    writes it before it adds the python."""
    from formats import engine_spec, settings

    spec = engine_spec.from_settings(settings.from_config(aurora_config(**changes)))
    return spec | {"model": model, "stage": False, "stage_dir": "/tmp"}


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


def ends_with_the_tests() -> None:
    """In a child the tests start: SIGTERM when the test process dies, even by SIGKILL
    (Linux's PR_SET_PDEATHSIG), so that a run never outlives the tests that started it
    (Snakemake ends its engines and submissions on SIGTERM)."""
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG


def run_child() -> None:
    """What a test's Snakemake runs before it starts (``preexec_fn``)."""
    default_ctrl_c()
    ends_with_the_tests()


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
            preexec_fn=run_child,
        )
    return subprocess.run(
        command,
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
        preexec_fn=ends_with_the_tests,
        **kwargs,
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


def numbers_table(rows: int = 13):
    """A pyarrow table of ``rows`` prompts with two columns to carry through: a number
    and a struct holding a list."""
    import pyarrow as pa

    return pa.table({
        "prompt": [f"The number {i} is" for i in range(rows)],
        "label": [i * 10 for i in range(rows)],
        "meta": [{"source": f"s{i % 3}", "tags": ["a"] * (i % 2)} for i in range(rows)],
    })  # fmt: skip


def write_datasets_folder(folder: Path, table, shards: int = 2, batch_rows: int = 4) -> list[str]:
    """``table`` (pyarrow) as Hugging Face datasets' Dataset.save_to_disk lays it out
    (scripts/dataset/tables.py): Arrow stream shards of contiguous rows, in batches of
    ``batch_rows``, listed in order in state.json, and a dataset_info.json. Returns the
    shards' names."""
    import pyarrow as pa

    folder.mkdir(parents=True)
    names, size = [], -(-table.num_rows // shards)
    for index in range(shards):
        names.append(f"data-{index:05d}-of-{shards:05d}.arrow")
        part = table.slice(index * size, size)
        with (
            pa.OSFile(str(folder / names[-1]), "wb") as sink,
            pa.ipc.new_stream(sink, table.schema) as writer,
        ):
            for batch in part.to_batches(max_chunksize=batch_rows):
                writer.write_batch(batch)
    state = {
        "_data_files": [{"filename": name} for name in names],
        "_fingerprint": "0123456789abcdef",
        "_format_columns": None,
        "_format_kwargs": {},
        "_format_type": None,
        "_output_all_columns": False,
        "_split": None,
    }
    (folder / "state.json").write_text(json.dumps(state, indent=2, sort_keys=True))
    (folder / "dataset_info.json").write_text(json.dumps({"citation": "", "features": {}}))
    return names


def serve_rank(rank: int, settings: dict, rank_file: Path, out: Path, pool, record=None, **kwargs):
    """One rank on warm engines as a rank job serves it (pipeline/rank_job.py): its kept
    answers resumed, its record at ``record`` (default: beside its output, ``<out>.json``).
    The rank's log lines."""
    from formats.partial import resume
    from rank import warm

    record, kept = record or out.with_suffix(".json"), resume(out, rank_file, settings)
    return warm.serve_rank(rank, settings, rank_file, out, record, pool, kept, **kwargs)


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


def assert_engines_loaded_no_model(work: Path) -> None:
    """A run that rule fetch_model stopped: the engines started beside it
    (rank_job.start_beside_fetch) loaded no model. (One stopped before its imports
    were done has not yet said that it waits for the rule's marker.)"""
    logs = list((work / "logs" / "engines").glob("local-*/*-tile*.log"))
    assert logs, "no engine was started beside rule fetch_model"
    assert not any("Initializing a V1 LLM engine" in log.read_text() for log in logs)
    assert_checked_in_an_engine(work, status=1)


def assert_checked_in_an_engine(work: Path, status: int) -> None:
    """Rule fetch_model's checks ran in one engine started beside it (model/fetch.py
    `serve`), not in a process of their own, and left no claim or status behind."""
    logs = list((work / "logs" / "engines").glob("local-*/*-tile*.log"))
    said = f"the model's checks ended with status {status} here"
    assert sum(said in log.read_text() for log in logs) == 1, [log.name for log in logs]
    assert sorted(p.name for p in (work / "logs").glob("fetch_model.log*")) == ["fetch_model.log"]
