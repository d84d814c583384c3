"""Seeded ranks larger than one engine step, on a CPU (real vLLM, models/tiny-opt).

Once the prompts in flight pass max_num_batched_tokens, vLLM splits a prefill over two
steps and rewinds a seeded request's generator with ``set_offset``, which a CPU
generator refuses ("CPU Generator does not use offset"): vLLM 0.15 and 0.32 alike, in
LLM.generate, its OpenAI server and run-batch (2026-12-05). Engines on a CPU run
without chunked prefill (engine/vllm_versions.py): a seeded rank of 48 prompts of ~200
tokens (9,700 tokens, the in-process engine's step takes 4,096) is answered on a
per-rank engine and on warm engines of both kinds, and reruns give the same text."""

from __future__ import annotations

import json

import pytest

from rank import checks
from test_chat import answers, per_rank, write_rank
from test_infer import settings
from test_jsonl_ranks import warm_vllm_pool
from workflow import ENGINE_SETTINGS, TINY_MODEL, serve_rank

pytestmark = pytest.mark.vllm

LINES = [{"id": str(i), "prompt": f"{i} " + "word " * 100, "max_tokens": 4} for i in range(48)]


def texts(path) -> list[str]:
    return [line["text"] for line in answers(path)]


def test_a_seeded_rank_beyond_one_step_on_a_per_rank_engine(tmp_path):
    config = settings(TINY_MODEL)
    assert config["sampling"]["seed"] is not None
    run = per_rank(tmp_path, write_rank(tmp_path, 3, LINES), config)
    _, err = run.communicate(timeout=600)
    assert run.returncode == 0, err[-3000:]
    assert len(texts(tmp_path / "results" / "3.jsonl")) == len(LINES)


@pytest.mark.parametrize("server", ["inprocess", "vllm"])
def test_a_seeded_rank_beyond_one_step_on_warm_engines(tmp_path, server):
    config = settings(TINY_MODEL)
    parsed = checks.parse_settings(json.dumps(config))
    rank_file = write_rank(tmp_path / "data", 3, LINES)
    outputs = [tmp_path / "results" / f"{attempt}" / "3.jsonl" for attempt in (1, 2)]
    with warm_vllm_pool(tmp_path, TINY_MODEL, config | ENGINE_SETTINGS, server) as pool:
        for out in outputs:
            serve_rank(3, parsed, rank_file, out, pool)
    first, again = (texts(out) for out in outputs)
    assert len(first) == len(LINES) and first == again
    assert json.loads(outputs[0].with_suffix(".json").read_text())["request_errors"] == 0
