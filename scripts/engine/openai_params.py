"""An OpenAI request's fields as vLLM's engine takes them, and its outputs in OpenAI's shapes:
shared by the in-process server (engine/vllm_server.py) and per-rank engines
(rank/offline.py), so that a request means the same on every engine.

The fields are read by vLLM's own request models (``ChatCompletionRequest``,
``CompletionRequest`` and their ``to_sampling_params``), as vLLM's OpenAI server reads them:
``response_format`` (json_schema, json_object), vLLM's ``structured_outputs``, ``logprobs``
and ``top_logprobs``, ``n``, the penalties, ``top_k``, ``min_p``, ``min_tokens``,
``stop_token_ids``, ``logit_bias``. A value they refuse is that request's `Refused` (HTTP 400
on a server, an error line in a rank). Fields only vLLM's server serves
(rank/jsonl.py's SERVER_ONLY_FIELDS: tools, beam search, prompt logprobs, ...) are refused
naming the field and that server, never ignored.

vLLM is imported inside the functions (engine/vllm_versions.py holds what differs between
the vLLMs).
"""

from __future__ import annotations

from engine import vllm_versions
from rank.jsonl import SERVER_ONLY_FIELDS

# What to tell a user whose request needs vLLM's own server.
SERVED_BY_VLLM = "vLLM's OpenAI server serves it (config warm_engines: true, warm.server: vllm)"
# Logprobs vLLM cannot give as a float (-inf) are written as OpenAI and vLLM write them.
LOWEST_LOGPROB = -9999.0


class Refused(ValueError):
    """A request the engine refuses: its message, and the field it names (or None)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


def sampling_params(endpoint: str, body: dict, engine: str, allowed=()):
    """vLLM's SamplingParams of the request ``body`` ("chat" or "completions"), as vLLM's
    OpenAI server makes them; `Refused` for a field ``engine`` cannot serve or a value
    vLLM's request model refuses. ``allowed``: SERVER_ONLY_FIELDS this engine serves."""
    for name in SERVER_ONLY_FIELDS:
        if name in body and name not in allowed:
            raise Refused(f"field {name!r} is not served by {engine}: {SERVED_BY_VLLM}", name)
    given = {k: v for k, v in body.items() if k not in ("prompt", "messages") and v is not None}
    max_tokens = given.get("max_tokens") or given.get("max_completion_tokens")
    try:
        request = vllm_versions.openai_request(endpoint, given)
        return vllm_versions.to_sampling_params(request, max_tokens)
    except Exception as error:
        if not is_refusal(error):
            raise
        raise Refused(_message(error), _param(error)) from None


def is_refusal(error: Exception) -> bool:
    """A bad value, not a broken engine: pydantic's ValidationError, vLLM's
    VLLMValidationError (a ValueError in 0.15, not in 0.32), ValueError, TypeError."""
    return isinstance(error, ValueError | TypeError) or hasattr(error, "parameter")


def _message(error: Exception) -> str:
    errors = getattr(error, "errors", None)
    if callable(errors):
        first = errors()[0]  # pydantic: the first problem, by its field
        where = str(first["loc"][0]) if first.get("loc") else ""
        message = str(first.get("msg")).removeprefix("Value error, ")
        return f"{where}: {message}" if where else message
    return str(error)


def _param(error: Exception) -> str | None:
    if getattr(error, "parameter", None):
        return str(error.parameter)
    errors = getattr(error, "errors", None)
    if callable(errors):
        for item in errors():
            if item.get("loc"):
                return str(item["loc"][0])
    return None


def _token(token_id: int, logprob, tokenizer) -> str:
    text = getattr(logprob, "decoded_token", None)
    return text if text is not None else tokenizer.decode([token_id])


def _value(logprob) -> float:
    return max(logprob.logprob, LOWEST_LOGPROB)


def chat_logprobs(output, top: int, tokenizer) -> dict:
    """OpenAI's chat ``logprobs``: ``content[]``, one entry per generated token, each with
    its ``top_logprobs`` (the ``top`` likeliest tokens)."""
    content = []
    for token_id, alternatives in zip(output.token_ids, output.logprobs, strict=False):
        ranked = sorted(alternatives.items(), key=lambda item: item[1].rank)[:top]
        token = _token(token_id, alternatives[token_id], tokenizer)
        content.append(
            {
                "token": token,
                "logprob": _value(alternatives[token_id]),
                "bytes": list(token.encode()),
                "top_logprobs": [
                    {
                        "token": (t := _token(i, p, tokenizer)),
                        "logprob": _value(p),
                        "bytes": list(t.encode()),
                    }
                    for i, p in ranked
                ],
            }
        )
    return {"content": content}


def completion_logprobs(output, tokenizer, offset: int = 0) -> dict:
    """OpenAI's completions ``logprobs``: ``tokens``, ``token_logprobs``, ``top_logprobs``
    (token -> logprob, the sampled token among them, as vLLM gives them), ``text_offset``."""
    tokens, values, tops, offsets = [], [], [], []
    for token_id, alternatives in zip(output.token_ids, output.logprobs, strict=False):
        token = _token(token_id, alternatives[token_id], tokenizer)
        tokens.append(token)
        values.append(_value(alternatives[token_id]))
        ranked = sorted(alternatives.items(), key=lambda item: item[1].rank)
        tops.append({_token(i, p, tokenizer): _value(p) for i, p in ranked})
        offsets.append(offset)
        offset += len(token)
    return {
        "text_offset": offsets,
        "token_logprobs": values,
        "tokens": tokens,
        "top_logprobs": tops,
    }


def choices(endpoint: str, body: dict, outputs: list, tokenizer, first: int = 0) -> list[dict]:
    """OpenAI's choices of one prompt's ``outputs`` (vLLM CompletionOutputs, ``n`` of them),
    numbered from ``first``."""
    answered = []
    for j, output in enumerate(outputs):
        logprobs = None
        if endpoint == "chat":
            if body.get("logprobs") and output.logprobs is not None:
                logprobs = chat_logprobs(output, int(body.get("top_logprobs") or 0), tokenizer)
            choice = {"index": first + j, "message": {"role": "assistant", "content": output.text}}
        else:
            if body.get("logprobs") is not None and output.logprobs is not None:
                logprobs = completion_logprobs(output, tokenizer)
            choice = {"index": first + j, "text": output.text}
        answered.append(choice | {"finish_reason": output.finish_reason, "logprobs": logprobs})
    return answered
