"""The echo engine in this process (config engine: echo, warm_engines: false): each prompt
(or the messages in echo_server's chat rendering) is its own answer; no model at all."""

from __future__ import annotations

import os
import time

from formats.partial import Answer
from rank.jsonl import Request, answer_of, error_answer, refused_answer


def echo_answer(request: Request) -> Answer:
    """The echo engine: the prompt (or the messages in echo_server's chat rendering) is
    its own answer; one token per word; other fields are ignored, as echo_server ignores
    them; a prompt holding ECHO_SERVER_REFUSE_ON is refused, as echo_server refuses it."""
    from engine import echo_server

    if request.error:
        return refused_answer(request)
    if request.kind is not None:
        return error_answer(f"{request.url} is not served by the echo engine (no model)")
    if request.embedding:
        answer = echo_server.embeddings_answer({"input": request.input}, "echo")
        vectors = [item["embedding"] for item in answer["data"]]
        return Answer("", None, answer["usage"]["prompt_tokens"], 0, embeddings=vectors)
    try:
        if request.chat:
            answer = echo_server.chat_answer({"messages": request.messages}, "echo")
        else:
            answer = echo_server.completion_answer({"prompt": request.prompt}, "echo")
        said = answer["choices"][0]
        text = said["message"]["content"] if request.chat else said["text"]
        echo_server.check_refused([text], os.environ.get(echo_server.REFUSE_VARIABLE))
    except echo_server.BadRequest as error:
        return error_answer(str(error))
    usage = answer["usage"]
    return answer_of(request, answer["choices"], usage["prompt_tokens"], usage["completion_tokens"])


def run_echo(requests: list[Request]) -> dict:
    """The echo engine for a whole rank, in this process; no model at all."""
    t0 = time.monotonic()
    answers = {i: echo_answer(r) for i, r in enumerate(requests)}
    return {
        "answers": answers,
        "import_s": 0.0,
        "load_s": 0.0,
        "generate_s": time.monotonic() - t0,
        "truncated": [],
    }
