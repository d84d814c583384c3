"""An embedding rank on real vLLM (issue 30): models/tiny-embed (scripts/tools/build_model.py
tiny-embed, a tiny BERT, random weights) through a per-rank engine and through warm engines
of both kinds (the in-process server, vLLM's own OpenAI server): the vectors have the
model's size, come in input order, and are identical to vLLM's offline LLM.embed of the same
inputs with the same engine arguments. A generation request on a pooling engine gets an
error line naming why. The shapes on the echo engine: tests/test_batch_fields.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rank import checks
from test_chat import answers, per_rank, write_rank
from test_infer import VLLM_ENV, settings
from test_jsonl_ranks import warm_vllm_pool
from workflow import probe_result, serve_rank

REPO = Path(__file__).resolve().parent.parent
TINY_EMBED = REPO / "models" / "tiny-embed"
TEXTS = ["The sky is blue.", "Grass is green.", "To be or not to be", "Hello"]
LINES = [
    {"custom_id": "pair", "method": "POST", "url": "/v1/embeddings",
     "body": {"model": "tiny-embed", "input": TEXTS[:2]}},
    {"id": "one", "input": TEXTS[2]},
    {"custom_id": "last", "method": "POST", "url": "/v1/embeddings", "body": {"input": TEXTS[3]}},
    # a field of vLLM's goes to it: the tiny BERT has no Matryoshka dimensions, vLLM says so
    {"id": "dims", "input": TEXTS[0], "dimensions": 4},
]  # fmt: skip
# vLLM's offline embed, in a process of its own, with the rank's engine arguments
REFERENCE = """
import json, sys
from rank import checks
from vllm import LLM
settings = checks.parse_settings(sys.argv[1])
llm = LLM(model=settings["model"], dtype=settings["dtype"], runner="pooling",
          enforce_eager=settings["enforce_eager"])
outputs = llm.embed(json.loads(sys.argv[2]), use_tqdm=False)
vectors = [list(o.outputs.embedding) for o in outputs]
print("PROBE-RESULT " + json.dumps([vectors, [len(o.prompt_token_ids) for o in outputs]]))
"""


@pytest.fixture(scope="module")
def tiny_embed() -> Path:
    """The tiny embedding model (`make test` builds it), built here if missing."""
    if not (TINY_EMBED / "config.json").exists():
        build = [sys.executable, str(REPO / "scripts" / "tools" / "build_model.py"),
                 "tiny-embed", str(TINY_EMBED)]  # fmt: skip
        subprocess.run(build, check=True, timeout=600)
    return TINY_EMBED


@pytest.fixture(scope="module")
def offline_embed(tiny_embed) -> list:
    """The TEXTS' vectors from vLLM's LLM.embed, with the ranks' engine arguments, and
    each text's prompt tokens."""
    reference = subprocess.run(
        [sys.executable, "-c", REFERENCE, json.dumps(settings(tiny_embed)), json.dumps(TEXTS)],
        env={**os.environ, **VLLM_ENV, "VLLM_CPU_KVCACHE_SPACE": "1",
             "PYTHONPATH": str(REPO / "scripts")},
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert reference.returncode == 0, reference.stderr[-3000:]
    return probe_result(reference.stdout)


def check(path: Path, model: Path, expected: list) -> None:
    """The answers' vectors are LLM.embed's; each line's prompt tokens its texts' tokens
    as vLLM counted them (a rank sends several lines in one call and splits the usage)."""
    expected, tokens = expected
    pair, one, last = answers(path)[:3]
    usage = [pair["response"]["body"]["usage"], one["usage"], last["response"]["body"]["usage"]]
    assert [u["prompt_tokens"] for u in usage] == [tokens[0] + tokens[1], tokens[2], tokens[3]]
    size = json.loads((model / "config.json").read_text())["hidden_size"]
    got = [d["embedding"] for d in pair["response"]["body"]["data"]]
    got += [one["data"][0]["embedding"], last["response"]["body"]["data"][0]["embedding"]]
    assert [len(v) for v in got] == [size] * 4
    assert got == expected
    assert [d["index"] for d in pair["response"]["body"]["data"]] == [0, 1]
    assert one["usage"]["prompt_tokens"] > 0 and pair["custom_id"] == "pair"
    dims = answers(path)[3]
    assert dims["id"] == "dims" and "dimensions=4" in dims["error"]["message"], dims


@pytest.mark.vllm
def test_an_embedding_rank_matches_vllms_offline_embed(tiny_embed, offline_embed, tmp_path):
    run = per_rank(tmp_path, write_rank(tmp_path, 4, LINES), settings(tiny_embed))
    _, err = run.communicate(timeout=600)
    assert run.returncode == 0, err[-3000:]
    check(tmp_path / "results" / "4.jsonl", tiny_embed, offline_embed)


@pytest.mark.vllm
@pytest.mark.parametrize("server", ["inprocess", "vllm"])
def test_an_embedding_rank_on_warm_engines_matches_vllms_offline_embed(
    tiny_embed, offline_embed, tmp_path, server
):
    config = settings(tiny_embed)
    # as config vllm.engine_args: [--runner, pooling] starts a run's warm engines
    engine_settings = config | {"engine_args": ["--runner", "pooling"]}
    with warm_vllm_pool(tmp_path, tiny_embed, engine_settings, server) as pool:
        parsed = checks.parse_settings(json.dumps(config))
        rank_file = write_rank(tmp_path / "data", 4, LINES)
        out = tmp_path / "results" / "4.jsonl"
        serve_rank(4, parsed, rank_file, out, pool)
        # a completions rank on the pooling engine: an error line, naming why
        completion = [{"id": "c", "prompt": "Hi"}]
        wrong = write_rank(tmp_path / "data", 5, completion)
        wrong_out = tmp_path / "results" / "5.jsonl"
        serve_rank(5, parsed, wrong, wrong_out, pool)
    check(out, tiny_embed, offline_embed)
    (error,) = answers(wrong_out)
    # both servers are vLLM's front end: a pooling engine has no /v1/completions (HTTP 404)
    assert error["id"] == "c" and error["error"]["message"] and error["error"]["code"] == 404
