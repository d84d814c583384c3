"""JSONL rank files (scripts/rank/jsonl.py): reading requests, every bad line named by
file and line, the answer lines (OpenAI batch output shape field by field), the partial
answers a stopped rank keeps; and whole JSONL ranks through warm.serve_rank on a real
echo server (scripts/engine/echo_server.py)."""

from __future__ import annotations

import json
import os
import re
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest

from engine import lifecycle, routing
from engine.lifecycle import Engine
from formats import registry as registry_format
from formats.partial import Answer, Partial
from placement import node_layout, tiles
from rank import checks, echo, jsonl
from rank.jsonl import RequestFileError, read_requests
from rank.layout import RankFileError, discover_rank_files
from workflow import READY_TIMEOUT, TASK_ENV, free_port, serve_rank

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"

CHAT_LINE = {
    "custom_id": "request-1",
    "method": "POST",
    "url": "/v1/chat/completions",
    "body": {
        "model": "tiny-chat",
        "messages": [
            {"role": "system", "content": "You are brief."},
            {"role": "user", "content": "Hello world"},
        ],
        "max_completion_tokens": 8,
        "temperature": 0,
    },
}
COMPLETION_LINE = {
    "custom_id": "request-2",
    "method": "POST",
    "url": "/v1/completions",
    "body": {"model": "tiny-chat", "prompt": "Once upon", "max_tokens": 4, "seed": 7},
}


def write_lines(path: Path, lines) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def test_short_and_batch_lines(tmp_path):
    path = write_lines(
        tmp_path / "3.jsonl",
        [
            {"prompt": "The sky is"},
            "",  # blank lines are skipped but counted
            {
                "id": "q7",
                "messages": [{"role": "user", "content": "Hi"}],
                "top_p": 0.5,
                "stop": ["\n"],
                "seed": 3,
            },  # fmt: skip
            CHAT_LINE,
            COMPLETION_LINE,
        ],
    )
    short, chat, batch_chat, batch_text = read_requests(path)
    assert (short.line, short.id, short.batch, short.prompt, short.chat) == (
        1,
        1,
        False,
        "The sky is",
        False,
    )
    assert (chat.line, chat.id, chat.chat) == (3, "q7", True)
    assert chat.messages == [{"role": "user", "content": "Hi"}]
    assert chat.sampling == {"top_p": 0.5, "stop": ["\n"], "seed": 3}
    assert (batch_chat.id, batch_chat.batch, batch_chat.model) == ("request-1", True, "tiny-chat")
    # OpenAI's max_completion_tokens is our max_tokens
    assert batch_chat.sampling == {"max_tokens": 8, "temperature": 0}
    assert (batch_text.prompt, batch_text.sampling) == ("Once upon", {"max_tokens": 4, "seed": 7})
    defaults = {"temperature": 0.8, "top_p": 0.95, "max_tokens": 16, "seed": None}
    assert jsonl.sampling_of(batch_text, defaults) == {
        "temperature": 0.8, "top_p": 0.95, "max_tokens": 4, "seed": 7}  # fmt: skip


BAD_LINES = [
    ("{not json", "not JSON"),
    ('["a list"]', "must be a JSON object, not list"),
    ({"id": "x"}, "neither prompt nor messages"),
    ({"prompt": "a", "messages": [{"role": "user", "content": "b"}]}, "both prompt and messages"),
    ({"messages": [{"role": "wizard", "content": "b"}]}, "unknown role 'wizard'"),
    ({"messages": [{"role": "user", "content": 5}]}, "content must be a string or a non-empty"),
    ({"messages": [{"role": "user", "content": []}]}, "message 1: content must be a string or"),
    (
        {
            "messages": [
                {"role": "system", "content": "s"},
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "What is this?"},
                        {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}},
                    ],
                },
            ]
        },
        "message 2: content part 2 is 'image_url': only text parts are served",
    ),  # fmt: skip
    (
        CHAT_LINE
        | {
            "body": CHAT_LINE["body"]
            | {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {
                                "type": "input_audio",
                                "input_audio": {"data": "AAAA", "format": "wav"},
                            }
                        ],
                    }
                ]
            }
        },
        "message 1: content part 1 is 'input_audio': only text parts are served",
    ),  # fmt: skip
    (
        {"messages": [{"role": "user", "content": [{"text": "no type"}]}]},
        'message 1: content part 1 must be {"type": "text", "text": "..."}',
    ),
    (
        {"messages": [{"role": "user", "content": [{"type": "text", "text": 3}]}]},
        'message 1: content part 1 must be {"type": "text", "text": "..."}',
    ),
    (
        {"messages": [{"role": "user", "content": ["bare string part"]}]},
        "message 1: content part 1 must be",
    ),
    ({"messages": []}, "messages must be a non-empty list"),
    ({"messages": "hello"}, "messages must be a non-empty list"),
    ({"prompt": 42}, "prompt must be a string, not 42"),
    ({"prompt": "a", "id": [1]}, "id must be a non-empty string or an integer"),
    ({"input": []}, "input must be a string or a non-empty list of strings"),
    (CHAT_LINE | {"method": "GET"}, "method must be POST"),
    (CHAT_LINE | {"custom_id": 5}, "custom_id must be a non-empty string"),
    (CHAT_LINE | {"body": "x"}, "body must be an object"),
    (
        COMPLETION_LINE | {"body": {"messages": CHAT_LINE["body"]["messages"]}},
        "url /v1/completions takes a prompt, not messages",
    ),  # fmt: skip
    (CHAT_LINE | {"body": {"prompt": "a"}}, "url /v1/chat/completions takes messages"),
]


# Lines of the right shape whose values or fields cannot be served: a refused request
# (answered with an error line, config vllm.bad_requests), not a broken file (issue 30).
REFUSED_LINES = [
    ({"prompt": "a", "max_tokens": "5"}, "max_tokens must be a positive integer, not '5'"),
    ({"prompt": "a", "max_tokens": 0}, "max_tokens must be a positive integer"),
    ({"prompt": "a", "temperature": -1}, "temperature must be a number >= 0"),
    ({"prompt": "a", "top_p": 2}, "top_p must be a number in (0, 1]"),
    ({"prompt": "a", "seed": 1.5}, "seed must be an integer"),
    ({"prompt": "a", "stop": [1]}, "stop must be a string or a list of strings"),
    ({"prompt": "a", "ignore_eos": "yes"}, "ignore_eos must be true or false"),
    (CHAT_LINE | {"body": CHAT_LINE["body"] | {"stream": True}}, "stream must be false"),
    # as vLLM's runner: the line's error naming the url and the served ones (HTTP 404)
    (CHAT_LINE | {"url": "/v1/responses"}, "URL /v1/responses was used. Supported endpoints: "),
]


@pytest.mark.parametrize("line, message", REFUSED_LINES)
def test_a_line_with_a_bad_value_is_a_refused_request(tmp_path, line, message):
    path = write_lines(tmp_path / "5.jsonl", [{"prompt": "fine"}, line])
    fine, refused = read_requests(path)
    assert fine.error is None and message in refused.error


def test_every_other_field_goes_to_the_engine_as_it_is(tmp_path):
    """No table of vLLM's fields here: the engine's own front end checks them (a tool
    list, a reasoning effort, a typo vLLM ignores with a warning, as its server does)."""
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    body = CHAT_LINE["body"] | {"tools": tools, "tool_choice": "required", "max_token": 5}
    path = write_lines(tmp_path / "5.jsonl", [CHAT_LINE | {"body": body}])
    (request,) = read_requests(path)
    assert request.error is None
    assert request.fields == {"tools": tools, "tool_choice": "required", "max_token": 5}


def test_a_line_naming_a_model_not_served_is_its_own_error_line(tmp_path):
    """Config vllm.served_model_name: another model's line gets vLLM's 404 answer, the
    others go on; a served alias is answered under its own name."""
    lines = [CHAT_LINE | {"body": CHAT_LINE["body"] | {"model": name}} for name in
             ("NonExistModel", "alias", None)]  # fmt: skip
    lines = [line | {"custom_id": str(i)} for i, line in enumerate(lines)]
    requests = read_requests(write_lines(tmp_path / "5.jsonl", lines))
    other, alias, unnamed = jsonl.with_served_models(requests, ["tiny", "alias"])
    assert (other.status, other.error) == (
        404, "The model `NonExistModel` does not exist. Valid aliases: tiny, alias."
    )  # fmt: skip
    assert alias.error is None and unnamed.error is None
    answer = jsonl.refused_answer(other)
    line = json.loads(jsonl.answer_line(other, answer, 5, "0" * 64, "tiny"))
    assert line["response"]["status_code"] == 404
    assert line["response"]["body"]["error"]["type"] == "not_found_error"
    fine = Answer("hi", "stop", 3, 1)
    labels = [json.loads(jsonl.answer_line(r, fine, 5, "0" * 64, "tiny")) for r in (alias, unnamed)]
    assert [x["response"]["body"]["model"] for x in labels] == ["alias", "tiny"]
    assert jsonl.with_served_models(requests, None) == requests  # no names: no check


@pytest.mark.parametrize("line, message", BAD_LINES)
def test_a_bad_line_is_named_by_file_and_line(tmp_path, line, message):
    path = write_lines(tmp_path / "5.jsonl", [{"prompt": "fine"}, "", line, {"prompt": "x"}])
    with pytest.raises(RequestFileError) as caught:
        read_requests(path)
    assert str(caught.value).startswith(f"{path}: line 3: ")
    assert message in str(caught.value)


TEXT_PARTS = [{"type": "text", "text": "Hello"}, {"type": "text", "text": "world"}]


def test_text_parts_are_the_string_vllm_joins_them_into(tmp_path):
    """OpenAI's content parts: the texts joined by newlines, as vLLM's chat renderer
    joins them for a template that takes a string; so both engines get one string."""
    parts = [{"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
             {"role": "user", "content": TEXT_PARTS}]  # fmt: skip
    text = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello\nworld"}]
    path = write_lines(
        tmp_path / "1.jsonl",
        [{"messages": parts}, CHAT_LINE | {"body": CHAT_LINE["body"] | {"messages": parts}},
         {"messages": text}],
    )  # fmt: skip
    short, batch, plain = read_requests(path)
    assert short.messages == batch.messages == plain.messages == text


def test_repeated_ids_and_bad_bytes(tmp_path):
    path = write_lines(tmp_path / "0.jsonl", [COMPLETION_LINE, COMPLETION_LINE])
    with pytest.raises(RequestFileError, match=r"line 2: id 'request-2' repeats line 1's"):
        read_requests(path)
    path.write_bytes(b'{"prompt": "ok"}\n{"prompt": "\xff"}\n')
    with pytest.raises(RequestFileError, match=r"line 2: not valid UTF-8"):
        read_requests(path)


def test_in_and_jsonl_of_one_rank_fail_naming_both(tmp_path):
    (tmp_path / "7.in").write_text("a\n")
    (tmp_path / "7.jsonl").write_text('{"prompt": "a"}\n')
    (tmp_path / "8.jsonl").write_text('{"prompt": "a"}\n')
    with pytest.raises(RankFileError, match=r"several files for one rank: 7.in and 7.jsonl"):
        discover_rank_files(tmp_path)
    (tmp_path / "7.in").unlink()
    assert discover_rank_files(tmp_path) == {"7": "7.jsonl", "8": "8.jsonl"}


def test_answer_lines_short_and_openai_batch_shape(tmp_path):
    path = write_lines(
        tmp_path / "4.jsonl", [{"prompt": "p", "id": "a"}, CHAT_LINE, COMPLETION_LINE]
    )
    short, chat, text = read_requests(path)
    answer = Answer("generated", "stop", 11, 3)
    assert json.loads(jsonl.answer_line(short, answer, 4, "ab" * 32, "/m")) == {
        "id": "a", "text": "generated", "finish_reason": "stop", "prompt_tokens": 11,
        "output_tokens": 3}  # fmt: skip
    line = json.loads(jsonl.answer_line(chat, answer, 4, "ab" * 32, "/m"))
    assert set(line) == {"id", "custom_id", "response", "error"}
    assert line["custom_id"] == "request-1" and line["error"] is None
    assert re.fullmatch(r"batch_req_[0-9a-f]{16}-4-2", line["id"])
    response = line["response"]
    assert set(response) == {"status_code", "request_id", "body"}
    assert response["status_code"] == 200 and response["request_id"].startswith("req-")
    body = response["body"]
    assert set(body) == {"id", "object", "created", "model", "choices", "usage"}
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    assert body["model"] == "tiny-chat"  # the model the line asked for
    assert isinstance(body["created"], int)
    assert body["choices"] == [
        {"index": 0, "message": {"role": "assistant", "content": "generated"},
         "finish_reason": "stop", "logprobs": None}]  # fmt: skip
    assert body["usage"] == {"prompt_tokens": 11, "completion_tokens": 3, "total_tokens": 14}
    body = json.loads(jsonl.answer_line(text, answer, 4, "ab" * 32, "/m"))["response"]["body"]
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    assert body["choices"] == [
        {"index": 0, "text": "generated", "finish_reason": "stop", "logprobs": None}]  # fmt: skip


def test_partial_answers_survive_a_torn_line_and_drop_on_another_key(tmp_path):
    output = tmp_path / "results" / "9.jsonl"
    partial = Partial(output, {"input": "x"})
    assert partial.load() == {}
    partial.open({})
    assert not partial.path.exists()  # nothing until the first answer
    partial.add(2, Answer("two", "length", 1, 2))
    partial.add(0, Answer("zero", "stop", 1, 1))
    partial.close()
    assert partial.path == tmp_path / "results" / ".partial" / "9.jsonl"
    with partial.path.open("a") as handle:
        handle.write('{"index": 1, "text": "cut sh')  # a kill in the middle of a write
    again = Partial(output, {"input": "x"})
    assert again.load() == {2: Answer("two", "length", 1, 2), 0: Answer("zero", "stop", 1, 1)}
    assert Partial(output, {"input": "changed"}).load() == {}
    again.open(again.load())
    again.add(1, Answer("one", "stop", 1, 1))
    again.close()
    assert len(Partial(output, {"input": "x"}).load()) == 3
    assert "cut sh" not in partial.path.read_text()  # rewritten whole before appending
    again.remove()
    assert not partial.path.exists()


# ----------------------------------------------------------------------------- echo engines


def serve_lines(tmp_path, name: str, lines, pool, **settings) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    rank_file = write_lines(tmp_path / name, lines)
    config = {"engine": "echo", "model": "echo"} | settings
    settings = checks.parse_settings(json.dumps(config))
    out = tmp_path / "results" / name
    serve_rank(int(name.split(".")[0]), settings, rank_file, out, pool, out.parent / f"{name}.json")
    return tmp_path / "results" / name


def registry_pool(folder: Path, engine: Engine) -> routing.RegistryPool:
    """The ranks' pool (routing.RegistryPool) over one started engine's registry entry."""
    folder.mkdir(parents=True, exist_ok=True)
    registry_format.write_state(folder / f"{engine.name}.json", engine, "ready")
    return routing.RegistryPool(
        folder, [engine.name], max_in_flight=4, ready_timeout=60, api_key=engine.api_key
    )


@contextmanager
def warm_vllm_pool(
    folder: Path,
    model: Path,
    settings: dict,
    server: str = "inprocess",
    python=sys.executable,
    port: int | None = None,
):
    """One warm vLLM engine of ``model`` (``server``: config warm.server; ``python``: config
    python) on a pretend tile 0, as a run starts it from ``settings`` (engine_args too),
    and the ranks' pool over it; stopped on leaving. ``port``: the engine's (a free one by
    default)."""
    port, key = port or free_port(), lifecycle.new_api_key()
    argv = lifecycle.server_argv(python, str(model), port, settings, 1, server=server)
    slot = node_layout.Slot("localhost", (0,))
    placement = tiles.engine_env(slot, "FLAT", free_port(), folder / "engine-tmp")
    base = {**os.environ, **TASK_ENV, lifecycle.API_KEY_VARIABLE: key}
    env = lifecycle.engine_environment(placement, settings, base)
    engine = Engine(argv, env, folder / "engine.log", port, name=server, api_key=key)
    engine.start()
    try:
        engine.wait_ready(READY_TIMEOUT)
        yield registry_pool(folder / "registry", engine)
    finally:
        engine.stop()


# A word that makes the echo engines refuse a prompt (ECHO_SERVER_REFUSE_ON): a stand-in
# for a request vLLM refuses.
REFUSED_WORD = "REFUSE-ME"


@pytest.fixture
def echo_pool(tmp_path):
    port = free_port()
    argv = [sys.executable, str(SCRIPTS / "engine" / "echo_server.py"), "--port", str(port)]
    argv += ["--max-model-len", "40", "--refuse-on", REFUSED_WORD]
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    engine = Engine(argv, env, tmp_path / "echo.log", port, name="e", stop_grace=5)
    engine.start()
    try:
        engine.wait_ready(60)
        yield registry_pool(tmp_path / "registry", engine)
    finally:
        engine.stop()


def test_jsonl_rank_on_an_echo_server(tmp_path, echo_pool):
    lines = [{"prompt": "one two", "id": "a"}, CHAT_LINE, COMPLETION_LINE,
             {"messages": [{"role": "user", "content": "hi"}]},
             {"messages": [{"role": "user", "content": TEXT_PARTS}]},
             {"messages": [{"role": "user", "content": "Hello\nworld"}]}]  # fmt: skip
    out = serve_lines(tmp_path, "6.jsonl", lines, echo_pool)
    answers = [json.loads(x) for x in out.read_text().splitlines()]
    assert [a.get("custom_id", a.get("id")) for a in answers] == [
        "a", "request-1", "request-2", 4, 5, 6]  # fmt: skip
    # text parts: the answer of the same text as one string
    assert answers[4] | {"id": 6} == answers[5]
    assert answers[5]["text"] == "<|user|> Hello\nworld\n<|assistant|>"
    assert answers[0] == {"id": "a", "text": "one two", "finish_reason": "length",
                          "prompt_tokens": 2, "output_tokens": 2}  # fmt: skip
    chat = answers[1]["response"]["body"]
    # the engine rendered the messages with its template: its markers are in the prompt
    content = chat["choices"][0]["message"]["content"]
    assert content == "<|system|> You are brief.\n<|user|> Hello world\n<|assistant|>"
    assert chat["usage"]["prompt_tokens"] == len(content.split()) == 8
    assert answers[2]["response"]["body"]["choices"][0]["text"] == "Once upon"
    record = json.loads((tmp_path / "results" / "6.jsonl.json").read_text())
    assert record["prompts"] == 6
    assert record["prompt_tokens"] == record["output_tokens"] == 2 + 8 + 2 + 3 + 4 + 4
    # the per-rank echo engine (task.py's own) answers parts as the same string too
    requests = read_requests(tmp_path / "6.jsonl")
    assert echo.echo_answer(requests[4]) == echo.echo_answer(requests[5])
    assert not (tmp_path / "results" / ".partial" / "6.jsonl").exists()


def test_a_request_over_the_context_fails_the_rank_naming_line_and_tokens(tmp_path, echo_pool):
    """With config vllm.bad_requests "fail_rank", before any request is sent; by default
    it is an error line, told by the answer's own prompt tokens (no /tokenize)."""
    # the echo engine's usage counts words, its /tokenize a BOS too: 37 tokens either way
    answered = [{"prompt": "short"}, {"prompt": " ".join(["w"] * 37), "max_tokens": 4}]
    out = serve_lines(tmp_path / "default", "2.jsonl", answered, echo_pool)
    short, refused = (json.loads(x) for x in out.read_text().splitlines())
    assert short["text"] == "short"
    assert refused["error"]["message"] == (
        "request is 37 tokens, more than the 36 allowed "
        "(max_tokens 4 + request tokens must be <= max_model_len 40)"
    )
    long = " ".join(["w"] * 36)
    lines = [{"prompt": "short"}, {"prompt": long, "max_tokens": 4}]
    strict = {"bad_requests": "fail_rank"}
    with pytest.raises(checks.UsageError) as caught:
        serve_lines(tmp_path, "2.jsonl", lines, echo_pool, **strict)
    text = str(caught.value)
    assert f"{tmp_path / '2.jsonl'}: line 2: request is 37 tokens, more than the 36 allowed" in text
    assert "max_tokens 4 + request tokens must be <= max_model_len 40" in text
    assert not (tmp_path / "results").exists() or not any((tmp_path / "results").rglob("*"))
    # a chat counts its template's markers: 35 words and 2 markers
    chat = [{"messages": [{"role": "user", "content": " ".join(["w"] * 35)}], "max_tokens": 4}]
    with pytest.raises(checks.UsageError, match=r"line 1: request is 37 tokens, more than the 36"):
        serve_lines(tmp_path, "3.jsonl", chat, echo_pool, **strict)
    with pytest.raises(checks.UsageError, match=r"line 1: max_tokens 40 leaves no room"):
        serve_lines(tmp_path, "4.jsonl", [{"prompt": "a", "max_tokens": 40}], echo_pool, **strict)


def test_pbs_submissions_find_jsonl_ranks_and_their_rule(tmp_path):
    from pbs.submission import job_ranks

    outputs = ["results/3.jsonl", "results/records/3.json", "results/4.out"]
    assert job_ranks({"output": outputs}) == [3, 4]
    assert job_ranks({"input": ["data/3.jsonl", "data/4.in"]}) == [3, 4]
    assert job_ranks({}, "--target-jobs 'infer:rank=4' 'infer_jsonl:rank=3'") == [3, 4]
    from rank import layout

    (tmp_path / "3.jsonl").write_text("{}\n")
    (tmp_path / "4.in").write_text("a\n")
    assert layout.rule_of(layout.input_file(tmp_path, "3").name) == "infer_jsonl"
    assert layout.rule_of(layout.input_file(tmp_path, "4").name) == "infer"
    assert layout.output_file("results", tmp_path, "3") == Path("results/3.jsonl")
