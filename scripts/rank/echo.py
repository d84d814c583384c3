"""The echo engine in this process (config engine: echo, warm_engines: false): each prompt
(or the messages in echo_server's chat rendering) is its own answer; no model at all."""

from __future__ import annotations

import time

from formats.partial import Answer
from rank.jsonl import Request, answer_of, error_answer, refused_answer


def echo_answer(request: Request, sampling: dict | None = None) -> Answer:
    """The echo engine: the prompt (or the messages in echo_server's chat rendering) is
    its own answer; one token per word; the request's fields as echo_server answers them."""
    from engine import echo_server

    if request.error:
        return refused_answer(request)
    if request.kind is not None:
        return error_answer(f"{request.url} is not served by the echo engine (no model)")
    if request.embedding:
        answer = echo_server.embeddings_answer({"input": request.input}, "echo")
        vectors = [item["embedding"] for item in answer["data"]]
        return Answer("", None, answer["usage"]["prompt_tokens"], 0, embeddings=vectors)
    body = {**(sampling or {}), **request.sampling, **request.fields}
    if request.chat:
        body["messages"] = request.messages
    else:
        body["prompt"] = request.prompt
    try:
        answer = (echo_server.chat_answer if request.chat else echo_server.completion_answer)(
            body, "echo"
        )
    except echo_server.BadRequest as error:
        return error_answer(str(error))
    usage = answer["usage"]
    return answer_of(request, answer["choices"], usage["prompt_tokens"], usage["completion_tokens"])


def run_echo(requests: list[Request], sampling: dict | None = None) -> dict:
    """The echo engine for a whole rank, in this process; no model at all."""
    t0 = time.monotonic()
    answers = {i: echo_answer(r, sampling) for i, r in enumerate(requests)}
    return {
        "answers": answers,
        "import_s": 0.0,
        "load_s": 0.0,
        "generate_s": time.monotonic() - t0,
        "truncated": [],
    }
