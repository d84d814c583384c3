"""A stand-in for vLLM's OpenAI-compatible server: no model, no vLLM, each prompt echoed.

Config `engine: echo` runs warm engines at full width (the 48 or 3,072 engines of a
PBS submission) to check placement and plumbing, where vLLM itself would take minutes
and a tile per engine. This server answers the part of the API that engines.py's
client uses, as rank/echo.py's `run_echo` answers in-process: the generated text is the
prompt itself.

    GET  /health           200, {"engine_id": ...} (AURORA_ENGINE_ID: the id the
                           supervisor gave this start of the engine, its proof of identity)
    POST /tokenize         one token per whitespace-separated word (+ BOS 2); with
                           "messages": the words of their rendered chat
    POST /v1/completions   each prompt as its own text; token-id prompts as "id id ..."
    POST /v1/embeddings    per text a vector of 8 numbers from its checksums
    POST /v1/chat/completions  the messages rendered with render_chat
                           ("<|role|> content" per message, then "<|assistant|>") as
                           the answer's content

A few OpenAI fields (ECHO_FIELDS) are answered deterministically, in vLLM's shapes, so
that the fast tests check a rank's handling of choices and logprobs on it: ``n`` gives n
equal choices; ``logprobs`` gives one entry per word (logprob 0.0), ``top_logprobs``
(chat) or ``logprobs`` k (completions) alternatives ``<alt1>``... with logprobs -1, -2,
...; ``min_tokens`` pads the answer with "echo" words; ``response_format`` json_object
or json_schema answers ``{"echo": <text>}`` (no schema is followed: there is no model).
Values are checked as vLLM checks them; any other field is refused with HTTP 400 naming
it (vLLM's front end serves it: engine/vllm_server.py).
    GET  /metrics          vllm:num_requests_running, vllm:request_success_total

With VLLM_API_KEY in its environment (as every warm engine has), a POST without
`Authorization: Bearer <key>` is refused with HTTP 401.

A prompt of more than --max-model-len words is refused with HTTP 400 in vLLM's error
shape. As in vLLM, every prompt of a request counts as one request in /metrics.
Unknown arguments (vLLM's --dtype, --tensor-parallel-size, ...) are ignored, so the
server takes the same argv as vLLM's. --delay (default: the environment variable
ECHO_SERVER_DELAY_S, e.g. from config task_env) makes each completion take time;
--max-num-seqs N (vLLM's flag) holds at most N requests at once, the others wait, so
that a rank's answers come one after another as from a busy engine.
--die-on PROMPT (ECHO_SERVER_DIE_ON) makes the server exit at once on a request holding
that prompt: a stand-in for a request that crashes its engine. ECHO_SERVER_START_DELAY_S
waits that long before it binds its port (a stand-in for vLLM's import). ECHO_SERVER_FAIL_HOSTS
(comma-separated node names) makes the server exit at start on those nodes (its
TILE_HOST): a stand-in for a node whose engines cannot start.

Stdlib only.
"""

from __future__ import annotations

import argparse
import hmac
import json
import os
import signal
import sys
import threading
import time
import uuid
import zlib
from collections.abc import Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

if __package__ in (None, ""):  # run as a file: scripts/, not this file's folder, on the path
    sys.path[0] = str(Path(__file__).resolve().parents[1])

# The engine's key (engines.API_KEY_VARIABLE): requests to /v1/* and /tokenize must
# carry it; /health and /metrics stay open.
API_KEY_VARIABLE = "VLLM_API_KEY"
ENGINE_ID_VARIABLE = "AURORA_ENGINE_ID"  # client.ENGINE_ID_VARIABLE
VOCAB_SIZE = 50000
BOS = 2  # OPT's


def render_chat(messages: list[dict]) -> str:
    """The echo engine's chat template: markers the tests can find in the answer."""
    turns = [f"<|{m['role']}|> {m['content']}" for m in messages]
    return "\n".join([*turns, "<|assistant|>"])


def messages_of(body: object) -> list[dict]:
    if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
        raise BadRequest("the request has no messages")
    messages = body["messages"]
    if not messages or not all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        for m in messages
    ):
        raise BadRequest("messages must be a non-empty list of {role, content} with strings")
    return messages


class BadRequest(ValueError):
    """A request the server refuses with HTTP 400."""


def word_ids(text: str) -> list[int]:
    """One stable id per whitespace-separated word."""
    return [zlib.crc32(word.encode()) % VOCAB_SIZE for word in text.split()]


def prompts_of(body: object) -> list[str | list[int]]:
    """The request's prompts: one string, a list of strings, or lists of token ids."""
    if not isinstance(body, dict) or "prompt" not in body:
        raise BadRequest("the request has no prompt")
    prompt = body["prompt"]
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list) and prompt:
        if all(isinstance(p, str) for p in prompt):
            return list(prompt)
        if all(isinstance(p, list) and all(type(i) is int for i in p) for p in prompt):
            return [list(p) for p in prompt]
        if all(type(i) is int for i in prompt):  # one prompt of token ids
            return [list(prompt)]
    raise BadRequest("prompt must be a string, a list of strings or lists of token ids")


def length(prompt: str | list[int]) -> int:
    return len(prompt) if isinstance(prompt, list) else len(prompt.split())


def text_of(prompt: str | list[int]) -> str:
    return " ".join(map(str, prompt)) if isinstance(prompt, list) else prompt


# The fields the echo engine answers (the module doc); any other field is refused with
# HTTP 400 naming it: vLLM's own front end (engine/vllm_server.py) serves the rest.
ECHO_FIELDS = (
    "n",
    "logprobs",
    "top_logprobs",
    "min_tokens",
    "response_format",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "top_k",
    "min_p",
    "stop_token_ids",
    "logit_bias",
)
BASE_FIELDS = (
    "model",
    "prompt",
    "messages",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "seed",
    "stop",
    "ignore_eos",
    "stream",
    "user",
)
ECHO_ALLOWED = ("echo",)  # completions' echo: the prompt is the answer anyway


def _number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def check_fields(body: dict, endpoint: str, engine: str = "the echo engine") -> None:
    """Refuse (BadRequest) a field this engine does not serve, or a value vLLM refuses."""
    for name in body:
        if name not in (*ECHO_FIELDS, *BASE_FIELDS, *ECHO_ALLOWED):
            raise BadRequest(
                f"field {name!r} is not served by {engine} (no model): a vLLM engine "
                "serves every field of the installed vLLM's OpenAI server"
            )
    checks = {
        "n": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1, ">= 1"),
        "temperature": (lambda v: _number(v) and v >= 0, "a number >= 0"),
        "top_k": (lambda v: isinstance(v, int) and v >= -1, "an integer >= -1"),
        "min_p": (lambda v: _number(v) and 0 <= v <= 1, "in [0, 1]"),
        "min_tokens": (lambda v: isinstance(v, int) and v >= 0, "an integer >= 0"),
        "presence_penalty": (lambda v: _number(v) and -2 <= v <= 2, "in [-2, 2]"),
        "frequency_penalty": (lambda v: _number(v) and -2 <= v <= 2, "in [-2, 2]"),
        "repetition_penalty": (lambda v: _number(v) and v > 0, "> 0"),
        "top_logprobs": (lambda v: isinstance(v, int) and 0 <= v <= 20, "in [0, 20]"),
        "stop_token_ids": (lambda v: isinstance(v, list), "a list of token ids"),
        "logit_bias": (lambda v: isinstance(v, dict), "an object of token id -> bias"),
    }
    if endpoint == "chat":
        checks["logprobs"] = (lambda v: isinstance(v, bool), "true or false")
    else:
        checks["logprobs"] = (lambda v: isinstance(v, int) and 0 <= v <= 20, "in [0, 20]")
    for name, (ok, expected) in checks.items():
        if body.get(name) is not None and not ok(body[name]):
            raise BadRequest(f"{name} must be {expected}, not {body[name]!r}")
    if body.get("top_logprobs") and endpoint == "chat" and not body.get("logprobs"):
        raise BadRequest("when using `top_logprobs`, `logprobs` must be set to true.")
    kind = (body.get("response_format") or {}).get("type", "text")
    if kind not in ("text", "json_object", "json_schema"):
        raise BadRequest(
            f"response_format: type must be text, json_object or json_schema, not {kind!r}"
        )


def _logprobs(text: str, endpoint: str, top: int) -> dict:
    """vLLM's logprobs shapes for the words of ``text`` (one token each)."""
    words = text.split()
    alternatives = [(f"<alt{k}>", -float(k)) for k in range(1, 21)]
    if endpoint == "chat":
        entry = lambda t, v: {"token": t, "logprob": v, "bytes": list(t.encode())}  # noqa: E731
        return {
            "content": [
                entry(w, 0.0)
                | {"top_logprobs": [entry(w, 0.0), *(entry(*a) for a in alternatives)][:top]}
                for w in words
            ]
        }
    offsets, at = [], 0
    for w in words:
        offsets.append(at)
        at += len(w) + 1
    return {
        "text_offset": offsets,
        "token_logprobs": [0.0] * len(words),
        "tokens": words,
        "top_logprobs": [{w: 0.0, **dict(alternatives[: max(top - 1, 0)])} for w in words],
    }


def echo_choices(text: str, body: dict, endpoint: str) -> list[dict]:
    """The choices of an echoed ``text`` under the request's fields (see the module doc)."""
    missing = int(body.get("min_tokens") or 0) - len(text.split())
    if missing > 0:
        text = " ".join([*text.split(), *["echo"] * missing])
    if (body.get("response_format") or {}).get("type") in ("json_object", "json_schema"):
        text = json.dumps({"echo": text})
    logprobs = None
    if endpoint == "chat" and body.get("logprobs"):
        logprobs = _logprobs(text, endpoint, int(body.get("top_logprobs") or 0))
    elif endpoint == "completions" and body.get("logprobs") is not None:
        logprobs = _logprobs(text, endpoint, int(body["logprobs"]))
    said = (
        {"message": {"role": "assistant", "content": text}}
        if endpoint == "chat"
        else {"text": text}
    )
    return [
        {"index": i, **said, "finish_reason": "length", "logprobs": logprobs}
        for i in range(int(body.get("n") or 1))
    ]


def completion_answer(body: dict, model: str, endpoint: str = "completions") -> dict:
    """The echo engine's answer to a request (no limits, no delay: EchoServer adds them)."""
    check_fields(body, endpoint)
    prompts = prompts_of(body)
    choices = []
    for prompt in prompts:
        for choice in echo_choices(text_of(prompt), body, endpoint):
            choices.append(choice | {"index": len(choices)})
    prompt_tokens = sum(length(p) for p in prompts)
    completion_tokens = sum(
        len((c["message"]["content"] if endpoint == "chat" else c["text"]).split()) for c in choices
    )
    return {
        "id": f"{'chatcmpl' if endpoint == 'chat' else 'cmpl'}-{uuid.uuid4().hex}",
        "object": "chat.completion" if endpoint == "chat" else "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }


def chat_answer(body: dict, model: str) -> dict:
    """/v1/chat/completions: the rendered messages as one echoed prompt."""
    prompt = render_chat(messages_of(body))
    rest = {k: v for k, v in body.items() if k != "messages"}
    return completion_answer({**rest, "prompt": prompt}, model, "chat")


EMBEDDING_SIZE = 8


def embedding_inputs(body: object) -> list[str]:
    """The texts of an embeddings request's ``input``: a string or a list of strings."""
    texts = body.get("input") if isinstance(body, dict) else None
    texts = [texts] if isinstance(texts, str) else texts
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
        raise BadRequest("input must be a string or a non-empty list of strings")
    return texts


def embeddings_answer(body: object, model: str) -> dict:
    """/v1/embeddings: per text, EMBEDDING_SIZE numbers from its bytes' checksums (the
    same text, the same vector); one token per word."""
    texts = embedding_inputs(body)
    vectors = [
        [zlib.crc32(f"{k}:{text}".encode()) / 2**32 for k in range(EMBEDDING_SIZE)]
        for text in texts
    ]
    each = [len(t.split()) for t in texts]
    return {
        "object": "list",
        "data": [
            {"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vectors)
        ],
        "model": model,
        "usage": embedding_usage(each),
    }


def embedding_usage(tokens: list[int]) -> dict:
    """An embeddings answer's usage: OpenAI's, plus each input's tokens (our servers'
    addition: a rank sends several requests' texts in one call and splits the usage)."""
    total = sum(tokens)
    return {"prompt_tokens": total, "total_tokens": total, "prompt_tokens_per_input": tokens}


class EchoServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024  # thousands of ranks may connect at once

    def __init__(
        self,
        address,
        model: str,
        max_model_len: int,
        delay: float,
        die_on: str | None = None,
        max_num_seqs: int | None = None,
    ):
        super().__init__(address, Handler)
        self.slots = threading.BoundedSemaphore(max_num_seqs) if max_num_seqs else None
        self.model = model
        self.max_model_len = max_model_len
        self.delay = delay
        self.die_on = die_on
        self.engine_id = os.environ.get(ENGINE_ID_VARIABLE)  # Handler's /health
        self.lock = threading.Lock()
        self.running = 0
        self.succeeded = 0

    def healthy(self) -> bool:
        return True

    def completion(self, body: object, endpoint: str = "completions") -> dict:
        prompts = prompts_of(body)
        if self.die_on is not None and self.die_on in prompts:
            print(f"echo_server: dying on prompt {self.die_on!r}", file=sys.stderr, flush=True)
            os._exit(1)
        for prompt in prompts:
            if length(prompt) > self.max_model_len:
                raise BadRequest(
                    f"This model's maximum context length is {self.max_model_len} tokens. "
                    f"However, your request has {length(prompt)} input tokens. "
                    "Please reduce the length of the input messages."
                )
        answer = completion_answer(body, self.model, endpoint)  # refuses before any wait
        with self.lock:
            self.running += len(prompts)
        try:
            if self.slots is not None:
                self.slots.acquire()
            try:
                if self.delay > 0:
                    time.sleep(self.delay)
            finally:
                if self.slots is not None:
                    self.slots.release()
        finally:
            with self.lock:
                self.running -= len(prompts)
        with self.lock:
            self.succeeded += len(prompts)
        return answer

    def chat(self, body: object) -> dict:
        """/v1/chat/completions: the rendered messages as one echoed prompt."""
        prompt = render_chat(messages_of(body))
        rest = {k: v for k, v in body.items() if k != "messages"}
        return self.completion({**rest, "prompt": prompt}, "chat")

    def embeddings(self, body: object) -> dict:
        with self.lock:
            self.succeeded += 1
        return embeddings_answer(body, self.model)

    def tokens(self, body: object) -> dict:
        if isinstance(body, dict) and "messages" in body:
            ids = word_ids(render_chat(messages_of(body)))
        elif isinstance(body, dict) and isinstance(body.get("prompt"), str):
            ids = word_ids(body["prompt"])
            if body.get("add_special_tokens", True):
                ids.insert(0, BOS)
        else:
            raise BadRequest("the request has no prompt string")
        return {"tokens": ids, "count": len(ids), "max_model_len": self.max_model_len}

    def metrics(self) -> str:
        with self.lock:
            return metrics_text(self.model, self.running, self.succeeded)


def metrics_text(model: str, running: int, succeeded: int) -> str:
    """The two Prometheus metrics of vLLM's /metrics that the tests and benchmarks read."""
    label = f'model_name="{model}"'
    return (
        "# HELP vllm:num_requests_running Number of requests in model execution batches.\n"
        "# TYPE vllm:num_requests_running gauge\n"
        f"vllm:num_requests_running{{{label}}} {running}\n"
        "# HELP vllm:request_success_total Count of successfully processed requests.\n"
        "# TYPE vllm:request_success_total counter\n"
        f'vllm:request_success_total{{finished_reason="length",{label}}} {succeeded}\n'
    )


class Handler(BaseHTTPRequestHandler):
    """The HTTP side of EchoServer and vllm_server.VllmServer: they answer healthy(),
    completion(body), chat(body), tokens(body) and metrics()."""

    server: EchoServer
    server_version = "echo_server"
    # Keep-alive, as vLLM's server: a client's connection serves many requests (every
    # answer has its Content-Length; a request's body is read before any answer).
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body are two writes: no 40 ms stall

    def log_message(self, *args):  # quiet: thousands of requests
        pass

    def _send(self, status: int, body: bytes, content_type: str = "application/json") -> None:
        try:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client went away

    def _json(self, status: int, data: dict) -> None:
        self._send(status, json.dumps(data).encode())

    def _error(self, status: int, message: str) -> None:
        kinds = {400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError"}
        kind = kinds.get(status, "InternalServerError")
        self._json(status, {"error": {"message": message, "type": kind, "code": status}})

    def do_GET(self):
        if self.path == "/health":
            # The engine's id: the supervisor and the pool tell this run's engine from
            # another process on the same port by it (client.identify).
            engine_id = getattr(self.server, "engine_id", None)
            body = json.dumps({"engine_id": engine_id}).encode() if engine_id else b""
            self._send(200 if self.server.healthy() else 503, body)
        elif self.path == "/metrics":
            self._send(200, self.server.metrics().encode(), "text/plain; version=0.0.4")
        else:
            self._error(404, f"no such path: {self.path}")

    def do_POST(self):
        answer = {
            "/v1/completions": self.server.completion,
            "/v1/chat/completions": self.server.chat,
            "/v1/embeddings": self.server.embeddings,
            "/tokenize": self.server.tokens,
        }
        try:
            raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        except ValueError:
            self.close_connection = True  # no length: where the next request starts is lost
            self._error(400, "the request has no valid Content-Length")
            return
        if self.path not in answer:
            self._error(404, f"no such path: {self.path}")
            return
        key = os.environ.get(API_KEY_VARIABLE)
        given = self.headers.get("Authorization") or ""
        if key and not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
            self._error(401, "Unauthorized: this engine needs its run's key (Authorization)")
            return
        try:
            body = json.loads(raw)
        except ValueError as error:
            self._error(400, f"the request is not JSON: {error}")
            return
        try:
            self._json(200, answer[self.path](body))
        except BadRequest as error:
            self._error(400, str(error))
        except Exception as error:  # an engine failure: the client retries elsewhere
            self._error(500, f"{type(error).__name__}: {error}")


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--model", default="echo", help="the name it answers with")
    parser.add_argument("--max-model-len", type=int, default=2048)
    delay = float(os.environ.get("ECHO_SERVER_DELAY_S") or 0)
    parser.add_argument("--delay", type=float, default=delay, help="seconds per completion")
    die_on = os.environ.get("ECHO_SERVER_DIE_ON") or None
    parser.add_argument("--die-on", default=die_on, help="exit at once on this prompt")
    parser.add_argument("--max-num-seqs", type=int, default=None, help="requests held at once")
    args, _vllm_only = parser.parse_known_args(argv)
    return args


def serve(server: ThreadingHTTPServer, stopped=lambda: False) -> None:
    """Serve until SIGTERM or SIGINT (or until ``stopped()``), then close the socket."""
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda _signum, _frame: stop.set())
    # the line vLLM's server prints once it serves; engine logs are read for it. The
    # socket already listens (connections wait in its backlog), and printed before the
    # first answer, the line is in the log by the time anyone has seen /health answer.
    print("Application startup complete.", file=sys.stderr, flush=True)
    serving = threading.Thread(target=server.serve_forever, name="serve", daemon=True)
    serving.start()
    while not stop.wait(0.5) and not stopped():
        pass
    server.shutdown()
    server.server_close()


def main(argv: Sequence[str]) -> int:
    args = parse_args(argv)
    failing = [h for h in os.environ.get("ECHO_SERVER_FAIL_HOSTS", "").split(",") if h]
    if os.environ.get("TILE_HOST") in failing:
        print(f"echo_server: failing at start on {os.environ['TILE_HOST']} "
              "(ECHO_SERVER_FAIL_HOSTS)", file=sys.stderr)  # fmt: skip
        return 1
    # A stand-in for vLLM's import time (tests of a port taken before the engine binds it).
    time.sleep(float(os.environ.get("ECHO_SERVER_START_DELAY_S") or 0))
    try:
        server = EchoServer(
            (args.host, args.port),
            args.model,
            args.max_model_len,
            args.delay,
            args.die_on,
            args.max_num_seqs,
        )
    except OSError as error:
        print(f"echo_server: cannot listen on {args.host}:{args.port}: {error}", file=sys.stderr)
        return 1
    serve(server)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
