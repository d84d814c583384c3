"""OpenAI batch fields on real vLLM (issue 30): one rank file on the tiny instruct model
(models/tiny-chat, random weights: structured decoding constrains them) through a per-rank
engine (scripts/rank/task.py, vLLM's LLM in the task) and a warm in-process server
(scripts/engine/vllm_server.py): a json_schema with an enum parses as that schema,
logprobs with top_logprobs 2 give one entry per token with 2 alternatives, n 2 gives two
choices, min_tokens 10 at least 10 tokens, a request vLLM refuses gets an error line while
the others are answered, and a rank resumed from a kept answer keeps its choices and
logprobs. The rank's side of them (error lines, the strict key, the counts) on the echo
engine: tests/test_batch_fields.py."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from formats.partial import Answer, Partial, partial_key
from rank import checks
from test_chat import PYTHON, answers, per_rank, tiny_chat, write_rank  # noqa: F401 (fixture)
from test_infer import VLLM_ENV, settings
from test_jsonl_ranks import warm_vllm_pool
from workflow import ENGINE_SETTINGS as SETTINGS
from workflow import serve_rank

REPO = Path(__file__).resolve().parent.parent
USER = [{"role": "user", "content": "Pick a color."}]
SCHEMA = {
    "type": "object",
    "properties": {"color": {"type": "string", "enum": ["red", "green", "blue"]}},
    "required": ["color"],
    "additionalProperties": False,
}


def chat(custom_id: str, **body) -> dict:
    body = {"messages": USER, "max_tokens": 8} | body
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": body}


LINES = [
    chat(
        "json",
        # random weights write much whitespace, which JSON allows, before the object ends
        max_tokens=100,
        response_format={"type": "json_schema", "json_schema": {"name": "c", "schema": SCHEMA}},
    ),
    chat("logprobs", logprobs=True, top_logprobs=2, max_tokens=5),
    chat("n", n=2, max_tokens=4),
    chat("min", min_tokens=10, max_tokens=12, ignore_eos=False, stop_token_ids=[2]),
    chat("refused", n=0),
    # vLLM's structured-output extras
    chat("choice", structured_outputs={"choice": ["yes", "no"]}),
    {"custom_id": "clp", "method": "POST", "url": "/v1/completions",
     "body": {"prompt": "The sky is", "logprobs": 2, "max_tokens": 3,
              "presence_penalty": 0.5, "frequency_penalty": 0.5, "repetition_penalty": 1.2,
              "top_k": 20, "min_p": 0.05, "logit_bias": {"5": -100}}},
]  # fmt: skip
# the "n" line, kept from a stopped attempt: its choices and logprobs must come back whole
KEPT_CHOICES = [
    {"index": i, "message": {"role": "assistant", "content": f"kept {i}"},
     "finish_reason": "length", "logprobs": {"content": []}}
    for i in range(2)
]  # fmt: skip


def config(model) -> dict:
    # ignore_eos off: a finished JSON ends with EOS, as structured decoding asks
    return settings(model, sampling={"ignore_eos": False})


def check(lines: list[dict], resumed: bool = False) -> None:
    by_id = {line["custom_id"]: line for line in lines}
    assert [line["custom_id"] for line in lines] == [x["custom_id"] for x in LINES]
    body = {k: v["response"]["body"] for k, v in by_id.items()}
    content = body["json"]["choices"][0]["message"]["content"]
    assert json.loads(content)["color"] in ("red", "green", "blue"), content
    assert set(json.loads(content)) == {"color"}
    (choice,) = body["logprobs"]["choices"]
    entries = choice["logprobs"]["content"]
    assert len(entries) == body["logprobs"]["usage"]["completion_tokens"] == 5
    assert all(len(e["top_logprobs"]) == 2 and "logprob" in e for e in entries)
    if resumed:
        assert body["n"]["choices"] == KEPT_CHOICES
    else:
        assert [c["index"] for c in body["n"]["choices"]] == [0, 1]
        assert body["n"]["usage"]["completion_tokens"] == 8
    assert body["min"]["usage"]["completion_tokens"] >= 10
    refused = by_id["refused"]["response"]
    assert refused["status_code"] == 400 and "n" in refused["body"]["error"]["message"]
    assert body["choice"]["choices"][0]["message"]["content"] in ("yes", "no")
    completion = body["clp"]["choices"][0]["logprobs"]
    assert len(completion["tokens"]) == len(completion["token_logprobs"]) == 3
    assert all(2 <= len(top) <= 3 for top in completion["top_logprobs"])


@pytest.mark.vllm
def test_batch_fields_on_per_rank_and_warm_engines(tiny_chat, tmp_path):  # noqa: F811
    # per-rank: a fresh rank
    fresh = write_rank(tmp_path / "fresh", 5, LINES)
    run = per_rank(tmp_path / "fresh", fresh, config(tiny_chat))

    # warm, in-process server, while the per-rank engines run
    with warm_vllm_pool(tmp_path, tiny_chat, config(tiny_chat) | SETTINGS) as pool:
        rank_file = write_rank(tmp_path / "warm", 5, LINES)
        out = tmp_path / "warm" / "results" / "5.jsonl"
        settings_ = checks.parse_settings(json.dumps(config(tiny_chat)))
        serve_rank(5, settings_, rank_file, out, pool)
        # a rank resumed from a kept answer of its "n" line
        kept = write_rank(tmp_path / "kept", 5, LINES)
        kept_out = tmp_path / "kept" / "results" / "5.jsonl"
        partial = Partial(kept_out, partial_key(kept, settings_))
        partial.open({})
        partial.add(2, Answer("kept 0", "length", 7, 8, KEPT_CHOICES))
        partial.close()
        serve_rank(5, settings_, kept, kept_out, pool)
    check(answers(out))
    assert json.loads(out.with_suffix(".json").read_text())["request_errors"] == 1
    check(answers(kept_out), resumed=True)
    assert json.loads(kept_out.with_suffix(".json").read_text())["resumed"] == 1

    _, err = run.communicate(timeout=900)
    assert run.returncode == 0, err[-3000:]
    check(answers(tmp_path / "fresh" / "results" / "5.jsonl"))


@pytest.mark.vllm015
@pytest.mark.vllm
def test_batch_fields_on_a_per_rank_engine_of_vllm015(tiny_chat, tmp_path):  # noqa: F811
    """The same fields on vLLM 0.15 (Aurora's), config python .venv-vllm015: a structured
    request among others (vllm_versions.pin_memory_only_where_it_exists), logprobs, n,
    min_tokens, a refused request. The long JSON line is left to the 0.32 test."""
    python015 = REPO / ".venv-vllm015" / "bin" / "python"
    lines = [line for line in LINES if line["custom_id"] != "json"]
    rank = write_rank(tmp_path, 6, lines)
    argv = [str(python015), str(REPO / "scripts" / "rank" / "task.py"), "--rank", "6",
            "--prompts", str(rank), "--output", str(tmp_path / "results" / "6.jsonl"),
            "--record", str(tmp_path / "results" / "6.json"),
            "--settings", json.dumps(config(tiny_chat))]  # fmt: skip
    done = subprocess.run(argv, env={**os.environ, **VLLM_ENV}, capture_output=True,
                          text=True, timeout=900)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    by_id = {x["custom_id"]: x["response"] for x in answers(tmp_path / "results" / "6.jsonl")}
    assert by_id["choice"]["body"]["choices"][0]["message"]["content"] in ("yes", "no")
    entries = by_id["logprobs"]["body"]["choices"][0]["logprobs"]["content"]
    assert len(entries) == 5 and all(len(e["top_logprobs"]) == 2 for e in entries)
    assert len(by_id["n"]["body"]["choices"]) == 2
    assert by_id["min"]["body"]["usage"]["completion_tokens"] >= 10
    assert by_id["refused"]["status_code"] == 400
    assert json.loads((tmp_path / "results" / "6.json").read_text())["versions"]["vllm"] == "0.15.0"


@pytest.mark.vllm
def test_batch_fields_on_vllms_own_server(tiny_chat, tmp_path):  # noqa: F811
    """The same rank on vLLM's own OpenAI server (config warm.server: vllm)."""
    with warm_vllm_pool(tmp_path, tiny_chat, config(tiny_chat) | SETTINGS, "vllm") as pool:
        rank_file = write_rank(tmp_path / "data", 5, LINES)
        out = tmp_path / "results" / "5.jsonl"
        settings_ = checks.parse_settings(json.dumps(config(tiny_chat)))
        serve_rank(5, settings_, rank_file, out, pool)
    check(answers(out))
    assert json.loads(out.with_suffix(".json").read_text())["request_errors"] == 1
