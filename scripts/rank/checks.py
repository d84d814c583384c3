"""What a rank's task checks before it generates: its settings, its model folder, and its
prompts against the engine's context (config vllm.long_prompts).

Shared by the ways a rank is answered (rank/offline.py, rank/warm.py, rank/echo.py); no vLLM
import.
"""

from __future__ import annotations

import json
import os
import socket

import console
from rank.jsonl import Request, is_int, is_jsonl, is_number, sampling_of
from rank.prompts import Prompt

DEFAULT_SETTINGS: dict = {
    "engine": "vllm",
    "model": "facebook/opt-125m",
    "dtype": "auto",
    "max_model_len": None,
    "enforce_eager": False,
    "cpu_kv_cache_gib": None,
    "gpu_memory_utilization": 0.9,
    "long_prompts": "error",
    # A JSONL request the engine refuses: "error_line" answers it with OpenAI's batch
    # error line and the rank goes on; "fail_rank" fails the rank (config vllm.bad_requests)
    "bad_requests": "error_line",
    # Embedding ranks: vectors in <rank>.npy beside the JSONL (config vllm.embeddings_npy)
    "embeddings_npy": False,
    "engine_args": [],
    # A chat template file for models without one (null: the model's own).
    "chat_template": None,
    # The names the engines answer to (null: every name, no check; rank_job gives the run's)
    "served_model_name": None,
    # The seed's SamplingParams(temperature=0.8, top_p=0.95) with vLLM's max_tokens 16.
    "sampling": {
        "temperature": 0.8,
        "top_p": 0.95,
        "max_tokens": 16,
        "seed": None,
        "ignore_eos": False,
    },
}


class UsageError(Exception):
    """An expected error: reported as one line, exit status 2."""


def parse_settings(text: str) -> dict:
    """Settings from the --settings JSON, merged over DEFAULT_SETTINGS and checked."""
    try:
        given = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"--settings is not valid JSON: {exc}") from None
    if not isinstance(given, dict):
        raise UsageError("--settings must be a JSON object")
    return checked_settings(given)


def checked_settings(given: dict) -> dict:
    """``given`` merged over DEFAULT_SETTINGS and checked: the settings of a rank's task,
    whether they came on its command line (parse_settings) or from the rule in-process."""
    unknown = sorted(set(given) - set(DEFAULT_SETTINGS))
    if unknown:
        raise UsageError(f"--settings: unknown keys {unknown}")
    settings = {**DEFAULT_SETTINGS, **given}
    sampling = given.get("sampling") or {}
    if not isinstance(sampling, dict):
        raise UsageError("--settings: sampling must be an object")
    unknown = sorted(set(sampling) - set(DEFAULT_SETTINGS["sampling"]))
    if unknown:
        raise UsageError(f"--settings: unknown sampling keys {unknown}")
    settings["sampling"] = {**DEFAULT_SETTINGS["sampling"], **sampling}
    s = settings["sampling"]

    def bad(key, expected):
        value = settings.get(key, s.get(key))
        return UsageError(f"--settings: {key} must be {expected}, not {value!r}")

    if settings["engine"] not in ("vllm", "echo"):
        raise bad("engine", '"vllm" or "echo"')
    if not isinstance(settings["model"], str) or not settings["model"]:
        raise bad("model", "a non-empty string")
    if not isinstance(settings["dtype"], str):
        raise bad("dtype", "a string")
    mml = settings["max_model_len"]
    if mml is not None and not (is_int(mml) and mml > 0):
        raise bad("max_model_len", "a positive integer or null")
    if not isinstance(settings["enforce_eager"], bool):
        raise bad("enforce_eager", "true or false")
    kv = settings["cpu_kv_cache_gib"]
    if kv is not None and not (is_number(kv) and kv > 0):
        raise bad("cpu_kv_cache_gib", "a positive number or null")
    extra = settings["engine_args"]
    if not isinstance(extra, list) or not all(isinstance(a, str) and a for a in extra):
        raise bad("engine_args", "a list of non-empty strings")
    gmu = settings["gpu_memory_utilization"]
    if not (is_number(gmu) and 0 < gmu <= 1):
        raise bad("gpu_memory_utilization", "a number in (0, 1]")
    if settings["long_prompts"] not in ("error", "truncate"):
        raise bad("long_prompts", '"error" or "truncate"')
    if settings["bad_requests"] not in ("error_line", "fail_rank"):
        raise bad("bad_requests", '"error_line" or "fail_rank"')
    if not isinstance(settings["embeddings_npy"], bool):
        raise bad("embeddings_npy", "true or false")
    template = settings["chat_template"]
    if template is not None and not (isinstance(template, str) and template):
        raise bad("chat_template", "a file name or null")
    if not (is_number(s["temperature"]) and s["temperature"] >= 0):
        raise bad("temperature", "a number >= 0")
    if not (is_number(s["top_p"]) and 0 < s["top_p"] <= 1):
        raise bad("top_p", "a number in (0, 1]")
    if s["max_tokens"] is not None and not (is_int(s["max_tokens"]) and s["max_tokens"] > 0):
        raise bad("max_tokens", "a positive integer or null")
    if s["seed"] is not None and not is_int(s["seed"]):
        raise bad("seed", "an integer or null")
    if not isinstance(s["ignore_eos"], bool):
        raise bad("ignore_eos", "true or false")
    return settings


def _warn(message: str) -> None:
    console.say(f"WARNING: {message}")


def check_model_folder(settings: dict) -> None:
    """A model given as a path must be there, on this node (e.g. its staged copy):
    otherwise vLLM takes it for a hub id and fails with an unrelated message."""
    model = settings["model"]
    if settings["engine"] != "echo" and model.startswith("/") and not os.path.isdir(model):
        raise UsageError(
            f"model folder {model} does not exist on this node ({socket.gethostname()})"
        )


def _token_limit(max_model_len: int, max_tokens: int | None) -> int:
    """Most prompt tokens allowed.

    Rule: a prompt must leave room for the whole generation, i.e.
    prompt_tokens + max_tokens <= max_model_len (special tokens such as OPT's BOS
    count as prompt tokens, as vLLM counts them). Without max_tokens, vLLM's own
    rule applies: prompt_tokens < max_model_len (at least one token to generate).
    vLLM alone would reject only prompt_tokens >= max_model_len and silently cut
    the generation short for prompts between the two limits.
    """
    if max_tokens is None:
        return max_model_len - 1
    return max_model_len - max_tokens


def check_prompt_lengths(
    prompts: list[Prompt],
    token_ids: list[list[int]],
    content_ids: list[list[int]] | None,
    *,
    max_model_len: int,
    max_tokens: int | None,
    mode: str,
    path: str,
) -> tuple[list, list[int]]:
    """Engine inputs for the prompts, and the line numbers of truncated prompts.

    ``token_ids[i]`` is prompt i as the engine tokenizes it (with special tokens);
    ``content_ids[i]`` the same without special tokens (needed for "truncate").
    Mode "error" raises UsageError naming the file, the line and the token count
    of the first prompt over the limit. Mode "truncate" keeps the prompt's
    leading special tokens and the LAST content tokens that fit.
    """
    limit = _token_limit(max_model_len, max_tokens)
    if limit < 1:
        raise UsageError(
            f"max_tokens {max_tokens} leaves no room for a prompt in max_model_len {max_model_len}"
        )
    long = [i for i, ids in enumerate(token_ids) if len(ids) > limit]
    inputs: list = [p.text for p in prompts]
    if not long:
        return inputs, []
    rule = (
        f"max_tokens {max_tokens} + prompt tokens must be <= max_model_len {max_model_len}"
        if max_tokens is not None
        else f"prompt tokens must be < max_model_len {max_model_len}"
    )
    if mode == "error":
        first = long[0]
        others = ""
        if len(long) > 1:
            lines = ", ".join(str(prompts[i].line) for i in long[1:6])
            more = ", ..." if len(long) > 6 else ""
            others = f"; {len(long) - 1} more too long (lines {lines}{more})"
        raise UsageError(
            f"{path}: line {prompts[first].line}: prompt is {len(token_ids[first])} tokens, "
            f"more than the {limit} allowed ({rule}){others}; "
            'set long_prompts to "truncate" to keep the last tokens'
        )
    assert content_ids is not None
    for i in long:
        ids, content = token_ids[i], content_ids[i]
        n_special = len(ids) - len(content)
        if n_special >= 0 and ids[n_special:] == content:
            prefix = ids[:n_special]  # special tokens the tokenizer puts in front (BOS)
        else:  # special tokens elsewhere: keep the tail of the full sequence
            prefix, content = [], ids
        kept = prefix + content[len(content) - (limit - len(prefix)) :]
        inputs[i] = {"prompt_token_ids": kept}
        _warn(
            f"{path}: line {prompts[i].line}: prompt is {len(ids)} tokens, more than the "
            f"{limit} allowed ({rule}); kept its last {len(kept)} tokens"
        )
    return inputs, [prompts[i].line for i in long]


def checked_inputs(
    prompts: list[Prompt], token_ids, content_of, max_model_len, settings: dict, path: str
):
    """`check_prompt_lengths` for ``token_ids`` (the prompts as the engine tokenizes
    them); ``content_of(text)``: the ids without special tokens, for "truncate"."""
    content_ids = None
    if settings["long_prompts"] == "truncate":
        content_ids = [content_of(p.text) for p in prompts]
    return check_prompt_lengths(
        prompts,
        token_ids,
        content_ids,
        max_model_len=max_model_len,
        max_tokens=settings["sampling"]["max_tokens"],
        mode=settings["long_prompts"],
        path=path,
    )


def checked_requests(
    requests: list[Request],
    token_ids,
    content_of,
    max_model_len,
    settings: dict,
    path: str,
    refused: dict | None = None,
) -> tuple[list, list[int]]:
    """The engine inputs of a rank's requests and the truncated lines.

    ``.in`` ranks: `checked_inputs` (config long_prompts). JSONL ranks: a request
    longer than its context (its own max_tokens counted) is never cut (a chat cut short
    would no longer be the conversation asked): with ``refused`` (a dict) it is refused,
    request index -> message (its error line); without, it fails the rank naming the line
    and the token count."""
    if not is_jsonl(path):
        prompts = [Prompt(r.prompt, r.line) for r in requests]
        return checked_inputs(prompts, token_ids, content_of, max_model_len, settings, path)
    long = []
    for index, (request, ids) in enumerate(zip(requests, token_ids, strict=True)):
        max_tokens = sampling_of(request, settings["sampling"])["max_tokens"]
        message = length_problem(len(ids), max_tokens, max_model_len)
        if message is None:
            continue
        if refused is not None:
            refused[index] = message
        elif _token_limit(max_model_len, max_tokens) < 1:
            raise UsageError(f"{path}: line {request.line}: {message}")
        else:
            long.append(f"line {request.line}: {message}")
    if long:
        more = f"; {len(long) - 1} more too long" if len(long) > 1 else ""
        raise UsageError(f"{path}: {long[0]}{more}")
    return [r.messages if r.chat else r.prompt for r in requests], []


def length_problem(tokens: int | None, max_tokens: int | None, max_model_len: int) -> str | None:
    """Why a JSONL request of ``tokens`` prompt tokens (None: not known yet) does not fit
    ``max_model_len`` with its whole generation (`_token_limit`), or None. vLLM's front end
    would cut such a generation short without a word (0.32 lowers max_tokens to fit)."""
    limit = _token_limit(max_model_len, max_tokens)
    if limit < 1:
        return (
            f"max_tokens {max_tokens} leaves no room for a request in max_model_len {max_model_len}"
        )
    if tokens is None or tokens <= limit:
        return None
    rule = (
        f"max_tokens {max_tokens} + request tokens must be <= max_model_len {max_model_len}"
        if max_tokens is not None
        else f"request tokens must be < max_model_len {max_model_len}"
    )
    return f"request is {tokens} tokens, more than the {limit} allowed ({rule})"


def fail_on_refused(requests: list[Request], answers: dict, settings: dict, path) -> None:
    """With config vllm.bad_requests "fail_rank": a refused request (read as refused, or
    refused by the engine: its answer has an error) fails the rank, naming the first by
    file and line."""
    if settings["bad_requests"] != "fail_rank":
        return
    refused = [
        (r.line, r.error if r.error else answers[i].error["message"])
        for i, r in enumerate(requests)
        if r.error or (i in answers and answers[i].error is not None)
    ]
    if refused:
        line, message = refused[0]
        more = f"; {len(refused) - 1} more refused" if len(refused) > 1 else ""
        raise UsageError(
            f"{path}: line {line}: request refused: {message}{more} "
            '(config vllm.bad_requests is "fail_rank")'
        )


def refused_requests(requests: list[Request], answers: dict, path, first: int = 5) -> dict:
    """The rank record's count of refused requests and the first few by file and line."""
    lines = [
        {"file": str(path), "line": r.line, "message": answers[i].error["message"]}
        for i, r in enumerate(requests)
        if i in answers and answers[i].error is not None
    ]
    return {"request_errors": len(lines), "request_error_lines": lines[:first]}
