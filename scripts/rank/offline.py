"""A rank answered by an engine of its own: vLLM's `LLM` in this process (per-rank engines,
config warm_engines: false), or the echo engine, which returns each prompt as its text.

vLLM is imported only when a rank runs (never by the Snakefile or the tests' imports).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from engine import chat_template, openai_params, vllm_versions
from formats.partial import Answer, Partial
from rank.checks import UsageError, checked_requests
from rank.jsonl import Request, answer_of, embedding_rank, error_answer, sampling_of

# What a request refused here is told (engine/openai_params.py names the server that serves it).
ENGINE = "a per-rank engine (warm_engines: false)"


def echo_answer(request: Request, sampling: dict | None = None) -> Answer:
    """The echo engine: the prompt (or the messages in echo_server's chat rendering) is
    its own answer; one token per word; the request's fields as echo_server answers them."""
    from engine import echo_server

    if request.error:
        return error_answer(request.error)
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


def llm_args(settings: dict, tile_ids: str) -> dict:
    """vllm.LLM's arguments. An engine on several tiles (TILE_IDS "4,5") runs tensor
    parallel over all of them, as ALCF and the seed's author run TP on Aurora."""
    args = {
        "model": settings["model"],
        "dtype": settings["dtype"],
        "enforce_eager": settings["enforce_eager"],
        "gpu_memory_utilization": settings["gpu_memory_utilization"],
    }
    if settings["max_model_len"] is not None:
        args["max_model_len"] = settings["max_model_len"]
    tiles = len([t for t in tile_ids.split(",") if t])
    if tiles > 1:
        args |= {
            "tensor_parallel_size": tiles,
            "distributed_executor_backend": "mp",
            "disable_custom_all_reduce": True,
        }
    # No device=: removed from vLLM (0.10); the platform is detected and the tile is
    # chosen by ZE_AFFINITY_MASK in the environment. No engine seed either: LLM's
    # seed must be an int (default 0); reproducible sampling comes from the
    # per-request SamplingParams(seed=...).
    return args | extra_engine_args(settings["engine_args"])


def extra_engine_args(argv: list[str]) -> dict:
    """Config vllm.engine_args (vLLM command-line flags) as LLM keyword arguments, read
    by vLLM's own parser: the values that differ from its defaults."""
    if not argv:
        return {}
    parser = vllm_versions.engine_args_parser()
    defaults = vars(parser.parse_args(["--model", "m"]))
    given = vars(parser.parse_args(["--model", "m", *argv]))
    return {k: v for k, v in given.items() if k != "model" and v != defaults.get(k)}


def read_chat_template(settings: dict) -> str | None:
    """Config vllm.chat_template's text (None: the model's own template)."""
    path = settings["chat_template"]
    if path is None:
        return None
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"config vllm.chat_template: cannot read {path}: {exc}") from None


def run_vllm(
    requests: list[Request], settings: dict, path: str, partial: Partial, kept: dict
) -> dict:
    """Start one vLLM engine and generate the rank's requests that ``kept`` lacks, all
    in flight together (continuous batching, as LLM.generate and LLM.chat run them),
    each answer kept in ``partial`` as it finishes."""
    # Timed on its own: importing vLLM (and torch) is a large part of a rank's start.
    # `import vllm` alone is lazy; importing LLM pulls in the engine.
    t0 = time.monotonic()
    from vllm import LLM

    import_s = time.monotonic() - t0

    vllm_versions.pin_memory_only_where_it_exists()  # vLLM 0.15 on a CPU
    engine_args = llm_args(settings, os.environ.get("TILE_IDS", ""))
    vllm_versions.without_chunked_prefill_on_cpu(engine_args)  # seeded requests
    embeddings = embedding_rank(requests)
    if embeddings:
        engine_args.setdefault("runner", "pooling")
    t0 = time.monotonic()
    llm = LLM(**engine_args)
    load_s = time.monotonic() - t0
    if embeddings:
        return embed_rank(llm, requests, partial, kept) | {"import_s": import_s, "load_s": load_s}

    tokenizer = llm.get_tokenizer()
    template = read_chat_template(settings)

    def token_ids(request: Request) -> list[int]:
        if request.chat:
            where = f"{path}: line {request.line}"
            try:
                return chat_template.chat_token_ids(tokenizer, request.messages, template, where)
            except chat_template.ChatTemplateError as error:
                raise UsageError(str(error)) from None
        return list(tokenizer.encode(request.prompt))

    answers = dict(kept)
    # refused as read: answered here, never tokenized or sent
    answers |= {i: error_answer(r.error) for i, r in enumerate(requests) if r.error}
    ids = [[] if r.error else token_ids(r) for r in requests]
    refused = {} if settings["bad_requests"] == "error_line" else None
    inputs, truncated = checked_requests(
        requests,
        ids,
        lambda text: tokenizer.encode(text, add_special_tokens=False),
        llm.llm_engine.model_config.max_model_len,
        settings,
        path,
        refused,
    )
    for i, message in (refused or {}).items():
        answers.setdefault(i, error_answer(message))
    engine = llm.llm_engine
    t0 = time.monotonic()
    for i, request in enumerate(requests):
        if i in answers:
            continue
        prompt_ids = inputs[i]["prompt_token_ids"] if isinstance(inputs[i], dict) else ids[i]
        endpoint = "chat" if request.chat else "completions"
        body = sampling_of(request, settings["sampling"]) | request.fields
        try:
            params = openai_params.sampling_params(endpoint, body, ENGINE)
            engine.add_request(str(i), {"prompt_token_ids": prompt_ids}, params)
        except Exception as error:  # vLLM refuses a value: this request's error line
            if not openai_params.is_refusal(error):
                raise
            answers[i] = error_answer(str(error), getattr(error, "param", None))
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.finished:
                i = int(output.request_id)
                request = requests[i]
                endpoint = "chat" if request.chat else "completions"
                body = sampling_of(request, settings["sampling"]) | request.fields
                answer = answer_of(
                    request,
                    openai_params.choices(endpoint, body, list(output.outputs), tokenizer),
                    len(output.prompt_token_ids or ()),
                    sum(len(o.token_ids) for o in output.outputs),
                )
                answers[i] = answer
                partial.add(i, answer)
    generate_s = time.monotonic() - t0
    if len(answers) != len(requests):
        raise RuntimeError(f"vLLM answered {len(answers)} of {len(requests)} requests")
    import torch
    import vllm

    return {
        "versions": {"vllm": vllm.__version__, "torch": torch.__version__},
        "answers": answers,
        "import_s": import_s,
        "load_s": load_s,
        "generate_s": generate_s,
        "truncated": truncated,
    }


def embed_rank(llm, requests: list[Request], partial: Partial, kept: dict) -> dict:
    """A rank of embeddings requests on a pooling engine (vLLM's LLM.embed): every text of
    the requests ``kept`` lacks in one call, each request's vectors in input order."""
    answers = dict(kept)
    answers |= {i: error_answer(r.error) for i, r in enumerate(requests) if r.error}
    todo = [i for i in range(len(requests)) if i not in answers]
    texts = [text for i in todo for text in requests[i].input]
    t0 = time.monotonic()
    outputs = iter(llm.embed(texts, use_tqdm=False) if texts else [])
    for i in todo:
        done = [next(outputs) for _ in requests[i].input]
        answer = Answer(
            "",
            None,
            sum(len(o.prompt_token_ids or ()) for o in done),
            0,
            embeddings=[list(o.outputs.embedding) for o in done],
        )
        answers[i] = answer
        partial.add(i, answer)
    generate_s = time.monotonic() - t0
    import torch
    import vllm

    return {
        "versions": {"vllm": vllm.__version__, "torch": torch.__version__},
        "answers": answers,
        "generate_s": generate_s,
        "truncated": [],
    }
