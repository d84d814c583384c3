"""The client side of an engine: HTTP requests to an OpenAI-compatible server."""

from __future__ import annotations

import contextlib
import json
import re
import socket
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from formats.partial import unpack_float32


class EngineError(RuntimeError):
    """Base class of the errors of this module."""


class EngineStartError(EngineError):
    """An engine did not become ready (it exited, timed out, or its port was taken)."""


class EngineUnavailable(EngineError):
    """The engine did not answer: no connection, no reply in time, or a server error (5xx)."""


class RequestRejected(EngineError):
    """The engine refused the request (4xx), e.g. a prompt longer than the context."""

    def __init__(self, status: int, message: str):
        super().__init__(f"engine rejected the request (HTTP {status}): {message}")
        self.status = status
        self.message = message


# ----------------------------------------------------------------------------- client

# Never through a proxy (compute nodes set http_proxy, and clients of a local engine do
# not always have no_proxy) and never a new connection per request: a rank of the
# seed's size makes several requests, thousands of ranks run on a node, and urllib's
# connection, request and header-parsing objects cost a rank's client more CPU than
# everything else it does. So a small HTTP/1.1 client over plain sockets: JSON in, JSON
# out, keep-alive connections reused across ranks (a few idle ones kept per engine).


class _Connection:
    """One keep-alive connection to an engine."""

    def __init__(self, address: tuple[str, int], timeout: float):
        self.sock = socket.create_connection(address, timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.reader = self.sock.makefile("rb")
        self.idle_since = time.monotonic()

    def usable(self) -> bool:
        """Idle briefly (under any server's keep-alive timeout: uvicorn's is 5 s) and
        nothing to read: a readable idle socket is one the server closed."""
        if time.monotonic() - self.idle_since > _Connections.IDLE_S:
            return False
        try:
            self.sock.settimeout(0.0)  # a look, no wait (_http sets the request's timeout)
            self.sock.recv(1, socket.MSG_PEEK)
        except BlockingIOError:
            return True  # nothing to read: still open
        except OSError:
            return False
        return False  # end of file (closed), or bytes nobody asked for

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.reader.close()
            self.sock.close()


class _Connections:
    """Idle keep-alive connections per engine address; the lock guards the lists only,
    never a network call."""

    IDLE_S = 2.0
    KEEP = 256  # idle connections kept per engine (a node's ranks in flight x requests)

    def __init__(self):
        self._idle: dict[tuple[str, int], list[_Connection]] = {}
        self._lock = threading.Lock()

    def take(self, address: tuple[str, int], timeout: float) -> _Connection:
        while True:
            with self._lock:
                idle = self._idle.get(address)
                connection = idle.pop() if idle else None
            if connection is None:
                return _Connection(address, timeout)
            if connection.usable():
                return connection
            connection.close()

    def give(self, address: tuple[str, int], connection: _Connection) -> None:
        connection.idle_since = time.monotonic()
        with self._lock:
            idle = self._idle.setdefault(address, [])
            if len(idle) < self.KEEP:
                idle.append(connection)
                return
        connection.close()


_CONNECTIONS = _Connections()


def _address(url: str) -> tuple[str, int]:
    scheme, _, rest = url.partition("://")
    host, _, port = rest.rstrip("/").rpartition(":")
    if scheme != "http" or not host or not port.isdigit():
        raise ValueError(f"engine URL {url!r} is not http://HOST:PORT")
    return host.strip("[]"), int(port)


def _read_response(reader) -> tuple[int, dict[str, str], bytes]:
    """Status, headers (lower-case names) and body of one HTTP/1.x response."""
    status_line = reader.readline(65537)
    if not status_line:
        raise ConnectionResetError("the engine closed the connection")
    version, status = status_line.split(None, 2)[:2]
    headers = {}
    while True:
        line = reader.readline(65537)
        if line in (b"\r\n", b"\n", b""):
            break
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    if "content-length" in headers:
        body = reader.read(int(headers["content-length"]))
    elif headers.get("transfer-encoding", "").lower() == "chunked":
        parts = []
        while size := int(reader.readline(65537).split(b";")[0], 16):
            parts.append(reader.read(size))
            reader.readline(65537)
        while reader.readline(65537) not in (b"\r\n", b"\n", b""):
            pass  # trailers
        body = b"".join(parts)
    else:
        body = reader.read()
        headers["connection"] = "close"
    if version == b"HTTP/1.0" and headers.get("connection", "").lower() != "keep-alive":
        headers["connection"] = "close"
    return int(status), headers, body


def _http(
    url: str, method: str, path: str, body: bytes | None, timeout: float, key: str | None
) -> tuple[int, bytes]:
    """One request to an engine on a kept-alive connection: (status, body). Raises
    OSError (refused, reset, timed out) and ValueError (not HTTP)."""
    address = _address(url)
    lines = [f"{method} {path} HTTP/1.1", f"Host: {address[0]}:{address[1]}"]
    if body is not None:
        lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    if key:
        lines.append(f"Authorization: Bearer {key}")
    message = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (body or b"")
    connection = _CONNECTIONS.take(address, timeout)
    try:
        connection.sock.settimeout(timeout)
        connection.sock.sendall(message)
        status, headers, answer = _read_response(connection.reader)
    except BaseException:
        connection.close()
        raise
    if headers.get("connection", "").lower() == "close":
        connection.close()
    else:
        _CONNECTIONS.give(address, connection)
    return status, answer


@dataclass(frozen=True)
class Completion:
    texts: list[str]  # in the order of the prompts
    finish_reasons: list[str | None]
    prompt_tokens: int
    completion_tokens: int
    seconds: float


@dataclass(frozen=True)
class Tokens:
    ids: list[int]
    max_model_len: int | None


def _error_message(body: bytes) -> str:
    """The server's error text: vLLM's {"error": {"message"}} or the older {"message"}."""
    try:
        data = json.loads(body)
    except ValueError:
        return body.decode(errors="replace")[:500]
    if isinstance(data, dict):
        error = data.get("error")
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])
        if data.get("message"):
            return str(data["message"])
    return body.decode(errors="replace")[:500]


def post(url: str, path: str, body: Mapping, timeout: float, key: str | None = None) -> dict:
    """POST ``body`` to ``path`` of the engine at ``url``: its JSON answer;
    RequestRejected for a 4xx, EngineUnavailable for no answer or a 5xx."""
    try:
        status, raw = _http(url, "POST", path, json.dumps(body).encode(), timeout, key)
    except (OSError, ValueError) as error:
        # refused, reset, timed out, or not an HTTP answer
        reason = error or type(error).__name__
        raise EngineUnavailable(f"{url}{path}: no answer: {reason}") from None
    if status >= 500:
        raise EngineUnavailable(f"{url}{path}: HTTP {status}: {_error_message(raw)}")
    if status >= 400:
        raise RequestRejected(status, _error_message(raw))
    try:
        return json.loads(raw)
    except ValueError:
        raise EngineUnavailable(f"{url}{path}: answer is not JSON: {raw[:200]!r}") from None


def health(url: str, timeout: float = 2.0) -> bool:
    """GET /health answers 200."""
    try:
        return _http(url, "GET", "/health", None, timeout, None)[0] == 200
    except (OSError, ValueError):
        return False


@dataclass(frozen=True)
class KvCache:
    """An engine's KV cache as vLLM reports it: its blocks and the tokens per block."""

    blocks: int
    block_size: int


_CACHE_INFO = re.compile(r"^vllm:cache_config_info\{(.*)\}", re.MULTILINE)
_LABEL = re.compile(r'(\w+)="([^"]*)"')


def kv_cache(url: str, timeout: float = 5.0) -> KvCache | None:
    """The engine's KV cache from its /metrics (`kv_cache_of`); None when it tells none
    (not vLLM, metrics off, no answer)."""
    try:
        status, raw = _http(url, "GET", "/metrics", None, timeout, None)
    except (OSError, ValueError):
        return None
    return kv_cache_of(raw.decode("utf-8", "replace")) if status == 200 else None


def kv_cache_of(metrics: str) -> KvCache | None:
    """The KV cache in vLLM's ``vllm:cache_config_info`` gauge (labels ``num_gpu_blocks``
    and ``block_size``: vLLM 0.15 and 0.32 both have them) of a /metrics text."""
    found = _CACHE_INFO.search(metrics)
    labels = dict(_LABEL.findall(found.group(1))) if found else {}
    blocks, size = labels.get("num_gpu_blocks", ""), labels.get("block_size", "")
    if not (blocks.isdigit() and size.isdigit() and int(blocks) > 0 and int(size) > 0):
        return None
    return KvCache(int(blocks), int(size))


# The engine id an engine of ours carries (lifecycle.Engine puts a new one in its
# environment at each start); echo_server.py and vllm_server.py answer it on /health.
ENGINE_ID_VARIABLE = "AURORA_ENGINE_ID"
# A key no engine has: a server that accepts it does not check keys, so it is not ours.
WRONG_KEY = "not-this-runs-key"


@dataclass(frozen=True)
class Identity:
    """What answers on an engine's port: ``ours`` (proved), ``foreign`` (another
    process: ``detail`` says what it answered), or nothing yet (``answered`` False)."""

    answered: bool
    ours: bool
    detail: str = ""


def identify(
    url: str, engine_id: str | None, key: str | None, proof: str = "id", timeout: float = 2.0
) -> Identity:
    """Whether the server at ``url`` is the engine we started, not just a live server.

    ``proof`` "id": GET /health must answer 200 with ``{"engine_id": engine_id}`` (our
    servers). ``proof`` "key" (vLLM's own server, which cannot carry an id): GET /v1/models
    with ``key`` must answer 200 with a model list, and with a wrong key 401; a server
    without the run's key (another run's engine, an unrelated service) fails one of them.
    """
    if proof == "key" and not key:
        return Identity(True, False, "no key to check vLLM's own server with")
    try:
        if proof == "key":
            status, body = _http(url, "GET", "/v1/models", None, timeout, key)
            if status >= 500:
                return Identity(False, False)  # still starting, or broken: not an answer yet
            if status != 200:
                return Identity(True, False, f"GET /v1/models with this run's key: HTTP {status}")
            try:
                models = json.loads(body)["data"]
                assert isinstance(models, list) and models
            except (ValueError, KeyError, TypeError, AssertionError):
                return Identity(True, False, f"GET /v1/models: not a model list: {body[:100]!r}")
            status, _ = _http(url, "GET", "/v1/models", None, timeout, WRONG_KEY)
            if status != 401:
                return Identity(True, False, f"GET /v1/models with a wrong key: HTTP {status}")
            return Identity(True, True)
        status, body = _http(url, "GET", "/health", None, timeout, None)
    except (OSError, ValueError):
        return Identity(False, False)
    if status != 200:
        return Identity(False, False)
    if proof == "none" or not engine_id:
        return Identity(True, True)  # nothing to prove it with: liveness only
    try:
        answered = json.loads(body).get("engine_id")
    except (ValueError, AttributeError):
        answered = None
    if answered == engine_id:
        return Identity(True, True)
    what = f"engine id {answered}" if answered else f"no engine id ({body[:60]!r})"
    return Identity(True, False, f"GET /health answered 200 with {what}")


def _request_body(prompts: Sequence[str], sampling: Mapping) -> dict:
    return {
        "prompt": list(prompts),
        "temperature": sampling["temperature"],
        "top_p": sampling["top_p"],
        "max_tokens": sampling["max_tokens"],
        "seed": sampling["seed"],
        "ignore_eos": sampling["ignore_eos"],
    }


def _parse_completion(data: dict, count: int, seconds: float) -> Completion:
    choices = data.get("choices")
    if not isinstance(choices, list) or len(choices) != count:
        got = len(choices) if isinstance(choices, list) else "no"
        raise EngineUnavailable(f"engine answered {got} choices for {count} prompts")
    ordered = sorted(choices, key=lambda c: c.get("index", -1))
    if [c.get("index") for c in ordered] != list(range(count)):
        raise EngineUnavailable(
            f"engine answered choice indices {[c.get('index') for c in choices]}"
        )
    usage = data.get("usage") or {}
    return Completion(
        texts=[c.get("text") or "" for c in ordered],
        finish_reasons=[c.get("finish_reason") for c in ordered],
        prompt_tokens=int(usage.get("prompt_tokens") or 0),
        completion_tokens=int(usage.get("completion_tokens") or 0),
        seconds=seconds,
    )


def complete(
    url: str,
    prompts: Sequence[str],
    sampling: Mapping,
    timeout: float = 600.0,
    extra: Mapping | None = None,
    key: str | None = None,
) -> Completion:
    """All prompts in one POST /v1/completions; texts come back in prompt order.

    `sampling`: temperature, top_p, max_tokens, seed, ignore_eos (config sampling.*).
    `extra`: more request fields (e.g. "model", "echo"). No "model": the server's only one.
    """
    if not prompts:
        return Completion([], [], 0, 0, 0.0)
    body = {**_request_body(prompts, sampling), **(extra or {})}
    started = time.monotonic()
    data = post(url, "/v1/completions", body, timeout, key)
    return _parse_completion(data, len(prompts), time.monotonic() - started)


def tokenize(
    url: str,
    prompt: str,
    add_special_tokens: bool = True,
    timeout: float = 60.0,
    key: str | None = None,
) -> Tokens:
    """The engine's token ids for `prompt` (POST /tokenize), and its max_model_len."""
    body = {"prompt": prompt, "add_special_tokens": add_special_tokens}
    data = post(url, "/tokenize", body, timeout, key)
    return Tokens(ids=list(data.get("tokens") or []), max_model_len=data.get("max_model_len"))


@dataclass(frozen=True)
class Reply:
    """The answer to one request (complete_one)."""

    text: str
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    seconds: float
    choices: list = ()  # OpenAI's choices as the engine answered them (n, logprobs)


# The sampling fields a request carries; "stop" only when given.
SAMPLING_FIELDS = ("temperature", "top_p", "max_tokens", "seed", "ignore_eos", "stop")


def complete_one(
    url: str,
    sampling: Mapping,
    prompt: str | Sequence[int] | None = None,
    messages: Sequence[Mapping] | None = None,
    timeout: float = 600.0,
    key: str | None = None,
    fields: Mapping | None = None,
) -> Reply:
    """One request: a prompt (text or token ids) to /v1/completions, or chat messages to
    /v1/chat/completions (the engine renders them with its chat template), with the
    request's other OpenAI ``fields`` as they are (n, logprobs, response_format, ...). One request
    per prompt lets a rank keep each answer as it comes (resume after a kill) while
    the engine still batches all requests in flight."""
    if (prompt is None) == (messages is None):
        raise ValueError("complete_one takes a prompt or messages")
    body = {k: sampling[k] for k in SAMPLING_FIELDS if sampling.get(k) is not None}
    body["ignore_eos"] = bool(sampling.get("ignore_eos"))
    body |= dict(fields or {})
    if messages is not None:
        body["messages"] = [dict(m) for m in messages]
        path = "/v1/chat/completions"
    else:
        body["prompt"] = prompt if isinstance(prompt, str) else list(prompt)
        path = "/v1/completions"
    started = time.monotonic()
    data = post(url, path, body, timeout, key)
    seconds = time.monotonic() - started
    choices = data.get("choices")
    wanted = int((fields or {}).get("n") or 1)
    if (
        not isinstance(choices, list)
        or len(choices) != wanted
        or not all(isinstance(c, dict) for c in choices)
    ):
        raise EngineUnavailable(f"{url}{path}: engine answered {choices!r:.200} as choices")
    choices = sorted(choices, key=lambda c: c.get("index", 0))
    choice = choices[0]
    if messages is not None:
        text = (choice.get("message") or {}).get("content") or ""
    else:
        text = choice.get("text") or ""
    usage = data.get("usage") or {}
    return Reply(
        text=text,
        finish_reason=choice.get("finish_reason"),
        prompt_tokens=int(usage.get("prompt_tokens") or 0),
        completion_tokens=int(usage.get("completion_tokens") or 0),
        seconds=seconds,
        choices=choices,
    )


def tokenize_messages(
    url: str, messages: Sequence[Mapping], timeout: float = 60.0, key: str | None = None
) -> Tokens:
    """The engine's token ids for chat ``messages`` as its chat template renders them for
    a reply (POST /tokenize with messages, as vLLM's server takes it)."""
    body = {"messages": [dict(m) for m in messages], "add_generation_prompt": True}
    data = post(url, "/tokenize", body, timeout, key)
    return Tokens(ids=list(data.get("tokens") or []), max_model_len=data.get("max_model_len"))


@dataclass(frozen=True)
class Embeddings:
    vectors: list[list[float]]  # in input order
    prompt_tokens: int  # the call's, as the engine tells it


def embed(
    url: str,
    texts: Sequence[str],
    timeout: float = 600.0,
    key: str | None = None,
    fields: Mapping | None = None,
):
    """POST /v1/embeddings (a pooling model's engine): one vector per text, in order; the
    request's other OpenAI ``fields`` as they are (dimensions, truncate_prompt_tokens, ...).

    The vectors travel as base64 of little-endian float32 (vLLM's ``encoding_format``
    "base64", ``embed_dtype`` "float32", ``endianness`` "little", in 0.15 and 0.32 alike)
    unless ``fields`` ask otherwise: the same float32 values that "float" spells as
    decimal text, at a fraction of the engine's and this client's time (JSON numbers were
    half a per-rank engine's time for 10,240 short texts, benchmarks/results/2026-12-07)."""
    body = {**WIRE_EMBEDDINGS, **(fields or {}), "input": list(texts)}
    data = post(url, "/v1/embeddings", body, timeout, key)
    items = data.get("data")
    if not isinstance(items, list) or len(items) != len(texts):
        raise EngineUnavailable(f"{url}/v1/embeddings: engine answered {items!r:.200} as data")
    ordered = sorted(items, key=lambda item: item.get("index", 0))
    usage = data.get("usage") or {}
    return Embeddings(
        [_vector(item.get("embedding"), url) for item in ordered],
        int(usage.get("prompt_tokens") or 0),
    )


# How /v1/embeddings' vectors travel (embed): base64 of little-endian float32.
WIRE_EMBEDDINGS = {"encoding_format": "base64", "embed_dtype": "float32", "endianness": "little"}


def _vector(embedding, url: str) -> list[float]:
    """An embedding as the engine sent it (a list of numbers, or base64 of little-endian
    float32) as a list of floats."""
    if not isinstance(embedding, str):
        return list(embedding or [])
    try:
        return unpack_float32(embedding)
    except ValueError as error:  # binascii.Error is one
        raise EngineUnavailable(f"{url}/v1/embeddings: not base64 float32: {error}") from error


def token_counts(
    url: str, texts: Sequence[str], timeout: float = 600.0, key: str | None = None
) -> list[int] | None:
    """Each text's tokens by the engine's own tokenizer (POST /token_counts of our
    servers); None from an engine that does not serve it (vLLM's own server: 404)."""
    try:
        data = post(url, "/token_counts", {"input": list(texts)}, timeout, key)
    except RequestRejected:
        return None
    counts = data.get("counts")
    if not isinstance(counts, list) or len(counts) != len(texts):
        raise EngineUnavailable(f"{url}/token_counts: engine answered {counts!r:.200}")
    return [int(n) for n in counts]
