"""A rank answered by warm engines: its requests sent to the engines of the run's pool,
many in flight, each answer kept as it arrives (results/.partial/), then the rank's
outputs and record written (the rank job calls `serve_rank` in Snakemake's thread).

The HTTP side is engine/client.py; which engine serves is engine/routing.py's choice.
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
import time
import unicodedata

from formats.partial import Answer
from rank.answer_files import finish_rank
from rank.checks import (
    UsageError,
    _token_limit,
    checked_requests,
    fail_on_refused,
    length_problem,
)
from rank.echo import run_echo
from rank.jsonl import (
    Request,
    answer_of,
    embedding_rank,
    error_answer,
    is_jsonl,
    read_rank,
    refused_answer,
    sampling_of,
    with_served_models,
)

# Requests of one rank in flight at once on a warm engine: each is its own HTTP request
# (so each answer is kept as it comes), and the engine batches all of them.
REQUESTS_IN_FLIGHT = 64
# Embedding requests go EMBED_TEXTS texts to a call: one HTTP request per short text cost
# more than embedding it (20,480 one-text lines, benchmarks/batch_fields.py: 74 s one
# call a line, 31 s in calls of 64). A per-rank engine embedding 10,240 texts in calls of
# 64, 256 and 1,024 spent 6.8, 5.7-6.1 and 6.3 s (2026-12-07, vLLM 0.32's front end in
# the task's process). vLLM's front end tells only a call's total tokens;
# our servers tell each text's (/token_counts), so the usage splits back per request.
# vLLM's own server does not, and gets one call per request (_ONE_CALL_EACH).
EMBED_TEXTS = 256
_ONE_CALL_EACH: set[str] = set()  # engine URLs


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
        r.error is not None
        or (
            not r.chat
            and token_bound(r.prompt)
            <= _token_limit(max_model_len, sampling_of(r, settings["sampling"])["max_tokens"])
        )
        for r in requests
    )


def engine_inputs(
    requests: list[Request],
    settings: dict,
    path: str,
    url: str,
    key: str | None = None,
    refused: dict | None = None,
) -> tuple:
    """The requests' engine inputs, the truncated lines, and the context length their
    answers are to be checked against (`send_requests`; None: checked here already).

    ``.in`` ranks are checked as `run_vllm` checks them, with the engine's own tokenizer
    (/tokenize, which also tells the context length): the server alone would cut a
    generation short silently. Prompts that `surely_fit` need no check. JSONL ranks with
    ``refused`` (a dict: their error lines, index -> message) are not tokenized: each
    answer's own prompt tokens tell whether it fitted (a chat rendered once, not twice);
    a request with no room at all goes to ``refused`` unsent. Without ``refused``
    (vllm.bad_requests "fail_rank") a request too long fails the rank before any is sent."""
    from engine import client

    if embedding_rank(requests):  # the engine checks their length
        return [r.input for r in requests], [], None
    if surely_fit(requests, settings, url):
        return [r.prompt for r in requests], [], None
    if refused is not None and is_jsonl(path):
        context = _MAX_MODEL_LEN.get(url) or client.tokenize(url, "a", key=key).max_model_len
        _MAX_MODEL_LEN[url] = context
        _check_chat_template(url, requests, path, key)
        for i, r in enumerate(requests):
            max_tokens = sampling_of(r, settings["sampling"])["max_tokens"]
            problem = None if r.error else length_problem(None, max_tokens, context)
            if problem:
                refused[i] = problem
        return [r.messages if r.chat else r.prompt for r in requests], [], context
    # a request refused as read is never sent: no tokens to count
    answers = [None if r.error else _tokens(url, r, path, key) for r in requests]
    token_ids = [answer.ids if answer else [] for answer in answers]
    max_model_len = next((a.max_model_len for a in answers if a and a.max_model_len), None)
    if max_model_len:
        _MAX_MODEL_LEN[url] = max_model_len
    inputs, truncated = checked_requests(
        requests,
        token_ids,
        lambda text: client.tokenize(url, text, add_special_tokens=False, key=key).ids,
        max_model_len or 0,
        settings,
        path,
        refused,
    )
    # a truncated prompt goes as its kept token ids
    inputs = [x["prompt_token_ids"] if isinstance(x, dict) else x for x in inputs]
    return inputs, truncated, None


# Engines (URLs) seen to render a chat: their model has a chat template.
_RENDERS_CHATS: set[str] = set()


def _check_chat_template(url: str, requests: list[Request], path: str, key: str | None) -> None:
    """A rank's first chat tokenized once per engine (`_tokens`): a model without a chat
    template fails the rank at once, naming the config key, not with an error line each."""
    chat = next((r for r in requests if r.chat and not r.error), None)
    if chat is None or url in _RENDERS_CHATS:
        return
    from engine import client

    try:
        _tokens(url, chat, path, key)
    except client.RequestRejected:
        return  # that line's own fault: its answer says why
    _RENDERS_CHATS.add(url)


def _tokens(url: str, request: Request, path: str, key: str | None):
    """The engine's tokens of a request's prompt or rendered messages (/tokenize). A model
    without a chat template fails the rank, naming the config key that gives one: every
    chat line of it would be an error line."""
    from engine import client

    if not request.chat:
        return client.tokenize(url, request.prompt, key=key)
    try:
        return client.tokenize_messages(url, request.messages, key=key)
    except client.RequestRejected as error:
        if "chat template" not in error.message:
            raise
        raise UsageError(
            f"{path}: line {request.line}: messages need a chat template and the model has "
            f"none ({error.message}); set config vllm.chat_template to a template file"
        ) from None


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


def embedding_calls(requests: list[Request], todo) -> list[list[int]]:
    """The embedding requests ``todo`` (indices) in calls of at most EMBED_TEXTS texts (a
    request with more texts, with fields of its own, or for score or rerank is a call of
    its own)."""
    calls: list[list[int]] = []
    texts = EMBED_TEXTS
    for i in todo:
        if not requests[i].embedding or requests[i].fields:  # a call of its own
            calls.append([i])
            texts = EMBED_TEXTS
            continue
        count = len(requests[i].input)
        if texts + count > EMBED_TEXTS:
            calls.append([])
            texts = 0
        calls[-1].append(i)
        texts += count
    return calls


def send_requests(
    engine, requests, inputs, todo, settings, partial, answers, timeout, context=None
) -> float:
    """Send the requests ``todo`` (indices) to ``engine``, REQUESTS_IN_FLIGHT at a time
    (this thread and the shared senders); keep each answer in ``answers`` and
    ``partial`` as it comes; return the seconds. The first failure stops the sending
    and is raised once the requests in flight end (their answers are kept). With a
    ``context`` (engine_inputs'), an answer whose prompt did not fit it with its whole
    generation is kept as that request's error line instead."""
    from engine import client, kv_window

    lock = threading.Lock()
    pending = iter(embedding_calls(requests, todo) if embedding_rank(requests) else todo)
    errors: list[BaseException] = []

    def keep(i: int, answer: Answer) -> None:
        with lock:
            answers[i] = answer
            partial.add(i, answer)

    def embed_together(calls: list[int]) -> None:
        """Several embedding requests in one call, their vectors and tokens split back by
        each text's tokens (/token_counts; they must add up to the engine's total); one
        call each when a text is refused or the engine tells no counts."""
        texts = [text for i in calls for text in inputs[i]]
        counts = client.token_counts(engine.url, texts, timeout, engine.api_key)
        try:
            done = (
                None if counts is None else client.embed(engine.url, texts, timeout, engine.api_key)
            )
        except client.RequestRejected:
            done = None
        if done is None or sum(counts) != done.prompt_tokens:
            if counts is None or done is not None:  # no counts, or counts that do not add up
                _ONE_CALL_EACH.add(engine.url)
            for i in calls:
                send(i)
            return
        at = 0
        for i in calls:
            n = len(inputs[i])
            tokens = sum(counts[at : at + n])
            keep(i, Answer("", None, tokens, 0, embeddings=done.vectors[at : at + n]))
            at += n

    def send(i: int | list[int]) -> None:
        if isinstance(i, list):  # embedding requests, EMBED_TEXTS texts at most
            if len(i) > 1 and engine.url not in _ONE_CALL_EACH:
                embed_together(i)
            else:
                for one in i:
                    send(one)
            return
        request, given = requests[i], inputs[i]
        try:
            if request.kind is not None:  # score, rerank: vLLM's answer body as it is
                data = client.post(engine.url, request.url, request.body, timeout, engine.api_key)
                tokens = int((data.get("usage") or {}).get("prompt_tokens") or 0)
                keep(i, Answer("", None, tokens, 0, body=data))
                return
            if request.embedding:
                done = client.embed(engine.url, given, timeout, engine.api_key, request.fields)
                keep(i, Answer("", None, done.prompt_tokens, 0, embeddings=done.vectors))
                return
            sampling = sampling_of(request, settings["sampling"])
            window = kv_window.of(engine.url, engine.engine_id)
            claim = contextlib.nullcontext()
            if window:
                choices = (request.fields or {}).get("n")  # vLLM checks it; here a count
                choices = choices if isinstance(choices, int) and choices > 1 else 1
                answer_tokens = choices * int(sampling["max_tokens"] or 0)
                claim = window.claim(kv_window.prompt_tokens(given) + answer_tokens)
            with claim:
                reply = client.complete_one(
                    engine.url,
                    sampling,
                    prompt=None if request.chat else given,
                    messages=given if request.chat else None,
                    timeout=timeout,
                    key=engine.api_key,
                    fields=request.fields,
                )
            problem = context and length_problem(
                reply.prompt_tokens, sampling["max_tokens"], context
            )
            if problem:
                answer = error_answer(problem)
            else:
                answer = answer_of(
                    request, list(reply.choices), reply.prompt_tokens, reply.completion_tokens
                )
        except client.RequestRejected as error:  # this request's error line (issue 30)
            answer = error_answer(error.message, status=error.status)
        keep(i, answer)

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
    resumed: tuple,
    retries: int = 1,
    request_timeout: float = 600.0,
    versions: dict | None = None,
) -> str:
    """One rank on a warm engine of ``pool`` (serve.RegistryPool): read the requests,
    wait for a free engine, send them (one HTTP request each, many in flight), keep
    each answer as it comes, write the outputs; return the lines for the rank's log
    (a warning for an empty rank file, the summary).

    ``resumed``: the rank's partial answers and those an earlier attempt kept (killed,
    or its engine died; formats/partial.py `resume`), which are not asked again.

    An engine found dead before the rank's requests is marked (the pool restarts it)
    and the rank goes to another one. An engine that fails during the requests is
    marked too, and the requests still unanswered are sent to a healthy engine, at most
    ``retries`` times (a death is not the rank's fault); after that the rank fails,
    naming the logs of the engines it failed on. The echo engine is an engine of the
    pool too (scripts/engine/echo_server.py).
    """
    from engine import client, lifecycle

    started = time.monotonic()
    requests = with_served_models(read_rank(prompts_path), settings["served_model_name"])
    placement, wait_s, died_on = {}, 0.0, []
    if not requests:
        result = run_echo(requests)
    else:
        fail_on_refused(requests, {}, settings, prompts_path)
        partial, answers = resumed[0], dict(resumed[1])
        kept = len(answers)
        # refused as read: answered here, never sent
        answers |= {i: refused_answer(r) for i, r in enumerate(requests) if r.error}
        unanswered, request_s, truncated = 0, 0.0, []
        try:
            while len(answers) < len(requests):
                with pool.route() as engine:
                    wait_s = time.monotonic() - started
                    # "fail_rank": a request too long fails the rank at once, as before
                    refused = {} if settings["bad_requests"] == "error_line" else None
                    try:
                        inputs, truncated, context = engine_inputs(
                            requests,
                            settings,
                            str(prompts_path),
                            engine.url,
                            engine.api_key,
                            refused,
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
                    for i, message in (refused or {}).items():
                        answers.setdefault(i, error_answer(message))
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
                            context,
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
            "resumed": kept,
        }
    result["load_s"] = wait_s
    fields = {
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
    paths = (prompts_path, output, record_path)
    summary = finish_rank(rank, settings, requests, result, paths, None, placement, fields)
    return f"WARNING: {prompts_path} has no prompts\n{summary}" if not requests else summary
