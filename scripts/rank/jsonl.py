"""JSONL rank files: ``<rank>.jsonl`` requests in, ``<rank>.jsonl`` answers out; and
the partial answers that let any rank resume where a kill stopped it.

Pure Python: no vLLM, no torch. Used by scripts/rank/task.py and the tests.

A request line is one of:

* an OpenAI batch line, as OpenAI's and vLLM's ``run-batch`` tooling writes it:
  ``{"custom_id": ..., "method": "POST", "url": "/v1/completions" or
  "/v1/chat/completions", "body": {"prompt" or "messages", ...}}``;
* a short line: ``{"prompt": "..."}`` or ``{"messages": [{"role", "content"}, ...]}``
  with optional ``id``, ``max_tokens``, ``temperature``, ``top_p``, ``seed``, ``stop``
  (and vLLM's ``ignore_eos``).

A message's content is a string or OpenAI's list of text parts, joined as vLLM joins
them (`_content_text`); any other part (image_url, input_audio, ...) is a bad line.

Each line's sampling fields override config ``sampling`` for that request. Blank lines
are skipped; line numbers count every line. The answers keep the input order: a short
line gets ``{"id", "text", "finish_reason", "prompt_tokens", "output_tokens"}`` (the id
is the line's ``id``, else its line number), a batch line gets the OpenAI batch output
line (``{"id", "custom_id", "response": {"status_code", "request_id", "body"},
"error"}``, the body a ``text_completion`` or ``chat.completion``), so the file goes
straight back into the user's tooling. Its ids are derived from the rank file's digest
and the line (not random), so a seeded rerun writes the same bytes.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

from formats.partial import Answer
from rank.prompts import PromptFileError, read_prompts

ENDPOINTS = {
    "/v1/completions": "completions",
    "/v1/chat/completions": "chat",
    "/v1/embeddings": "embeddings",
    # vLLM's score and rerank endpoints (pooling models), under each name its server has
    "/v1/score": "score",
    "/score": "score",
    "/v1/rerank": "rerank",
    "/rerank": "rerank",
    "/v2/rerank": "rerank",
}
# The kinds a pooling model's engine answers (a rank holds one kind: generation or pooling).
POOLING_KINDS = ("embeddings", "score", "rerank")
# An embeddings request's fields read here ("float" is the one encoding written: the
# answer file and the .npy hold floats); every other field goes to the engine as it is.
EMBEDDING_KEYS = {"model", "input", "encoding_format"}
ROLES = ("system", "developer", "user", "assistant", "tool")
# Per-request sampling fields; config `sampling` gives the rest (ignore_eos: vLLM's
# extension of the OpenAI API, which its run-batch takes too).
SAMPLING_KEYS = ("max_tokens", "temperature", "top_p", "seed", "stop", "ignore_eos")
# Every other field of a request goes to the engine as it is: vLLM's own front end checks
# it (engine/vllm_server.py), so a bad one is that request's error line. No table of
# vLLM's fields is kept here: the installed vLLM's server is the one that knows them.
SHORT_KEYS = {"id", "prompt", "messages", *SAMPLING_KEYS}
# Batch body fields read here; "model" names the run's one model and is only checked to
# be a string; "stream" must be false (one answer per line).
BODY_KEYS = {
    "model",
    "prompt",
    "messages",
    "max_completion_tokens",
    "stream",
    "user",
    *SAMPLING_KEYS,
}


STREAMED = "stream must be false (one answer per line)"


class RequestFileError(PromptFileError):
    """A request line that cannot be served, named by file and line."""


@dataclass(frozen=True)
class Request:
    line: int  # 1-based line number in the rank file
    id: str | int  # custom_id, id, or the line number
    batch: bool  # an OpenAI batch line (answered in the batch output shape)
    prompt: str | None = None  # completions
    messages: list | None = None  # chat
    sampling: dict = field(default_factory=dict)  # this request's overrides
    model: str | None = None  # the batch body's "model", answered back
    fields: dict = field(default_factory=dict)  # the line's other fields, for the engine
    error: str | None = None  # why it is refused before any engine sees it
    input: list | None = None  # embeddings: the texts to embed
    kind: str | None = None  # score or rerank: sent to ``url`` with ``body`` as it is
    url: str | None = None
    body: dict | None = None
    status: int = 400  # the HTTP status of ``error`` (404: an unknown url or model)

    @property
    def chat(self) -> bool:
        return self.messages is not None

    @property
    def embedding(self) -> bool:
        return self.input is not None

    @property
    def pooling(self) -> bool:
        """Answered by a pooling model's engine (embeddings, score, rerank)."""
        return self.embedding or self.kind is not None


def embedding_rank(requests: list[Request]) -> bool:
    """A rank for a pooling model's engines (a rank holds one kind: read_requests checks it)."""
    return any(r.pooling for r in requests)


def error_answer(message: str, param: str | None = None, status: int = 400) -> Answer:
    error = {"message": message, "param": param}
    return Answer("", None, 0, 0, error=error | ({"code": status} if status != 400 else {}))


def refused_answer(request: Request) -> Answer:
    """The answer of a request refused as it was read (its error and status)."""
    return error_answer(request.error, status=request.status)


def not_served(model: str, served: list[str]) -> str:
    """vLLM's server's answer to a request naming a model it does not serve (HTTP 404)."""
    return f"The model `{model}` does not exist. Valid aliases: {', '.join(served)}."


def with_served_models(requests: list[Request], served: list[str] | None) -> list[Request]:
    """The requests, those naming a model the run does not serve (config
    served_model_name) refused as vLLM's server refuses them: an error line, the rest of
    the rank answered. ``served`` None: every name is served (no check)."""
    if not served:
        return requests
    return [
        replace(r, error=not_served(r.model, served), status=404)
        if r.model is not None and r.model not in served and r.error is None
        else r
        for r in requests
    ]


def answer_of(request: Request, choices: list, prompt_tokens: int, output_tokens: int) -> Answer:
    """The answer of an engine's OpenAI ``choices``, the same from every engine: each choice
    with OpenAI's keys only (vLLM adds its own); kept whole when they say more than the
    first one's text (n > 1, logprobs)."""
    kept = []
    for index, choice in enumerate(choices):
        if request.chat:
            message = choice.get("message") or {}
            said = {"message": {"role": "assistant", "content": message.get("content") or ""}}
            # what vLLM's parsers split from the text (--tool-call-parser, --reasoning-parser)
            for key in ("tool_calls", "reasoning"):
                if message.get(key):
                    said["message"][key] = message[key]
        else:
            said = {"text": choice.get("text") or ""}
        logprobs = choice.get("logprobs")
        kept.append({"index": index, **said, "finish_reason": choice.get("finish_reason")})
        kept[-1]["logprobs"] = logprobs
    first = kept[0]
    text = first["message"]["content"] if request.chat else first["text"]
    whole = len(kept) > 1 or any(
        c["logprobs"] is not None or len(c.get("message", ())) > 2 for c in kept
    )
    return Answer(
        text, first["finish_reason"], prompt_tokens, output_tokens, kept if whole else None
    )


class _Refused(Exception):
    """A request line whose fields or values cannot be served (its error answer)."""


def is_jsonl(path: str | os.PathLike) -> bool:
    return str(path).endswith(".jsonl")


# ----------------------------------------------------------------------------- reading


def is_number(value) -> bool:
    """An int or a float, not a bool (JSON's true is no number of tokens)."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_sampling(given: dict, where) -> dict:
    """The sampling overrides of one line, each checked as config `sampling` is."""
    checks = {
        "max_tokens": (lambda v: is_int(v) and v > 0, "a positive integer"),
        "temperature": (lambda v: is_number(v) and v >= 0, "a number >= 0"),
        "top_p": (lambda v: is_number(v) and 0 < v <= 1, "a number in (0, 1]"),
        "seed": (is_int, "an integer"),
        "ignore_eos": (lambda v: isinstance(v, bool), "true or false"),
        "stop": (
            lambda v: (
                isinstance(v, str) or (isinstance(v, list) and all(isinstance(s, str) for s in v))
            ),
            "a string or a list of strings",
        ),
    }
    sampling = {}
    for key, (ok, expected) in checks.items():
        if given.get(key) is None:
            continue
        if not ok(given[key]):
            raise where(f"{key} must be {expected}, not {given[key]!r}")
        sampling[key] = given[key]
    return sampling


def _check_messages(messages, where) -> list:
    if not isinstance(messages, list) or not messages:
        raise where(
            f"messages must be a non-empty list of {{role, content}} objects, not {messages!r}"
        )
    for number, message in enumerate(messages, start=1):
        if not isinstance(message, dict):
            raise where(
                f"message {number} must be an object with role and content, not {message!r}"
            )
        role = message.get("role")
        if role not in ROLES:
            raise where(f"message {number}: unknown role {role!r} (roles: {', '.join(ROLES)})")
    return [
        {"role": m["role"], "content": _content_text(m.get("content"), number, where)}
        for number, m in enumerate(messages, start=1)
    ]


def _content_text(content, number: int, where) -> str:
    """A message's content as the one string the chat template gets: a string as it is;
    OpenAI's list of parts (``[{"type": "text", "text": ...}, ...]``) with its texts
    joined by newlines, as vLLM joins them for a template that takes content as a string
    (vllm/renderers/chat_utils.py). So a request gives the same answer whichever way its
    text is written, on warm and per-rank engines alike."""
    if isinstance(content, str):
        return content
    expected = "a string or a non-empty list of text parts ({type: text, text})"
    if not isinstance(content, list) or not content:
        raise where(f"message {number}: content must be {expected}, not {content!r}")
    texts = []
    for index, part in enumerate(content, start=1):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind != "text" and isinstance(kind, str):
            raise where(
                f"message {number}: content part {index} is {kind!r}: only text parts are "
                "served (the run's model takes text)"
            )
        if kind != "text" or not isinstance(part.get("text"), str):
            raise where(
                f"message {number}: content part {index} must be "
                f'{{"type": "text", "text": "..."}}, not {part!r}'
            )
        texts.append(part["text"])
    return "\n".join(texts)


def _one_of_prompt_or_messages(fields: dict, where, endpoint: str | None = None):
    """The prompt or the messages of a line (exactly one of them)."""
    has_prompt, has_messages = "prompt" in fields, "messages" in fields
    if endpoint == "completions" and has_messages:
        raise where("url /v1/completions takes a prompt, not messages (use /v1/chat/completions)")
    if endpoint == "chat" and has_prompt:
        raise where("url /v1/chat/completions takes messages, not a prompt (use /v1/completions)")
    if has_prompt == has_messages:
        what = "both prompt and messages" if has_prompt else "neither prompt nor messages"
        raise where(f"the request has {what}: give one of them")
    if has_prompt:
        if not isinstance(fields["prompt"], str):
            raise where(f"prompt must be a string, not {fields['prompt']!r}")
        return fields["prompt"], None
    return None, _check_messages(fields["messages"], where)


def _batch_request(data: dict, number: int, where) -> Request:
    unknown = sorted(set(data) - {"custom_id", "method", "url", "body"})
    if unknown:
        raise where(f"batch line: unknown fields {unknown}")
    custom_id = data.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        raise where(f"batch line: custom_id must be a non-empty string, not {custom_id!r}")
    if data.get("method", "POST") != "POST":
        raise where(f"batch line: method must be POST, not {data.get('method')!r}")
    url = data.get("url")
    body = data.get("body")
    if not isinstance(body, dict):
        raise where(f"batch line: body must be an object, not {body!r}")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise where(f"batch line: model must be a string, not {model!r}")
    if url not in ENDPOINTS:  # as vLLM's runner: this line's error, the rest answered
        message = f"URL {url} was used. Supported endpoints: {', '.join(ENDPOINTS)}."
        return Request(number, custom_id, True, model=model, url=url, error=message, status=404)
    kind = ENDPOINTS[url]
    if kind == "embeddings":
        return replace(_embedding_request(body, number, where, custom_id, True, model), url=url)
    if kind in POOLING_KINDS:  # score, rerank: vLLM's server checks the body
        refused = None if body.get("stream", False) is False else STREAMED
        return Request(
            number, custom_id, True, model=model, kind=kind, url=url, body=body, error=refused
        )
    fields = dict(body)
    refused = None
    if fields.get("stream", False) is not False:
        refused = STREAMED
    elif fields.get("max_completion_tokens") is not None:
        if fields.get("max_tokens") is not None:
            refused = "give max_tokens or max_completion_tokens, not both"
        fields["max_tokens"] = fields["max_completion_tokens"]
    return replace(_request(fields, number, where, custom_id, kind, model, refused), url=url)


def _short_request(data: dict, number: int, where) -> Request:
    given_id = data.get("id", number)
    if not (isinstance(given_id, str) and given_id) and not is_int(given_id):
        raise where(f"id must be a non-empty string or an integer, not {given_id!r}")
    if "input" in data:
        rest = {k: v for k, v in data.items() if k != "id"}
        return _embedding_request(rest, number, where, given_id, False)
    return _request(data, number, where, given_id)


def _embedding_request(body: dict, number: int, where, request_id, batch: bool, model=None):
    """An embeddings request: ``input`` a string or a non-empty list of strings."""
    texts = body.get("input")
    if isinstance(texts, str):
        texts = [texts]
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
        raise where(f"input must be a string or a non-empty list of strings, not {texts!r}")
    refused = None
    if body.get("encoding_format", "float") != "float":
        refused = f'encoding_format {body["encoding_format"]!r}: only "float" is written'
    fields = _engine_fields(body, EMBEDDING_KEYS)
    return Request(
        line=number,
        id=request_id,
        batch=batch,
        model=model,
        input=texts,
        fields=fields,
        error=refused,
    )


def _engine_fields(fields: dict, known: set) -> dict:
    """The line's fields for the engine: all but those read here (vLLM checks them)."""
    return {k: v for k, v in fields.items() if k not in known and v is not None}


def _request(
    fields: dict,
    number: int,
    where,
    request_id,
    endpoint: str | None = None,
    model=None,
    refused: str | None = None,
) -> Request:
    """The request of line ``number``: its prompt or messages, its sampling and its other
    OpenAI fields, from ``fields`` (a short line, or a batch line's body); a batch line's
    ``endpoint`` makes it a batch request (answered in the batch output shape).

    A line of the wrong shape (no prompt, bad messages) is a broken file: RequestFileError.
    A line whose fields or values cannot be served is a refused request: its ``error``
    says why, and the rank answers it with an error line."""
    prompt, messages = _one_of_prompt_or_messages(fields, where, endpoint)
    known = BODY_KEYS if endpoint is not None else SHORT_KEYS
    sampling, extra = {}, {}
    try:
        if refused:
            raise _Refused(refused)
        sampling = _check_sampling(fields, _Refused)
        extra = _engine_fields(fields, known)
    except _Refused as error:
        refused = str(error)
    return Request(
        line=number,
        id=request_id,
        batch=endpoint is not None,
        prompt=prompt,
        messages=messages,
        sampling=sampling,
        model=model,
        fields=extra,
        error=refused,
    )


def parse_line(raw: bytes, number: int, path) -> Request | None:
    """The request of one raw line (line ``number`` of ``path``), None for a blank line;
    RequestFileError names the file and the line. The checks of every request line, for
    rank files and for datasets (scripts/dataset/cut.py) alike."""

    def where(message):
        return RequestFileError(f"{path}: line {number}: {message}")

    if not raw.strip():
        return None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise where(
            f"not valid UTF-8 (byte 0x{raw[exc.start]:02x} at column {exc.start + 1})"
        ) from None
    try:
        fields = json.loads(text)
    except json.JSONDecodeError as exc:
        raise where(f"not JSON: {exc.msg} at column {exc.colno}") from None
    if not isinstance(fields, dict):
        raise where(f"a request must be a JSON object, not {type(fields).__name__}")
    is_batch = any(k in fields for k in ("custom_id", "url", "body", "method"))
    return (_batch_request if is_batch else _short_request)(fields, number, where)


def check_next(requests: list[Request], request: Request, seen: dict, path) -> None:
    """What one line must agree on with the lines before it (``seen``: each id's line):
    a unique id, and one kind (generation, or pooling: embeddings, score, rerank) in a rank."""
    key = (type(request.id).__name__, request.id)
    if key in seen:
        raise RequestFileError(
            f"{path}: line {request.line}: id {request.id!r} repeats line {seen[key]}'s "
            "(ids must be unique)"
        )
    seen[key] = request.line
    # a line of an unknown url is its own error line, of no kind
    kinds = [r for r in requests if r.url is None or r.url in ENDPOINTS]
    if kinds and request.url in (None, *ENDPOINTS) and request.pooling != kinds[0].pooling:
        names = ("a generation", "a pooling (embeddings, score, rerank)")
        first = ("generation", "pooling")[kinds[0].pooling]
        raise RequestFileError(
            f"{path}: line {request.line}: {names[request.pooling]} request in a rank of "
            f"{first} requests (line {kinds[0].line}): one engine serves one kind, so a rank "
            "holds one"
        )


def read_requests(path: str | os.PathLike) -> list[Request]:
    """The requests of a JSONL rank file, in order; RequestFileError names the first bad
    line (and the file)."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise RequestFileError(f"{path}: cannot read rank file: {exc.strerror or exc}") from exc
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    requests, seen = [], {}
    for number, raw in enumerate(data.split(b"\n"), start=1):
        request = parse_line(raw, number, path)
        if request is None:
            continue
        check_next(requests, request, seen, path)
        requests.append(request)
    return requests


def read_rank(path: str | os.PathLike) -> list[Request]:
    """A rank's requests: a JSONL rank file, or a ``.in`` file (one prompt a line)."""
    if is_jsonl(path):
        return read_requests(path)
    return [Request(line=p.line, id=p.line, batch=False, prompt=p.text) for p in read_prompts(path)]


def sampling_of(request: Request, defaults: dict) -> dict:
    """Config `sampling` with the request's own fields on top."""
    return {**defaults, **request.sampling}


# ----------------------------------------------------------------------------- answers


def answer_line(
    request: Request, answer: Answer, rank: int, digest: str, model: str, npy_row=None
) -> str:
    """The output line of one request (see the module doc); ``npy_row``: the row of its
    first vector in the rank's .npy (config vllm.embeddings_npy), None: vectors inline."""
    if request.embedding and answer.error is None:
        return _embedding_line(request, answer, rank, digest, model, npy_row)
    if not request.batch:
        if answer.error is not None:
            fields = {"id": request.id, "error": answer.error}
            return json.dumps(fields, ensure_ascii=False) + "\n"
        fields = {
            "id": request.id,
            "text": answer.text,
            "finish_reason": answer.finish_reason,
            "prompt_tokens": answer.prompt_tokens,
            "output_tokens": answer.output_tokens,
        }
        if answer.choices is not None:
            fields["choices"] = answer.choices
        return json.dumps(fields, ensure_ascii=False) + "\n"
    # Stable ids: from the rank file's content and the line, so reruns write the same bytes.
    tag = f"{digest[:16]}-{rank}-{request.line}"
    if answer.error is not None:
        # OpenAI's batch output of a request the API refused: its HTTP answer (4xx)
        status = answer.error.get("code", 400)
        kind = "not_found_error" if status == 404 else "invalid_request_error"
        error = {"message": answer.error["message"], "type": kind}
        error |= {"param": answer.error.get("param"), "code": None}
        response = {"status_code": status, "request_id": f"req-{tag}", "body": {"error": error}}
        line = {"id": f"batch_req_{tag}", "custom_id": request.id, "response": response}
        return json.dumps(line | {"error": None}, ensure_ascii=False) + "\n"
    if answer.body is not None:  # score, rerank: vLLM's answer, its id and time made stable
        body = dict(answer.body)
        body |= {"id": f"{request.kind}-{tag}", "model": request.model or model}
        if "created" in body:
            body["created"] = 0
        return _batch_line(request, tag, body)
    if request.chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": answer.text}}
        kind, prefix = "chat.completion", "chatcmpl"
    else:
        choice = {"index": 0, "text": answer.text}
        kind, prefix = "text_completion", "cmpl"
    choice |= {"finish_reason": answer.finish_reason, "logprobs": None}
    body = {
        "id": f"{prefix}-{tag}",
        "object": kind,
        # not the clock: a seeded rerun, or a resumed rank, writes the same bytes
        "created": 0,
        "model": request.model or model,
        "choices": answer.choices if answer.choices is not None else [choice],
        "usage": {
            "prompt_tokens": answer.prompt_tokens,
            "completion_tokens": answer.output_tokens,
            "total_tokens": answer.prompt_tokens + answer.output_tokens,
        },
    }
    return _batch_line(request, tag, body)


def _embedding_line(
    request: Request, answer: Answer, rank: int, digest: str, model: str, npy_row=None
) -> str:
    """OpenAI's embeddings answer (``data[].embedding``, ``usage``): the body of a batch
    line's response, or a short line's fields beside its id. With the vectors in the
    rank's .npy, each item names its row there instead (``"embedding": null``)."""
    data = [
        {"object": "embedding", "index": i, "embedding": vector}
        for i, vector in enumerate(answer.embeddings or [])
    ]
    if npy_row is not None:
        data = [item | {"embedding": None, "npy_row": npy_row + i} for i, item in enumerate(data)]
    body = {
        "object": "list",
        "data": data,
        "model": request.model or model,
        "usage": {"prompt_tokens": answer.prompt_tokens, "total_tokens": answer.prompt_tokens},
    }
    if not request.batch:
        return json.dumps({"id": request.id, **body}, ensure_ascii=False) + "\n"
    tag = f"{digest[:16]}-{rank}-{request.line}"
    return _batch_line(request, tag, body)


def _batch_line(request: Request, tag: str, body: dict) -> str:
    """OpenAI's batch output line of an answered request (``tag``: its digest, rank, line)."""
    line = {
        "id": f"batch_req_{tag}",
        "custom_id": request.id,
        "response": {"status_code": 200, "request_id": f"req-{tag}", "body": body},
        "error": None,
    }
    return json.dumps(line, ensure_ascii=False) + "\n"


def npy_bytes(vectors: list[list[float]]) -> bytes:
    """``vectors`` (rows of one length) as a NumPy .npy file of float32, format 1.0, written
    without numpy (Snakemake's Python may have none)."""
    import array
    import sys

    width = len(vectors[0]) if vectors else 0
    values = array.array("f", [x for row in vectors for x in row])
    if sys.byteorder != "little":
        values.byteswap()
    header = f"{{'descr': '<f4', 'fortran_order': False, 'shape': ({len(vectors)}, {width}), }}"
    header += " " * (-(len(header) + 11) % 64) + "\n"  # 10-byte prefix, aligned to 64
    return (
        b"\x93NUMPY\x01\x00"
        + len(header).to_bytes(2, "little")
        + header.encode()
        + values.tobytes()
    )
