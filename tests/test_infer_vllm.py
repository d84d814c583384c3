"""scripts/rank/task.py end to end on the real vLLM engine and a real tiny model (marked
`vllm`); without vLLM: tests/test_infer.py, whose helpers this file uses.

The tiny OPT model is built once per session by scripts/tools/build_model.py. vLLM runs
are grouped in two waves of concurrent processes (the machine has 2 cores; a
vLLM start costs ~20 s here, mostly `import vllm`), shared by the tests through
module fixtures.
"""

from __future__ import annotations

import contextlib
import math
import re
import socket
import time
from pathlib import Path

import pytest

from test_infer import (
    MAX_TOKENS,
    SEED_PROMPTS,
    Run,
    parse_out,
    prompt_file,
    run_all,
    settings,
)

# ----------------------------------------------------------------------------- vLLM waves


@pytest.fixture(scope="module")
def seeded_runs(tiny_model, tmp_path_factory) -> list[Run]:
    """Wave 1: the same 4-prompt rank twice with seed 1234, concurrently."""
    work = tmp_path_factory.mktemp("seeded")
    env = {"TILE_HOST": "x1921c0s0b0n0", "ZE_AFFINITY_MASK": "3", "TILE_IDS": "3"}
    runs = []
    for name in ("a", "b"):
        env_i = {**env, "TMPDIR": str(work / name / "missing-tmp" / "deeper")}
        runs.append(Run(work, name, prompt_file(SEED_PROMPTS), settings(tiny_model), env_i, rank=5))
    return run_all(runs)


LONG_LINE = 3  # the long prompt's line number in the file below


@pytest.fixture(scope="module")
def long_prompt(tiny_model) -> tuple[bytes, int]:
    """A prompt file whose line 3 is longer than the tiny model's 256 positions."""
    from tokenizers import Tokenizer

    long_text = " ".join(f"word{i} climate aliens" for i in range(120))
    tokenizer = Tokenizer.from_file(str(tiny_model / "tokenizer.json"))
    n_tokens = len(tokenizer.encode(long_text).ids)  # with the leading </s>, as vLLM counts
    assert n_tokens > 256
    return prompt_file([SEED_PROMPTS[0], "", long_text, SEED_PROMPTS[2]]), n_tokens


@pytest.fixture(scope="module")
def wave2(tiny_model, long_prompt, tmp_path_factory) -> dict[str, Run]:
    """Wave 2: long prompt with "error", with "truncate", and another seed."""
    work = tmp_path_factory.mktemp("wave2")
    data, _ = long_prompt
    runs = {
        "error": Run(work, "error", data, settings(tiny_model), rank=2),
        "truncate": Run(
            work,
            "truncate",
            data,
            settings(tiny_model, long_prompts="truncate", max_model_len=128),
            rank=2,
        ),
        "other_seed": Run(
            work,
            "other_seed",
            prompt_file(SEED_PROMPTS),
            settings(tiny_model, sampling={"seed": 99}),
        ),
        # vLLM's default: the engine in an EngineCore process, a child of the task
        "multiprocess": Run(
            work,
            "multiprocess",
            prompt_file(SEED_PROMPTS),
            settings(tiny_model),
            {"VLLM_ENABLE_V1_MULTIPROCESSING": "1"},
            session=True,
        ),
    }
    run_all(list(runs.values()))
    return runs


@pytest.mark.vllm
def test_four_prompts_four_records_in_order(seeded_runs):
    run = seeded_runs[0]
    assert run.returncode == 0, run.describe()
    pairs = parse_out(run.output.read_text(encoding="utf-8"))
    assert [p for p, _ in pairs] == SEED_PROMPTS
    assert all(isinstance(g, str) and g for _, g in pairs)
    # no temporary file left; the rank's partial answers are gone (their folder stays)
    left = [p for p in run.output.parent.iterdir() if p.name.startswith(".")]
    assert all(p.name == ".partial" and not any(p.iterdir()) for p in left), left


@pytest.mark.vllm
def test_record_fields(seeded_runs, tiny_model):
    run = seeded_runs[0]
    assert run.returncode == 0, run.describe()
    rec = run.load_record()
    expected_keys = {
        "rank",
        "prompts",
        "output_tokens",
        "load_s",
        "generate_s",
        "tokens_per_s",
        "import_s",
        "python_start_s",
        "host",
        "hostname",
        "mask",
        "tiles",
        "model",
        "engine",
        "written_at",
    }
    assert expected_keys <= set(rec), expected_keys - set(rec)
    assert rec["rank"] == 5
    assert rec["prompts"] == 4
    assert rec["output_tokens"] == 4 * MAX_TOKENS  # ignore_eos: every prompt gets all
    assert rec["engine"] == "vllm"
    assert rec["model"] == str(tiny_model)
    assert rec["host"] == "x1921c0s0b0n0"
    assert rec["hostname"] == socket.gethostname()
    assert rec["mask"] == "3" and rec["tiles"] == "3"
    assert rec["truncated"] == []
    assert 0 < rec["import_s"] < run.wall
    assert 0 < rec["load_s"] < run.wall
    assert 0 < rec["generate_s"] < run.wall
    assert rec["import_s"] + rec["load_s"] + rec["generate_s"] < run.wall
    assert rec["python_start_s"] is not None and 0 <= rec["python_start_s"] < 30
    # written after generation, before the process ended
    assert run.started_at < rec["written_at"] < time.time()
    assert math.isclose(rec["tokens_per_s"], 64 / rec["generate_s"], rel_tol=0.01)


@pytest.mark.vllm
def test_summary_line_and_tmpdir(seeded_runs):
    run = seeded_runs[0]
    assert run.returncode == 0, run.describe()
    summary = [line for line in run.stderr.splitlines() if line.startswith("rank 5:")]
    assert len(summary) == 1, run.stderr[-2000:]
    assert re.fullmatch(
        r"rank 5: 4 prompts, 64 tokens, load [\d.]+ s, generate [\d.]+ s, [\d.]+ tok/s, "
        r"host x1921c0s0b0n0, mask 3",
        summary[0],
    ), summary[0]
    assert Path(run.env["TMPDIR"]).is_dir()  # created before vLLM was imported


@pytest.mark.vllm
def test_seed_gives_identical_output_across_processes(seeded_runs, wave2):
    a, b = seeded_runs
    other = wave2["other_seed"]
    for run in (a, b, other):
        assert run.returncode == 0, run.describe()
    assert a.output.read_bytes() == b.output.read_bytes()
    # ... and the seed is what fixes it: another seed gives other text.
    assert other.output.read_bytes() != a.output.read_bytes()
    assert [p for p, _ in parse_out(other.output.read_text())] == SEED_PROMPTS


def processes_of_session(session: int) -> list[str]:
    """Command lines of the live processes of session ``session``."""
    from engine import watchdog

    found = []
    for pid in watchdog.live_processes(watchdog.SESSION, session):
        with contextlib.suppress(OSError):  # gone meanwhile
            found.append(Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode())
    return found


@pytest.mark.vllm
def test_a_finished_rank_exits_at_once_and_its_engine_process_ends_too(wave2):
    # The task ends right after its last write, without vLLM's teardown (seconds
    # during which Snakemake still marks the rank incomplete), and sends its
    # EngineCore SIGTERM: nothing of the rank outlives it for long.
    run = wave2["multiprocess"]
    assert run.returncode == 0, run.describe()
    assert "(EngineCore pid=" in run.stdout + run.stderr  # the engine ran in a child
    assert [p for p, _ in parse_out(run.output.read_text())] == SEED_PROMPTS
    assert run.load_record()["prompts"] == 4
    deadline = time.monotonic() + 60
    while processes_of_session(run.proc.pid) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert processes_of_session(run.proc.pid) == []


@pytest.mark.vllm
def test_long_prompt_error_names_file_line_and_tokens(wave2, long_prompt):
    run = wave2["error"]
    _, n_tokens = long_prompt
    assert run.returncode == 2, run.describe()
    errors = [line for line in run.stderr.splitlines() if line.startswith("ERROR:")]
    assert len(errors) == 1, run.stderr[-3000:]
    message = errors[0]
    assert str(run.prompts) in message
    assert re.search(rf"\bline {LONG_LINE}\b", message), message
    assert f"{n_tokens} tokens" in message, message
    assert "Traceback" not in run.stderr
    assert not run.output.exists()
    assert not run.record.exists()


@pytest.mark.vllm
def test_long_prompt_truncate_keeps_going(wave2, long_prompt):
    run = wave2["truncate"]
    data, n_tokens = long_prompt
    assert run.returncode == 0, run.describe()
    pairs = parse_out(run.output.read_text())
    lines = [line.strip() for line in data.decode().splitlines() if line.strip()]
    assert [p for p, _ in pairs] == lines  # the record keeps the full original prompt
    rec = run.load_record()
    assert rec["prompts"] == 3
    assert rec["truncated"] == [LONG_LINE]
    assert rec["output_tokens"] == 3 * MAX_TOKENS
    warnings = [line for line in run.stderr.splitlines() if line.startswith("WARNING:")]
    long_warnings = [w for w in warnings if f"line {LONG_LINE}" in w]
    assert len(long_warnings) == 1, warnings
    # max_model_len 128 - max_tokens 16 = 112 tokens kept
    assert f"{n_tokens} tokens" in long_warnings[0]
    assert "kept its last 112 tokens" in long_warnings[0]
