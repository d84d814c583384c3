"""OpenAI batch files as people write them (issue 30), on the echo engine (fast tier): the
fields of vLLM's OpenAI server pass through a JSONL rank to the engine (the echo engine
ignores them; vLLM's front end answers them: tests/test_batch_vllm.py); a request the
engine refuses gets OpenAI's batch error line and the rank goes on, unless config
vllm.bad_requests is "fail_rank"; the record and the run summary count them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rank import checks
from reporting import summary
from test_jsonl_ranks import REFUSED_WORD, echo_pool, serve_lines, write_lines  # noqa: F401
from test_workflow_local import metric

REPO = Path(__file__).resolve().parent.parent
USER = [{"role": "user", "content": "hi there"}]


def batch(custom_id: str, url: str, **body) -> dict:
    return {"custom_id": custom_id, "method": "POST", "url": url, "body": body}


LINES = [
    # vLLM's fields go to the engine as they are (the echo engine ignores them; it gives
    # one choice, so no "n" here)
    batch("fields", "/v1/chat/completions", messages=USER, logprobs=True, top_k=5,
          response_format={"type": "json_object"}, tools=[]),
    batch("clp", "/v1/completions", prompt="one two three", logprobs=2),
    # the engine refuses it (a stand-in for a request vLLM refuses)
    batch("engine", "/v1/completions", prompt=f"please {REFUSED_WORD} this"),
    # refused as read: a sampling value out of range
    batch("bad", "/v1/chat/completions", messages=USER, temperature=-1),
    {"id": "short", "prompt": "a b", "logprobs": 1},
]  # fmt: skip


def check_answers(out: Path) -> list[dict]:
    answers = [json.loads(x) for x in out.read_text().splitlines()]
    assert [a.get("custom_id", a.get("id")) for a in answers] == [
        "fields", "clp", "engine", "bad", "short"
    ]  # fmt: skip
    body = {a["custom_id"]: a["response"]["body"] for a in answers[:4]}
    assert [a["response"]["status_code"] for a in answers[:4]] == [200, 200, 400, 400]
    content = body["fields"]["choices"][0]["message"]["content"]
    assert content == "<|user|> hi there\n<|assistant|>"
    assert body["clp"]["choices"][0]["text"] == "one two three"
    for custom_id, said in (("engine", REFUSED_WORD), ("bad", "temperature")):
        line = answers[[a.get("custom_id") for a in answers].index(custom_id)]
        assert line["error"] is None and said in line["response"]["body"]["error"]["message"]
    assert answers[4] == {"id": "short", "text": "a b", "finish_reason": "length",
                          "prompt_tokens": 2, "output_tokens": 2}  # fmt: skip
    return answers


def test_fields_and_error_lines_on_a_warm_echo_server(tmp_path, echo_pool):  # noqa: F811
    out = serve_lines(tmp_path, "4.jsonl", LINES, echo_pool)
    check_answers(out)
    record = json.loads((tmp_path / "results" / "4.jsonl.json").read_text())
    assert record["request_errors"] == 2
    assert [e["line"] for e in record["request_error_lines"]] == [3, 4]
    text = summary.paragraph([record])
    assert "2 request(s) answered with an error line" in text and "4.jsonl line 3" in text


def run_task(tmp_path: Path, lines, **config) -> subprocess.CompletedProcess:
    tmp_path.mkdir(parents=True, exist_ok=True)
    rank_file = write_lines(tmp_path / "2.jsonl", lines)
    settings = {"engine": "echo", "model": "echo"} | config
    out = tmp_path / "out"
    argv = [sys.executable, str(REPO / "scripts" / "rank" / "task.py"), "--rank", "2",
            "--prompts", str(rank_file), "--output", str(out / "2.jsonl"),
            "--record", str(out / "2.json"), "--settings", json.dumps(settings)]  # fmt: skip
    env = {**os.environ, "ECHO_SERVER_REFUSE_ON": REFUSED_WORD}
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, env=env)


def test_the_same_on_the_per_rank_echo_engine_and_the_strict_key(tmp_path):
    done = run_task(tmp_path, LINES)
    assert done.returncode == 0, done.stderr
    check_answers(tmp_path / "out" / "2.jsonl")
    assert json.loads((tmp_path / "out" / "2.json").read_text())["request_errors"] == 2
    strict = run_task(tmp_path / "strict", LINES, bad_requests="fail_rank")
    assert strict.returncode == 2
    assert "2.jsonl: line 4: request refused: temperature" in strict.stderr
    assert "fail_rank" in strict.stderr
    # refused by the engine, not as read: the rank fails too, after its requests
    by_engine = run_task(tmp_path / "engine", LINES[:3], bad_requests="fail_rank")
    assert by_engine.returncode == 2
    assert f"line 3: request refused: the prompt holds '{REFUSED_WORD}'" in by_engine.stderr
    assert not (tmp_path / "strict" / "out" / "2.jsonl").exists()
    assert not (tmp_path / "engine" / "out" / "2.jsonl").exists()


def test_a_file_broken_as_a_file_still_fails_its_rank(tmp_path):
    done = run_task(tmp_path, [LINES[0], "not json", LINES[1]])
    assert done.returncode == 2 and "2.jsonl: line 2: not JSON" in done.stderr


def test_the_strict_key_is_checked():
    with pytest.raises(checks.UsageError, match="bad_requests"):
        checks.parse_settings(json.dumps({"bad_requests": "skip"}))


EMBEDDINGS = [
    {"custom_id": "e1", "method": "POST", "url": "/v1/embeddings",
     "body": {"model": "m", "input": ["one two", "three"]}},
    {"id": "short", "input": "four five six"},
    {"custom_id": "e3", "method": "POST", "url": "/v1/embeddings",
     "body": {"input": "x", "encoding_format": "base64"}},
]  # fmt: skip


def check_embeddings(out: Path) -> None:
    from engine.echo_server import embeddings_answer

    first, short, refused = (json.loads(x) for x in out.read_text().splitlines())
    body = first["response"]["body"]
    expected = embeddings_answer({"input": ["one two", "three"]}, "echo")["data"]
    assert body["object"] == "list" and body["data"] == expected
    assert body["usage"] == {"prompt_tokens": 3, "total_tokens": 3}
    assert short["id"] == "short" and len(short["data"][0]["embedding"]) == 8
    assert refused["response"]["status_code"] == 400
    assert "encoding_format" in refused["response"]["body"]["error"]["message"]


def test_embeddings_on_warm_and_per_rank_echo_engines(tmp_path, echo_pool):  # noqa: F811
    warm_out = serve_lines(tmp_path, "7.jsonl", EMBEDDINGS, echo_pool)
    check_embeddings(warm_out)
    done = run_task(tmp_path / "per-rank", EMBEDDINGS)
    assert done.returncode == 0, done.stderr
    check_embeddings(tmp_path / "per-rank" / "out" / "2.jsonl")
    # the records count the texts embedded and their tokens (the refused one has none)
    for path in (Path(f"{warm_out}.json"), tmp_path / "per-rank" / "out" / "2.json"):
        record = json.loads(path.read_text())
        assert (record["embedded"], record["prompt_tokens"], record["output_tokens"]) == (3, 6, 0)
    mixed = run_task(tmp_path / "mixed", [EMBEDDINGS[1], {"prompt": "a"}])
    assert mixed.returncode == 2
    assert "line 2: a generation request in a rank of pooling requests (line 1)" in mixed.stderr


def test_a_rank_of_many_embedding_lines_goes_in_few_calls(tmp_path, echo_pool):  # noqa: F811
    """One-text lines go EMBED_TEXTS texts to a call, a line with fields for the engine
    alone; each line keeps its own vector and tokens (the echo server tells each text's)."""
    from engine.echo_server import embeddings_answer
    from rank.warm import EMBED_TEXTS

    lines = [{"id": str(i), "input": "w " * (1 + i % 3) + str(i)} for i in range(400)]
    lines[70] = {"id": "70", "input": ["two", "texts"]}
    # a field for the engine (the echo engine ignores it): a call of its own
    lines[71] = {"id": "71", "input": "x", "dimensions": 4}
    (url,) = [json.loads(p.read_text())["url"] for p in echo_pool.registry.glob("*.json")]
    calls_before = metric(url, "vllm:request_success_total")
    out = serve_lines(tmp_path, "7.jsonl", lines, echo_pool)
    calls = metric(url, "vllm:request_success_total") - calls_before
    # lines 0-70 (72 texts; line 71 ends that call), 71, then 328 texts in two calls
    assert EMBED_TEXTS == 256 and calls == 4
    for line, answer in zip(lines, map(json.loads, out.read_text().splitlines()), strict=True):
        expected = embeddings_answer(line, "echo")
        assert answer["id"] == line["id"] and answer["data"] == expected["data"]
        assert answer["usage"]["prompt_tokens"] == expected["usage"]["prompt_tokens"]


def test_embeddings_in_a_npy_beside_the_jsonl(tmp_path, echo_pool):  # noqa: F811
    import numpy

    inline = serve_lines(tmp_path / "inline", "7.jsonl", EMBEDDINGS[:2], echo_pool)
    out = serve_lines(tmp_path, "7.jsonl", EMBEDDINGS[:2], echo_pool, embeddings_npy=True)
    pair, single = (json.loads(x) for x in inline.read_text().splitlines())
    vectors = [d["embedding"] for d in pair["response"]["body"]["data"] + single["data"]]
    rows = numpy.load(out.with_suffix(".npy"))
    assert rows.dtype == numpy.float32 and rows.shape == (3, 8)
    assert numpy.allclose(rows, numpy.array(vectors, dtype=numpy.float32))
    first, short = (json.loads(x) for x in out.read_text().splitlines())
    assert [d["npy_row"] for d in first["response"]["body"]["data"]] == [0, 1]
    assert short["data"] == [{"object": "embedding", "index": 0, "embedding": None, "npy_row": 2}]
