"""vLLM's own OpenAI front end on every engine (issue 33): the inputs of vLLM's own
`run-batch` tests (vllm-project/vllm tests/entrypoints/openai/test_run_batch.py) as JSONL
ranks, answered line by line as vLLM's runner answers them, on the three engine kinds: a
per-rank engine (scripts/rank/task.py), the in-process warm server (the default,
scripts/engine/vllm_server.py) and vLLM's own server (`warm.server: vllm`).

- Their chat lines keep the model name they were written for
  (hmellor/tiny-random-LlamaForCausalLM), served by models/tiny-chat through config
  vllm.served_model_name; the NonExistModel line gets vLLM's 404 error line, /bad_url an
  error line naming the url and the served ones, stream "True" its error line; the rest
  of the rank is answered.
- Tools (vLLM's tool parser, config vllm.engine_args): tool_choice required and a named
  function give OpenAI's message.tool_calls; auto is answered.
- A seeded line gives the same text on the three engine kinds.
- Score and rerank on a cross-encoder (models/tiny-rerank) under every name vLLM's server
  has for them, equal to vLLM's offline LLM.score; score on a bi-encoder (cosine).
- A reasoning parser (--reasoning-parser deepseek_r1) puts the reasoning in
  message.reasoning.
- vLLM 0.15.0 (Aurora's) answers the same chat, tool and error lines on its per-rank and
  in-process engines.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import subprocess
from pathlib import Path

import pytest

from rank import checks
from test_chat import PYTHON, answers, per_rank, tiny_chat, write_rank  # noqa: F401 (fixture)
from test_infer import VLLM_ENV, settings
from test_jsonl_ranks import warm_vllm_pool
from workflow import ENGINE_SETTINGS as SETTINGS
from workflow import probe_result, serve_rank

pytestmark = pytest.mark.vllm

REPO = Path(__file__).resolve().parent.parent
TINY_RERANK = REPO / "models" / "tiny-rerank"
TINY_EMBED = REPO / "models" / "tiny-embed"
PYTHON015 = REPO / ".venv-vllm015" / "bin" / "python"
# vLLM's test inputs name these models; the run serves them under these names
CHAT_MODEL_NAME = "hmellor/tiny-random-LlamaForCausalLM"
RERANKER_MODEL_NAME = "BAAI/bge-reranker-v2-m3"
# compact JSON: random weights would fill a forced tool call's JSON with whitespace
# until max_tokens cuts it (vLLM then answers 400, as it would for a real model)
COMPACT = json.dumps({"backend": "xgrammar", "disable_any_whitespace": True})
TOOL_ARGS = ["--tool-call-parser", "pythonic", "--enable-auto-tool-choice",
             "--structured-outputs-config", COMPACT]  # fmt: skip


def batch(custom_id: str, url: str, **body) -> dict:
    return {"custom_id": custom_id, "method": "POST", "url": url, "body": body}


def chat(custom_id: str, system: str = "You are a helpful assistant.", **body) -> dict:
    messages = [{"role": "system", "content": system}, {"role": "user", "content": "Hello world!"}]
    # vLLM's inputs ask 1,000 tokens of a model with 2,048 positions; the tiny one has 256
    body = {"model": CHAT_MODEL_NAME, "messages": messages, "max_tokens": 16} | body
    return batch(custom_id, "/v1/chat/completions", **body)


WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_current_weather",
        "description": "Get the current weather in a given location",
        "parameters": {
            "type": "object",
            "properties": {
                # an enum bounds what random weights write (vLLM's test: any string)
                "location": {"type": "string", "enum": ["San Francisco, CA", "Paris"]},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["location"],
        },
    },
}
WEATHER = [{"role": "user", "content": "What is the weather in San Francisco?"}]
# vLLM's INPUT_BATCH (five lines), then its tool-calling line in three forms, then a seeded one
CHAT_LINES = [
    chat("request-1"),
    chat("request-2", "You are an unhelpful assistant."),
    chat("request-3", "You are an unhelpful assistant.", model="NonExistModel"),
    chat("request-4", "You are an unhelpful assistant.") | {"url": "/bad_url"},
    chat("request-5", "You are an unhelpful assistant.", stream="True"),
    chat("tools-required", messages=WEATHER, tools=[WEATHER_TOOL], tool_choice="required",
         max_tokens=120, ignore_eos=False),
    chat("tools-named", messages=WEATHER, tools=[WEATHER_TOOL], max_tokens=120, ignore_eos=False,
         tool_choice={"type": "function", "function": {"name": "get_current_weather"}}),
    chat("tools-auto", messages=WEATHER, tools=[WEATHER_TOOL], tool_choice="auto"),
    chat("seeded", seed=7, temperature=1.0, max_tokens=12),
]  # fmt: skip
DOCUMENTS = ["The capital of Brazil is Brasilia.", "The capital of France is Paris."]
QUERY = "What is the capital of France?"
# vLLM's INPUT_SCORE_BATCH and INPUT_RERANK_BATCH (its third line repeats request-2's id,
# which a rank file may not: named request-3 here), and a model not served
POOLING_LINES = [
    batch("score-1", "/score", model=RERANKER_MODEL_NAME, queries=QUERY, documents=DOCUMENTS),
    batch("score-2", "/v1/score", model=RERANKER_MODEL_NAME, queries=QUERY, documents=DOCUMENTS),
    batch("request-1", "/rerank", model=RERANKER_MODEL_NAME, query=QUERY, documents=DOCUMENTS),
    batch("request-2", "/v1/rerank", model=RERANKER_MODEL_NAME, query=QUERY, documents=DOCUMENTS),
    batch("request-3", "/v2/rerank", model=RERANKER_MODEL_NAME, query=QUERY, documents=DOCUMENTS),
    batch("other", "/v1/rerank", model="NonExistModel", query=QUERY, documents=DOCUMENTS),
]  # fmt: skip


def warm_port() -> int:
    """A free port below the kernel's ephemeral range: a per-rank engine beside the warm
    one listens on an ephemeral port, which could be the one free_port() just handed out."""
    for port in range(27100, 27900):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in 27100-27899")


def chat_settings(model: Path) -> dict:
    return settings(
        model,
        served_model_name=[CHAT_MODEL_NAME],
        engine_args=TOOL_ARGS,
        sampling={"ignore_eos": True, "max_tokens": 16},
    )


def pooling_settings(model: Path, name: str) -> dict:
    return settings(model, served_model_name=[name], engine_args=["--runner", "pooling"])


def by_id(path: Path) -> dict[str, dict]:
    return {line["custom_id"]: line for line in answers(path)}


def check_chat_lines(lines: dict[str, dict]) -> None:
    """Each line answered as vLLM's runner answers it (in OpenAI's batch shape)."""
    assert list(lines) == [line["custom_id"] for line in CHAT_LINES]
    for name in ("request-1", "request-2", "seeded", "tools-auto"):
        response = lines[name]["response"]
        assert response["status_code"] == 200 and lines[name]["error"] is None, lines[name]
        assert response["body"]["model"] == CHAT_MODEL_NAME
        assert response["body"]["object"] == "chat.completion"
    missing = lines["request-3"]["response"]
    assert missing["status_code"] == 404
    assert "The model `NonExistModel` does not exist" in missing["body"]["error"]["message"]
    bad_url = lines["request-4"]["response"]
    assert bad_url["status_code"] == 404
    assert bad_url["body"]["error"]["message"].startswith("URL /bad_url was used. Supported")
    assert "/v1/chat/completions" in bad_url["body"]["error"]["message"]
    streamed = lines["request-5"]["response"]
    assert streamed["status_code"] == 400 and "stream" in streamed["body"]["error"]["message"]
    for name in ("tools-required", "tools-named"):
        body = lines[name]["response"]["body"]
        (call,) = body["choices"][0]["message"]["tool_calls"]
        assert call["type"] == "function" and call["function"]["name"] == "get_current_weather"
        arguments = json.loads(call["function"]["arguments"])
        assert arguments["location"] in ("San Francisco, CA", "Paris"), arguments


def seeded_text(lines: dict[str, dict]) -> str:
    return lines["seeded"]["response"]["body"]["choices"][0]["message"]["content"]


def serve(pool, rank_file: Path, out: Path, settings_: dict) -> None:
    parsed = checks.parse_settings(json.dumps(settings_))
    serve_rank(int(rank_file.stem), parsed, rank_file, out, pool)


def test_run_batch_inputs_on_the_three_engine_kinds(tiny_chat, tmp_path):  # noqa: F811
    config = chat_settings(tiny_chat)
    fresh = write_rank(tmp_path / "per-rank", 5, CHAT_LINES)
    run = per_rank(tmp_path / "per-rank", fresh, config)  # while the warm engines run
    texts = {}
    for server in ("inprocess", "vllm"):
        folder = tmp_path / server
        with warm_vllm_pool(folder, tiny_chat, config | SETTINGS, server, port=warm_port()) as pool:
            out = folder / "results" / "5.jsonl"
            serve(pool, write_rank(folder / "data", 5, CHAT_LINES), out, config)
        lines = by_id(out)
        check_chat_lines(lines)
        texts[server] = seeded_text(lines)
        record = json.loads(out.with_suffix(".json").read_text())
        assert record["request_errors"] == 3 and record["served_model_name"] == CHAT_MODEL_NAME
    _, err = run.communicate(timeout=900)
    assert run.returncode == 0, err[-3000:]
    lines = by_id(tmp_path / "per-rank" / "results" / "5.jsonl")
    check_chat_lines(lines)
    texts["per-rank"] = seeded_text(lines)
    assert texts["inprocess"] == texts["vllm"] == texts["per-rank"], texts


def offline_scores(model: Path) -> list[float]:
    """vLLM's offline LLM.score of QUERY against DOCUMENTS, in a process of its own."""
    code = (
        "import json, sys\nfrom vllm import LLM\n"
        "llm = LLM(model=sys.argv[1], runner='pooling', enforce_eager=True, dtype='bfloat16')\n"
        "scores = llm.score(sys.argv[2], json.loads(sys.argv[3]))\n"
        "print('PROBE-RESULT ' + json.dumps([o.outputs.score for o in scores]))"
    )
    env = {**os.environ, **VLLM_ENV, "VLLM_CPU_KVCACHE_SPACE": "1"}
    done = subprocess.run([PYTHON, "-c", code, str(model), QUERY, json.dumps(DOCUMENTS)],
                          env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return probe_result(done.stdout)


def check_pooling_lines(lines: dict[str, dict], expected: list[float]) -> None:
    assert list(lines) == [line["custom_id"] for line in POOLING_LINES]
    for name in ("score-1", "score-2"):
        body = lines[name]["response"]["body"]
        assert (
            lines[name]["response"]["status_code"] == 200 and body["model"] == RERANKER_MODEL_NAME
        )
        scores = [item["score"] for item in sorted(body["data"], key=lambda x: x["index"])]
        assert all(math.isclose(a, b, rel_tol=1e-2) for a, b in zip(scores, expected, strict=True))
    for name in ("request-1", "request-2", "request-3"):
        body = lines[name]["response"]["body"]
        ranked = sorted(body["results"], key=lambda x: x["index"])
        scores = [item["relevance_score"] for item in ranked]
        assert all(math.isclose(a, b, rel_tol=1e-2) for a, b in zip(scores, expected, strict=True))
        assert body["usage"]["prompt_tokens"] > 0
    assert lines["other"]["response"]["status_code"] == 404


def test_score_and_rerank_on_the_three_engine_kinds(tmp_path):
    expected = offline_scores(TINY_RERANK)
    config = pooling_settings(TINY_RERANK, RERANKER_MODEL_NAME)
    fresh = write_rank(tmp_path / "per-rank", 2, POOLING_LINES)
    run = per_rank(tmp_path / "per-rank", fresh, config)
    for server in ("inprocess", "vllm"):
        folder = tmp_path / server
        with warm_vllm_pool(
            folder, TINY_RERANK, config | SETTINGS, server, port=warm_port()
        ) as pool:
            out = folder / "results" / "2.jsonl"
            serve(pool, write_rank(folder / "data", 2, POOLING_LINES), out, config)
        check_pooling_lines(by_id(out), expected)
    _, err = run.communicate(timeout=900)
    assert run.returncode == 0, err[-3000:]
    check_pooling_lines(by_id(tmp_path / "per-rank" / "results" / "2.jsonl"), expected)


def test_score_on_a_bi_encoder_is_the_cosine_of_its_embeddings(tmp_path):
    """/v1/score on an embedding model: the cosine similarity of the two texts' vectors,
    as vLLM's server computes it; the vectors from the same engine's /v1/embeddings."""
    lines = [batch("score", "/v1/score", queries=QUERY, documents=DOCUMENTS),
             batch("embed", "/v1/embeddings", input=[QUERY, *DOCUMENTS])]  # fmt: skip
    config = pooling_settings(TINY_EMBED, "tiny-embed")
    with warm_vllm_pool(tmp_path, TINY_EMBED, config | SETTINGS) as pool:
        out = tmp_path / "results" / "4.jsonl"
        serve(pool, write_rank(tmp_path / "data", 4, lines), out, config)
    got = by_id(out)
    scores = [x["score"] for x in got["score"]["response"]["body"]["data"]]
    query, *documents = [x["embedding"] for x in got["embed"]["response"]["body"]["data"]]

    def cosine(a, b):
        dot = sum(x * y for x, y in zip(a, b, strict=True))
        return dot / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))

    expected = [cosine(query, document) for document in documents]
    assert all(math.isclose(a, b, rel_tol=1e-2) for a, b in zip(scores, expected, strict=True))


@pytest.fixture(scope="module")
def thinking_model(tiny_chat, tmp_path_factory) -> Path:  # noqa: F811
    """tiny-chat whose tokenizer knows <think> and </think>, as reasoning models' do (the
    deepseek_r1 parser needs both); random weights never write </think>, so all of a
    reply is reasoning."""
    from transformers import AutoTokenizer

    model = tmp_path_factory.mktemp("thinking") / "tiny-think"
    shutil.copytree(tiny_chat, model)
    tokenizer = AutoTokenizer.from_pretrained(str(model))
    tokenizer.add_special_tokens({"additional_special_tokens": ["<think>", "</think>"]})
    tokenizer.save_pretrained(str(model))
    return model


def test_a_reasoning_parser_splits_the_reasoning(thinking_model, tmp_path):
    config = settings(thinking_model, engine_args=["--reasoning-parser", "deepseek_r1"])
    lines = [chat("think", model=str(thinking_model), seed=3, max_tokens=10)]
    with warm_vllm_pool(tmp_path, thinking_model, config | SETTINGS) as pool:
        out = tmp_path / "results" / "1.jsonl"
        serve(pool, write_rank(tmp_path / "data", 1, lines), out, config)
    (line,) = answers(out)
    message = line["response"]["body"]["choices"][0]["message"]
    assert message["reasoning"] and not message["content"], message


@pytest.mark.vllm015
def test_the_same_lines_on_vllm015(tiny_chat, tmp_path):  # noqa: F811
    """vLLM 0.15.0 (Aurora's, config python .venv-vllm015): the chat, tool and error lines
    on a per-rank engine and on the in-process server."""
    python015 = str(PYTHON015)
    config = chat_settings(tiny_chat)
    rank = write_rank(tmp_path / "per-rank", 6, CHAT_LINES)
    argv = [python015, str(REPO / "scripts" / "rank" / "task.py"), "--rank", "6",
            "--prompts", str(rank), "--output", str(tmp_path / "per-rank" / "results" / "6.jsonl"),
            "--record", str(tmp_path / "per-rank" / "results" / "6.json"),
            "--settings", json.dumps(config)]  # fmt: skip
    run = subprocess.Popen(argv, env={**os.environ, **VLLM_ENV}, stderr=subprocess.PIPE, text=True)
    folder = tmp_path / "inprocess"
    with warm_vllm_pool(
        folder, tiny_chat, config | SETTINGS, python=python015, port=warm_port()
    ) as pool:
        out = folder / "results" / "6.jsonl"
        serve(pool, write_rank(folder / "data", 6, CHAT_LINES), out, config)
    check_chat_lines(by_id(out))
    _, err = run.communicate(timeout=900)
    assert run.returncode == 0, err[-3000:]
    check_chat_lines(by_id(tmp_path / "per-rank" / "results" / "6.jsonl"))
    record = json.loads((tmp_path / "per-rank" / "results" / "6.json").read_text())
    assert record["versions"]["vllm"] == "0.15.0"
