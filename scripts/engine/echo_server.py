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
    POST /token_counts     each text's words (engine/vllm_server.py's route)
    POST /v1/chat/completions  the messages rendered with render_chat
                           ("<|role|> content" per message, then "<|assistant|>") as
                           the answer's content
    GET  /metrics          vllm:num_requests_running, vllm:request_success_total; with
                           --num-gpu-blocks-override and --block-size (vLLM's flags),
                           vllm:cache_config_info telling that KV cache
                           (engine/kv_window.py); echo_server_requests_running_peak

Every other field of a request is ignored: the echo engine has no model, and it is not a
second copy of vLLM's OpenAI front end (every vLLM engine serves that front end itself:
engine/vllm_server.py). It answers what the pool, routing and PBS tests need.

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
that prompt: a stand-in for a request that crashes its engine. --refuse-on TEXT
(ECHO_SERVER_REFUSE_ON) refuses with HTTP 400 a request whose prompt holds that text: a
stand-in for a request vLLM refuses (rank/echo.py's per-rank engine does the same).
ECHO_SERVER_START_DELAY_S waits that long before it binds its port (a stand-in for vLLM's
import). ECHO_SERVER_FAIL_HOSTS (comma-separated node names) makes the server exit at
start on those nodes (its TILE_HOST): a stand-in for a node whose engines cannot start.

Stdlib only.
"""

from __future__ import annotations

import argparse
import errno
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


REFUSE_VARIABLE = "ECHO_SERVER_REFUSE_ON"


def check_refused(prompts: list[str | list[int]], refuse_on: str | None) -> None:
    """BadRequest for a prompt that holds ``refuse_on`` (the module doc)."""
    if refuse_on and any(refuse_on in text_of(p) for p in prompts):
        raise BadRequest(f"the prompt holds {refuse_on!r} ({REFUSE_VARIABLE}): refused")


def completion_answer(body: dict, model: str, endpoint: str = "completions") -> dict:
    """The echo engine's answer to a request: a choice per prompt, the prompt its text (no
    limits, no delay: EchoServer adds them)."""
    texts = [text_of(p) for p in prompts_of(body)]
    said = [
        {"message": {"role": "assistant", "content": t}} if endpoint == "chat" else {"text": t}
        for t in texts
    ]
    choices = [
        {"index": i, **s, "finish_reason": "length", "logprobs": None} for i, s in enumerate(said)
    ]
    tokens = sum(len(t.split()) for t in texts)
    return {
        "id": f"{'chatcmpl' if endpoint == 'chat' else 'cmpl'}-{uuid.uuid4().hex}",
        "object": "chat.completion" if endpoint == "chat" else "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        "usage": {"prompt_tokens": tokens, "completion_tokens": tokens, "total_tokens": 2 * tokens},
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
        "usage": {"prompt_tokens": sum(each), "total_tokens": sum(each)},
    }


def token_counts(body: object) -> dict:
    """/token_counts (engine/vllm_server.py's route): one token per word of each text."""
    return {"counts": [len(t.split()) for t in embedding_inputs(body)]}


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
        refuse_on: str | None = None,
        kv_cache: tuple[int, int] | None = None,
    ):
        super().__init__(address, Handler)
        self.kv_cache = kv_cache  # (blocks, block size) to tell on /metrics
        self.slots = threading.BoundedSemaphore(max_num_seqs) if max_num_seqs else None
        self.model = model
        self.max_model_len = max_model_len
        self.delay = delay
        self.die_on = die_on
        self.refuse_on = refuse_on
        self.engine_id = os.environ.get(ENGINE_ID_VARIABLE)  # Handler's /health
        self.lock = threading.Lock()
        self.running = 0
        self.running_peak = 0
        self.succeeded = 0

    def healthy(self) -> bool:
        return True

    def completion(self, body: object, endpoint: str = "completions") -> dict:
        prompts = prompts_of(body)
        if self.die_on is not None and self.die_on in prompts:
            print(f"echo_server: dying on prompt {self.die_on!r}", file=sys.stderr, flush=True)
            os._exit(1)
        check_refused(prompts, self.refuse_on)
        for prompt in prompts:
            if length(prompt) > self.max_model_len:
                raise BadRequest(
                    f"This model's maximum context length is {self.max_model_len} tokens. "
                    f"However, your request has {length(prompt)} input tokens. "
                    "Please reduce the length of the input messages."
                )
        answer = completion_answer(body, self.model, endpoint)
        with self.lock:
            self.running += len(prompts)
            self.running_peak = max(self.running_peak, self.running)
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
            text = metrics_text(self.model, self.running, self.succeeded)
            peak = self.running_peak
        text += f"echo_server_requests_running_peak {peak}\n"  # the tests' own
        if self.kv_cache:
            blocks, size = self.kv_cache
            text += (
                "# TYPE vllm:cache_config_info gauge\n"
                f'vllm:cache_config_info{{block_size="{size}",num_gpu_blocks="{blocks}"}} 1.0\n'
            )
        return text


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
    """The HTTP side of EchoServer: it answers healthy(), completion(body), chat(body),
    embeddings(body), tokens(body) and metrics()."""

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
            "/token_counts": token_counts,
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
    refuse_on = os.environ.get(REFUSE_VARIABLE) or None
    parser.add_argument("--refuse-on", default=refuse_on, help="refuse prompts holding this")
    # vLLM's flags: with both, /metrics tells a KV cache of that many blocks
    parser.add_argument("--num-gpu-blocks-override", type=int, default=None)
    parser.add_argument("--block-size", type=int, default=None)
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
            args.refuse_on,
            (args.num_gpu_blocks_override, args.block_size)
            if args.num_gpu_blocks_override and args.block_size
            else None,
        )
    except OSError as error:
        print(f"echo_server: cannot listen on {args.host}:{args.port}: {error}", file=sys.stderr)
        # EADDRINUSE as the status: the supervisor moves the engine to another port
        return errno.EADDRINUSE if error.errno == errno.EADDRINUSE else 1
    serve(server)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
