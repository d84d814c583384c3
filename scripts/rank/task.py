"""One rank of the inference test: read a rank file, generate, write the results.

This is the seed's simple_test.py made robust. It knows nothing of PBS, Snakemake
or tiles: whoever starts it sets the device environment (ZE_AFFINITY_MASK, ...)
and passes everything else on the command line:

    python scripts/rank/task.py --rank 0 --prompts data/0.in --output results/0.out \\
        --record results/records/0.json --settings '{"engine": "vllm", ...}' \\
        [--log logs/infer/0.log]

A rank file is a ``.in`` (one prompt a line) or a ``.jsonl`` of requests
(scripts/rank/jsonl.py: prompts or chat messages, per-request sampling, OpenAI batch
lines). Each answer is kept in ``results/.partial/`` as it finishes, so a rank stopped
mid-way and run again generates only the rest.

Launchers may start it in another folder ($HOME under pbs_tmrsh): give absolute paths.

Settings (JSON object; missing keys take the defaults below, unknown keys are an
error):
    engine                 "vllm" runs the model; "echo" returns each prompt as its
                           generated text (never imports vllm or torch)
    model                  hub id or local folder
    dtype                  vLLM dtype ("auto", "bfloat16", ...)
    max_model_len          int or null (null: the model's own limit)
    enforce_eager          bool
    cpu_kv_cache_gib       number or null: sets VLLM_CPU_KVCACHE_SPACE (GiB) before
                           vllm is imported, unless the environment already sets it
    gpu_memory_utilization number in (0, 1]
    long_prompts           "error" or "truncate" (see check_prompt_lengths)
    chat_template          a chat template file for models without one, or null
    sampling               {temperature, top_p, max_tokens, seed, ignore_eos}

Outputs, both written atomically, the record first and the .out last (so an
existing .out means the rank is complete):
    --record   JSON: rank, prompts, output_tokens, prompt_tokens, load_s, generate_s,
               tokens_per_s, import_s, python_start_s, host, hostname, mask, tiles,
               model, engine, truncated, resumed, written_at (UNIX time of the write)
    --output   .in: one seed record per prompt, in input order:
               Prompt: '...', Generated text: '...'<blank line>
               .jsonl: one answer line per request, in input order

Exit status: 0 success; 2 an expected error (bad settings, unreadable prompt file,
prompt too long with long_prompts "error"), reported as one "ERROR: ..." line on
stderr and nothing written; anything else is a bug and shows a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import math
import os
import queue
import signal
import socket
import sys
import threading
import time
import unicodedata
from pathlib import Path

if __package__ in (None, ""):  # run as a file: scripts/, not this file's folder, on the path
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from engine import vllm_versions
from reporting import console

from rank.jsonl import Answer, Partial, Request, answer_line, is_jsonl, read_rank, sampling_of
from rank.prompts import Prompt, PromptFileError, format_record, write_atomic

DEFAULT_SETTINGS: dict = {
    "engine": "vllm",
    "model": "facebook/opt-125m",
    "dtype": "auto",
    "max_model_len": None,
    "enforce_eager": False,
    "cpu_kv_cache_gib": None,
    "gpu_memory_utilization": 0.9,
    "long_prompts": "error",
    "engine_args": [],
    # A chat template file for models without one (null: the model's own).
    "chat_template": None,
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


# ----------------------------------------------------------------------------- settings


def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def parse_settings(text: str) -> dict:
    """Settings from the --settings JSON, merged over DEFAULT_SETTINGS and checked."""
    try:
        given = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"--settings is not valid JSON: {exc}") from None
    if not isinstance(given, dict):
        raise UsageError("--settings must be a JSON object")
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
    if mml is not None and not (_is_int(mml) and mml > 0):
        raise bad("max_model_len", "a positive integer or null")
    if not isinstance(settings["enforce_eager"], bool):
        raise bad("enforce_eager", "true or false")
    kv = settings["cpu_kv_cache_gib"]
    if kv is not None and not (_is_number(kv) and kv > 0):
        raise bad("cpu_kv_cache_gib", "a positive number or null")
    extra = settings["engine_args"]
    if not isinstance(extra, list) or not all(isinstance(a, str) and a for a in extra):
        raise bad("engine_args", "a list of non-empty strings")
    gmu = settings["gpu_memory_utilization"]
    if not (_is_number(gmu) and 0 < gmu <= 1):
        raise bad("gpu_memory_utilization", "a number in (0, 1]")
    if settings["long_prompts"] not in ("error", "truncate"):
        raise bad("long_prompts", '"error" or "truncate"')
    template = settings["chat_template"]
    if template is not None and not (isinstance(template, str) and template):
        raise bad("chat_template", "a file name or null")
    if not (_is_number(s["temperature"]) and s["temperature"] >= 0):
        raise bad("temperature", "a number >= 0")
    if not (_is_number(s["top_p"]) and 0 < s["top_p"] <= 1):
        raise bad("top_p", "a number in (0, 1]")
    if s["max_tokens"] is not None and not (_is_int(s["max_tokens"]) and s["max_tokens"] > 0):
        raise bad("max_tokens", "a positive integer or null")
    if s["seed"] is not None and not _is_int(s["seed"]):
        raise bad("seed", "an integer or null")
    if not isinstance(s["ignore_eos"], bool):
        raise bad("ignore_eos", "true or false")
    return settings


# ----------------------------------------------------------------------------- helpers


def _warn(message: str) -> None:
    console.say(f"WARNING: {message}")


def process_age_s() -> float | None:
    """Seconds since this process started (Linux /proc), or None if unknown."""
    try:
        with open("/proc/self/stat") as handle:
            stat = handle.read()
        fields = stat[stat.rindex(")") + 2 :].split()
        start_ticks = int(fields[19])  # field 22, starttime, in clock ticks after boot
        started = start_ticks / os.sysconf("SC_CLK_TCK")
        return round(max(0.0, time.clock_gettime(time.CLOCK_BOOTTIME) - started), 3)
    except (OSError, ValueError, IndexError, AttributeError):
        return None


def check_model_folder(settings: dict) -> None:
    """A model given as a path must be there, on this node (e.g. its staged copy):
    otherwise vLLM takes it for a hub id and fails with an unrelated message."""
    model = settings["model"]
    if settings["engine"] != "echo" and model.startswith("/") and not os.path.isdir(model):
        raise UsageError(
            f"model folder {model} does not exist on this node ({socket.gethostname()})"
        )


def prepare_environment(settings: dict) -> None:
    """Environment that must be in place before vllm or torch is imported."""
    tmpdir = os.environ.get("TMPDIR")
    if tmpdir and not os.path.isdir(tmpdir):
        os.makedirs(tmpdir, exist_ok=True)
    kv = settings["cpu_kv_cache_gib"]
    # An empty value counts as unset, as vLLM reads it.
    if kv is not None and not os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
        # vLLM reads a whole number of GiB: round a fraction up.
        os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(math.ceil(kv))


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


# ----------------------------------------------------------------------------- engines

# Requests of one rank in flight at once on a warm engine: each is its own HTTP request
# (so each answer is kept as it comes), and the engine batches all of them.
REQUESTS_IN_FLIGHT = 64


def partial_key(path, settings: dict) -> dict:
    """What a rank's kept answers depend on (jsonl_ranks.Partial): the rank file's bytes
    and the settings that shape answers."""
    from rank.jsonl import file_digest

    shaping = ("engine", "model", "sampling", "chat_template", "long_prompts", "max_model_len")
    return {"input": file_digest(path)} | {k: settings[k] for k in shaping}


def echo_answer(request: Request) -> Answer:
    """The echo engine: the prompt (or the messages in echo_server's chat rendering) is
    its own answer; one token per word."""
    from engine.echo_server import render_chat

    text = render_chat(request.messages) if request.chat else request.prompt
    words = len(text.split())
    return Answer(text, "length", words, words)


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


def chat_token_ids(tokenizer, messages: list, template: str | None, where: str) -> list[int]:
    """``messages`` as the model's chat template (or ``template``) renders them for a
    reply, in token ids: what vLLM's LLM.chat and its chat server do (render to text with
    the generation prompt, then tokenize without adding special tokens again)."""
    try:
        text = tokenizer.apply_chat_template(
            messages, chat_template=template, add_generation_prompt=True, tokenize=False
        )
    except ValueError as exc:  # transformers: no template
        raise UsageError(
            f"{where}: messages need a chat template and the model has none ({exc}); "
            "set config vllm.chat_template to a template file"
        ) from None
    return list(tokenizer.encode(text, add_special_tokens=False))


def run_vllm(
    requests: list[Request], settings: dict, path: str, partial: Partial, kept: dict
) -> dict:
    """Start one vLLM engine and generate the rank's requests that ``kept`` lacks, all
    in flight together (continuous batching, as LLM.generate and LLM.chat run them),
    each answer kept in ``partial`` as it finishes."""
    # Timed on its own: importing vLLM (and torch) is a large part of a rank's start.
    # `import vllm` alone is lazy; importing LLM pulls in the engine.
    t0 = time.monotonic()
    from vllm import LLM, SamplingParams

    import_s = time.monotonic() - t0

    engine_args = llm_args(settings, os.environ.get("TILE_IDS", ""))
    t0 = time.monotonic()
    llm = LLM(**engine_args)
    load_s = time.monotonic() - t0

    tokenizer = llm.get_tokenizer()
    template = read_chat_template(settings)

    def token_ids(request: Request) -> list[int]:
        if request.chat:
            where = f"{path}: line {request.line}"
            return chat_token_ids(tokenizer, request.messages, template, where)
        return list(tokenizer.encode(request.prompt))

    ids = [token_ids(r) for r in requests]
    inputs, truncated = checked_requests(
        requests,
        ids,
        lambda text: tokenizer.encode(text, add_special_tokens=False),
        llm.llm_engine.model_config.max_model_len,
        settings,
        path,
    )
    answers = dict(kept)
    engine = llm.llm_engine
    t0 = time.monotonic()
    for i, request in enumerate(requests):
        if i in answers:
            continue
        prompt_ids = inputs[i]["prompt_token_ids"] if isinstance(inputs[i], dict) else ids[i]
        params = SamplingParams(**sampling_params(sampling_of(request, settings["sampling"])))
        engine.add_request(str(i), {"prompt_token_ids": prompt_ids}, params)
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.finished:
                done = output.outputs[0]
                answer = Answer(
                    done.text,
                    done.finish_reason,
                    len(output.prompt_token_ids or ()),
                    len(done.token_ids),
                )
                answers[int(output.request_id)] = answer
                partial.add(int(output.request_id), answer)
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


def sampling_params(sampling: dict) -> dict:
    """SamplingParams' arguments of one request's sampling fields."""
    keys = ("temperature", "top_p", "max_tokens", "seed", "ignore_eos", "stop")
    return {k: sampling[k] for k in keys if sampling.get(k) is not None}


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
    requests: list[Request], token_ids, content_of, max_model_len, settings: dict, path: str
) -> tuple[list, list[int]]:
    """The engine inputs of a rank's requests and the truncated lines.

    ``.in`` ranks: `checked_inputs` (config long_prompts). JSONL ranks: a request
    longer than its context (its own max_tokens counted) fails the rank naming the line
    and the token count: a chat cut short would no longer be the conversation asked."""
    if not is_jsonl(path):
        prompts = [Prompt(r.prompt, r.line) for r in requests]
        return checked_inputs(prompts, token_ids, content_of, max_model_len, settings, path)
    long = []
    for request, ids in zip(requests, token_ids, strict=True):
        max_tokens = sampling_of(request, settings["sampling"])["max_tokens"]
        limit = _token_limit(max_model_len, max_tokens)
        if limit < 1:
            raise UsageError(
                f"{path}: line {request.line}: max_tokens {max_tokens} leaves no room for a "
                f"request in max_model_len {max_model_len}"
            )
        if len(ids) > limit:
            rule = (
                f"max_tokens {max_tokens} + request tokens must be <= max_model_len {max_model_len}"
                if max_tokens is not None
                else f"request tokens must be < max_model_len {max_model_len}"
            )
            long.append(
                f"line {request.line}: request is {len(ids)} tokens, "
                f"more than the {limit} allowed ({rule})"
            )
    if long:
        more = f"; {len(long) - 1} more too long" if len(long) > 1 else ""
        raise UsageError(f"{path}: {long[0]}{more}")
    return [r.messages if r.chat else r.prompt for r in requests], []


# Special tokens a tokenizer adds to a prompt (BOS, EOS, a leading "▁"), at most.
SPECIAL_TOKENS_BOUND = 16


def token_bound(text: str) -> int:
    """Most tokens any tokenizer vLLM loads can make of ``text``, without asking it.

    Every token covers at least one byte of the text as the model sees it (byte-level
    BPE: GPT-2, OPT, Llama 3, Qwen) or one character of it (SentencePiece, WordPiece;
    byte fallback spends at most a character's bytes). What the model sees is the text
    after its normalizer: Unicode compatibility forms (NFKC can turn one character into
    18), lower case (at most 1.5x the bytes), SentencePiece's space-to-"▁" (a 1-byte
    space becomes 3 bytes, still one character). So: 3x the larger of the NFKC and NFKD
    byte counts, plus the special tokens. tests/test_infer.py checks it against the real
    tokenizers of the local models on hostile texts."""
    size = max(len(unicodedata.normalize(form, text).encode()) for form in ("NFKC", "NFKD"))
    return 3 * size + SPECIAL_TOKENS_BOUND


# Each engine's context length, from its first /tokenize answer (one model per run).
_MAX_MODEL_LEN: dict[str, int] = {}


def surely_fit(requests: list[Request], settings: dict, url: str) -> bool:
    """Every request is a prompt (not a chat) that fits the engine's context with its
    whole generation even at ``token_bound`` tokens: nothing to check, so no /tokenize
    (seed-sized ranks: half of their requests)."""
    max_model_len = _MAX_MODEL_LEN.get(url)
    if not max_model_len:
        return False
    return all(
        not r.chat
        and token_bound(r.prompt)
        <= _token_limit(max_model_len, sampling_of(r, settings["sampling"])["max_tokens"])
        for r in requests
    )


def engine_inputs(
    requests: list[Request], settings: dict, path: str, url: str, key: str | None = None
) -> tuple:
    """The requests' engine inputs and the truncated lines, checked as `run_vllm` checks
    them with the engine's own tokenizer (/tokenize, which also tells the context
    length, and renders chats with the engine's template): the server alone would cut a
    generation short silently. Prompts that `surely_fit` need no check."""
    from engine import client

    if surely_fit(requests, settings, url):
        return [r.prompt for r in requests], []
    answers = [
        client.tokenize_messages(url, r.messages, key=key)
        if r.chat
        else client.tokenize(url, r.prompt, key=key)
        for r in requests
    ]
    token_ids = [answer.ids for answer in answers]
    if answers and answers[0].max_model_len:
        _MAX_MODEL_LEN[url] = answers[0].max_model_len
    inputs, truncated = checked_requests(
        requests,
        token_ids,
        lambda text: client.tokenize(url, text, add_special_tokens=False, key=key).ids,
        answers[0].max_model_len if answers else 0,
        settings,
        path,
    )
    # a truncated prompt goes as its kept token ids
    inputs = [x["prompt_token_ids"] if isinstance(x, dict) else x for x in inputs]
    return inputs, truncated


class _Senders:
    """Daemon threads that carry the requests of every rank in this process, kept between
    ranks: starting a thread per request cost a seed-sized rank more CPU than its HTTP.
    A task never waits for a busy thread (a new one starts when none is idle), so there
    are as many threads as requests were ever in flight at once; being daemons, they
    never hold up the end of the process (Ctrl-C of Snakemake)."""

    def __init__(self):
        self._tasks: queue.SimpleQueue = queue.SimpleQueue()
        self._idle = 0
        self._lock = threading.Lock()

    def submit(self, task) -> None:
        with self._lock:
            start = self._idle == 0
            if not start:
                self._idle -= 1  # that idle thread takes this task
        if start:
            threading.Thread(target=self._work, name="request", daemon=True).start()
        self._tasks.put(task)

    def _work(self) -> None:
        while True:
            self._tasks.get()()
            with self._lock:
                self._idle += 1


_SENDERS = _Senders()


def send_requests(engine, requests, inputs, todo, settings, partial, answers, timeout) -> float:
    """Send the requests ``todo`` (indices) to ``engine``, REQUESTS_IN_FLIGHT at a time
    (this thread and the shared senders); keep each answer in ``answers`` and
    ``partial`` as it comes; return the seconds. The first failure stops the sending
    and is raised once the requests in flight end (their answers are kept)."""
    from engine import client

    lock = threading.Lock()
    pending = iter(todo)
    errors: list[BaseException] = []

    def send(i: int) -> None:
        request, given = requests[i], inputs[i]
        reply = client.complete_one(
            engine.url,
            sampling_of(request, settings["sampling"]),
            prompt=None if request.chat else given,
            messages=given if request.chat else None,
            timeout=timeout,
            key=engine.api_key,
        )
        answer = Answer(
            reply.text, reply.finish_reason, reply.prompt_tokens, reply.completion_tokens
        )
        with lock:
            answers[i] = answer
            partial.add(i, answer)

    def work() -> None:
        while True:
            with lock:
                i = None if errors else next(pending, None)
            if i is None:
                return
            try:
                send(i)
            except BaseException as error:
                with lock:
                    errors.append(error)

    started = time.monotonic()
    helpers = max(0, min(REQUESTS_IN_FLIGHT, len(todo)) - 1)
    finished = threading.Semaphore(0)

    def helper() -> None:
        try:
            work()
        finally:
            finished.release()

    for _ in range(helpers):
        _SENDERS.submit(helper)
    work()
    for _ in range(helpers):
        finished.acquire()
    if errors:
        # an engine that is gone first: the rank goes to another engine for the rest
        errors.sort(key=lambda e: not isinstance(e, client.EngineUnavailable))
        raise errors[0]
    return time.monotonic() - started


def serve_rank(
    rank: int,
    settings: dict,
    prompts_path,
    output,
    record_path,
    pool,
    retries: int = 1,
    request_timeout: float = 600.0,
    versions: dict | None = None,
) -> str:
    """One rank on a warm engine of ``pool`` (serve.RegistryPool): read the requests,
    wait for a free engine, send them (one HTTP request each, many in flight), keep
    each answer as it comes, write the outputs; return the lines for the rank's log
    (a warning for an empty rank file, the summary).

    Answers kept by an earlier attempt at this rank (killed, or its engine died) are
    not asked again. An engine found dead before the rank's requests is marked (the
    pool restarts it) and the rank goes to another one. An engine that fails during
    the requests is marked too, and the requests still unanswered are sent to a
    healthy engine, at most ``retries`` times (a death is not the rank's fault); after
    that the rank fails, naming the logs of the engines it failed on. The echo engine
    is an engine of the pool too (scripts/engine/echo_server.py).
    """
    from engine import client, lifecycle

    started = time.monotonic()
    requests = read_rank(prompts_path)
    placement, wait_s, died_on = {}, 0.0, []
    if not requests:
        result = run_echo(requests)
    else:
        partial = Partial(output, partial_key(prompts_path, settings))
        answers = partial.load()
        resumed = len(answers)
        partial.open(answers)
        unanswered, request_s, truncated = 0, 0.0, []
        try:
            while len(answers) < len(requests):
                with pool.route() as engine:
                    wait_s = time.monotonic() - started
                    try:
                        inputs, truncated = engine_inputs(
                            requests, settings, str(prompts_path), engine.url, engine.api_key
                        )
                    except client.EngineUnavailable as error:
                        pool.mark_failed(engine)
                        unanswered += 1
                        if unanswered == 3:
                            raise client.EngineError(
                                f"no engine answered ({error}); last tried {engine.name}, "
                                f"its log: {engine.log_path}"
                            ) from error
                        continue
                    todo = [i for i in range(len(requests)) if i not in answers]
                    try:
                        request_s += send_requests(
                            engine,
                            requests,
                            inputs,
                            todo,
                            settings,
                            partial,
                            answers,
                            request_timeout,
                        )
                    except client.EngineUnavailable as error:
                        pool.mark_failed(engine)
                        died_on.append(engine)
                        if len(died_on) > retries:
                            logs = ", ".join(dict.fromkeys(str(e.log_path) for e in died_on))
                            raise client.EngineError(
                                f"engine {engine.name} failed during the requests ({error}); "
                                f"the rank failed on {len(died_on)} engine(s) in a row "
                                f"(config warm.retry_after_engine_death {retries}); "
                                f"engine log(s): {logs}"
                            ) from error
                        continue
                    log = str(engine.log_path)
                    placement = engine.env | {"ENGINE": engine.name, "ENGINE_LOG": log}
        finally:
            partial.close()
        result = {
            "answers": answers,
            "import_s": 0.0,
            "generate_s": request_s,
            "truncated": truncated,
            "versions": versions or {},
            "resumed": resumed,
        }
    result["load_s"] = wait_s
    record = build_record(rank, settings, requests, result, None, placement)
    record |= {
        "engine_name": placement.get("ENGINE", ""),
        "engine_log": placement.get("ENGINE_LOG", ""),
        # one process serves all ranks of a run or submission: no interpreter per rank
        "client_pid": os.getpid(),
        # in a PBS submission: the node whose Snakemake served it (its engine's node)
        "client_node": os.environ.get(lifecycle.NODE_VARIABLE, ""),
        "wait_s": round(wait_s, 6),
        "request_s": round(result["generate_s"], 6),
        # engines that died during this rank's requests
        "engine_deaths": [e.name for e in died_on],
    }
    summary = write_outputs(prompts_path, requests, result, record, output, record_path)
    return f"WARNING: {prompts_path} has no prompts\n{summary}" if not requests else summary


# ----------------------------------------------------------------------------- main


def build_record(
    rank: int, settings: dict, requests: list[Request], result: dict, started, placement=None
) -> dict:
    """The rank's record; ``placement``: the engine's environment (default: this one).

    Both kinds of rank count alike: "prompts" is the number of requests (prompts of a
    ``.in``, lines of a ``.jsonl``), the tokens are the engine's counts."""
    generate_s = result["generate_s"]
    answers = result["answers"].values()
    tokens = sum(a.output_tokens for a in answers)
    hostname = socket.gethostname()
    placement = os.environ if placement is None else placement
    return {
        "rank": rank,
        "prompts": len(requests),
        "output_tokens": tokens,
        "prompt_tokens": sum(a.prompt_tokens for a in answers),
        "load_s": round(result["load_s"], 6),
        "generate_s": round(generate_s, 6),
        "tokens_per_s": round(tokens / generate_s, 1) if generate_s > 0 and tokens else 0.0,
        "import_s": round(result["import_s"], 6),
        "python_start_s": started,
        "host": placement.get("TILE_HOST") or hostname,
        "hostname": hostname,
        "mask": placement.get("ZE_AFFINITY_MASK", ""),
        "tiles": placement.get("TILE_IDS", ""),
        "model": settings["model"],
        "engine": settings["engine"],
        "truncated": result["truncated"],
        # answers kept from an earlier, stopped attempt at this rank (not generated again)
        "resumed": result.get("resumed", 0),
        # vLLM, torch, IPEX: what generated it (warm engines: rule fetch_model's marker)
        "versions": result.get("versions", {}),
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="One rank of the inference test.")
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument(
        "--prompts", required=True, help="rank file: .in (one prompt a line) or .jsonl"
    )
    parser.add_argument("--output", required=True, help="results (.out or .jsonl)")
    parser.add_argument("--record", required=True, help="JSON record of the run")
    parser.add_argument("--settings", default="{}", help="JSON object (see module doc)")
    parser.add_argument(
        "--log",
        help="append stdout and stderr (also the engine's) to this file: launchers such "
        "as pbs_tmrsh send a command's output elsewhere",
    )
    return parser.parse_args(argv)


def log_to(path: str) -> None:
    """Send this process's stdout and stderr, and its children's, to ``path``."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


def main(argv: list[str] | None = None) -> int:
    # Seconds from process start to here: interpreter start plus module imports.
    started = process_age_s()
    args = parse_args(argv)
    if args.log:
        log_to(args.log)
    try:
        settings = parse_settings(args.settings)
        check_model_folder(settings)
        requests = read_rank(args.prompts)  # file errors come before any engine start
        prepare_environment(settings)
        if not requests or settings["engine"] == "echo":
            if not requests:
                _warn(f"{args.prompts} has no prompts")
            result = run_echo(requests)
        else:
            partial = Partial(args.output, partial_key(args.prompts, settings))
            kept = partial.load()
            partial.open(kept)
            try:
                result = run_vllm(requests, settings, args.prompts, partial, kept)
            finally:
                partial.close()
            result["resumed"] = len(kept)
    except (UsageError, PromptFileError) as exc:
        print(f"ERROR: {exc}", file=sys.stderr, flush=True)
        return 2

    record = build_record(args.rank, settings, requests, result, started)
    summary = write_outputs(args.prompts, requests, result, record, args.output, args.record)
    print(summary, file=sys.stderr)
    return 0


def output_text(rank_file, requests: list[Request], answers: dict, rank: int, model: str) -> str:
    """The rank's output: seed records for a ``.in``, answer lines for a ``.jsonl``."""
    ordered = [answers[i] for i in range(len(requests))]
    if not is_jsonl(rank_file):
        return "".join(
            format_record(r.prompt, a.text) for r, a in zip(requests, ordered, strict=True)
        )
    from rank.jsonl import file_digest

    digest = file_digest(rank_file)
    return "".join(
        answer_line(r, a, rank, digest, model) for r, a in zip(requests, ordered, strict=True)
    )


def write_outputs(
    rank_file, requests: list[Request], result: dict, record: dict, output, record_path
) -> str:
    """Write the record, then the output (both atomically), then drop the rank's partial
    answers; return the one-line summary."""
    text = output_text(rank_file, requests, result["answers"], record["rank"], record["model"])
    for target in (record_path, output):
        Path(target).parent.mkdir(parents=True, exist_ok=True)
    # When the rank finished: the files' mtimes do not keep it (Snakemake touches
    # outputs when it checks them, in a PBS submission only at its end).
    record["written_at"] = round(time.time(), 6)
    # Proves the output whole after a kill (ranks.forget_finished_incomplete).
    record["out_sha256"] = hashlib.sha256(text.encode()).hexdigest()
    # Record first, output last: the output existing means the rank finished.
    write_atomic(record_path, json.dumps(record, indent=2) + "\n")
    write_atomic(output, text)
    Partial(output, {}).remove()
    r = record
    return (
        f"rank {r['rank']}: {r['prompts']} prompts, {r['output_tokens']} tokens, "
        f"load {r['load_s']:.2f} s, generate {r['generate_s']:.2f} s, "
        f"{r['tokens_per_s']:.1f} tok/s, host {r['host']}, mask {r['mask'] or '-'}"
        + (f", {r['resumed']} answers kept from a stopped attempt" if r["resumed"] else "")
    )


def end_now(code: int) -> None:
    """Exit at once, without vLLM's teardown (seconds): Snakemake records a rank as
    finished only when this process is gone, and a kill between the last write and
    that moment would make a rerun redo a rank whose outputs are whole.

    Child processes (vLLM's EngineCore with multiprocessing) get SIGTERM, their own
    clean shutdown; they hold the tile's lock until they are gone (tiles.run_placed).
    """
    from engine import watchdog  # stdlib only

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    for child in watchdog.live_processes(watchdog.PPID, os.getpid()):
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signal.SIGTERM)
    os._exit(code)


if __name__ == "__main__":
    # Its Snakemake is gone (tiles.end_with_parent) or the run is stopped: end now,
    # with the engine's processes, writing nothing more.
    signal.signal(signal.SIGTERM, lambda *_: end_now(128 + signal.SIGTERM))
    end_now(main())
