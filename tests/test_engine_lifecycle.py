"""scripts/engine/lifecycle.py and engine/client.py without vLLM: the generated command
and environment of a warm server, the client's error paths against a stub HTTP server,
and process-group handling with stand-in processes. The same on real vLLM servers:
tests/test_engine_lifecycle_vllm.py. The engine service (supervisor, registry, pool) is
tested in tests/test_engine_supervisor.py and tests/test_service.py.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import signal
import socket
import textwrap
import threading
import time
import uuid
from pathlib import Path

import pytest

from engine import client, lifecycle
from engine.client import (
    EngineStartError,
    EngineUnavailable,
    RequestRejected,
    complete,
    health,
    tokenize,
)
from engine.lifecycle import Engine, engine_environment, process_group, server_argv, short_tmpdir
from placement import launcher, node_layout, tiles
from workflow import ENGINE_SETTINGS as SETTINGS
from workflow import PYTHON, SCRIPTS, free_port, process_cmdline, wait_until

LONG_PBS_TMPDIR = "/var/tmp/pbs.123456.aurora-pbs-0001.hostmgmt.cm.aurora.alcf.anl.gov"
SAMPLING = {"temperature": 1.0, "top_p": 1.0, "max_tokens": 16, "seed": 1234, "ignore_eos": True}


# ----------------------------------------------------------------------------- argv


def test_argv_one_tile():
    argv = server_argv("/py", "./models/m", 8123, SETTINGS, 1)
    assert argv[:2] == ["/py", str(SCRIPTS / "engine" / "vllm_server.py")]  # warm.server: inprocess
    vllms = server_argv("/py", "./models/m", 8123, SETTINGS, 1, server="vllm")
    assert vllms[:3] == ["/py", "-m", "vllm.entrypoints.openai.api_server"]
    assert vllms[3:] == argv[2:]  # the same engine arguments for both servers
    with pytest.raises(ValueError, match="warm.server"):
        server_argv("/py", "m", 1, SETTINGS, 1, server="gpu")
    joined = " ".join(argv)
    assert "--model ./models/m" in joined
    assert "--host 127.0.0.1 --port 8123" in joined
    assert "--dtype bfloat16" in joined
    assert "--enforce-eager" in argv
    assert "--gpu-memory-utilization 0.9" in joined
    assert "--generation-config vllm" in joined
    assert "--max-model-len" not in argv
    assert "--tensor-parallel-size" not in argv
    assert "--seed" not in argv
    # CPU engines (a CPU KV cache size): no chunked prefill, unless engine_args choose
    assert "--no-enable-chunked-prefill" in argv
    gpu = server_argv("/py", "m", 1, {**SETTINGS, "cpu_kv_cache_gib": None}, 1)
    chosen = {**SETTINGS, "engine_args": ["--enable-chunked-prefill"]}
    assert "--no-enable-chunked-prefill" not in gpu + server_argv("/py", "m", 1, chosen, 1)


def test_argv_options_follow_settings():
    settings = {**SETTINGS, "max_model_len": 128, "enforce_eager": False}
    argv = server_argv("/py", "m", 1, settings, 1)
    assert argv[argv.index("--max-model-len") + 1] == "128"
    assert "--enforce-eager" not in argv
    with pytest.raises(ValueError, match="tiles_per_engine"):
        server_argv("/py", "m", 1, SETTINGS, 0)


def test_argv_tensor_parallel_two_tiles():
    argv = server_argv("/py", "m", 8123, SETTINGS, 2)
    assert argv[argv.index("--tensor-parallel-size") + 1] == "2"
    assert argv[argv.index("--distributed-executor-backend") + 1] == "mp"
    assert "--disable-custom-all-reduce" in argv
    slot = node_layout.Slot("x1000c0s0b0n0", (0, 1))
    flat = engine_environment(tiles.engine_env(slot, "FLAT", 29500, "/tmp/e"), SETTINGS, {})
    assert flat["ZE_AFFINITY_MASK"] == "0,1"
    composite = tiles.engine_env(slot, "COMPOSITE", 29500, "/tmp/e")
    assert engine_environment(composite, SETTINGS, {})["ZE_AFFINITY_MASK"] == "0.0,0.1"


# ----------------------------------------------------------------------------- environment


def test_environment_placement_kv_cache_and_proxy():
    slot = node_layout.Slot("h", (3,))
    placement = tiles.engine_env(slot, "FLAT", 29500, "/tmp/e")
    base = {"PATH": "/bin", "VLLM_PORT": "1", "no_proxy": "proxy.example", "TMPDIR": "/x"}
    env = engine_environment(placement, {**SETTINGS, "cpu_kv_cache_gib": 1.5}, base)
    for name in ("ZE_AFFINITY_MASK", "VLLM_PORT", "MASTER_PORT", "VLLM_HOST_IP"):
        assert env[name] == placement[name]
    assert env["VLLM_PORT"] == "29530" and env["VLLM_HOST_IP"] == "127.0.0.1"
    assert env["PATH"] == "/bin"
    assert env["TMPDIR"] == "/tmp/e/tile-3" == env["VLLM_RPC_BASE_PATH"]
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "2"  # vLLM parses an int: a fraction rounds up
    assert env["no_proxy"] == "proxy.example,localhost,127.0.0.1"
    assert env["NO_PROXY"] == "localhost,127.0.0.1"
    kept = engine_environment(placement, SETTINGS, {"VLLM_CPU_KVCACHE_SPACE": "4"})
    assert kept["VLLM_CPU_KVCACHE_SPACE"] == "4"
    unset = engine_environment(placement, {**SETTINGS, "cpu_kv_cache_gib": None}, {})
    assert "VLLM_CPU_KVCACHE_SPACE" not in unset


def test_short_tmpdir_for_the_long_pbs_tmpdir(tmp_path):
    """PBS's TMPDIR + the per-tile folder + vLLM's socket name exceed the AF_UNIX limit."""
    root = launcher.default_tmp_root({"TMPDIR": LONG_PBS_TMPDIR})
    placement = tiles.engine_env(node_layout.Slot("h", (11,)), "FLAT", 29500, root)
    socket_name = str(uuid.uuid4())
    assert len(f"{placement['TMPDIR']}/{socket_name}") > lifecycle.SOCKET_PATH_MAX
    env = engine_environment(placement, SETTINGS, {"TMPDIR": LONG_PBS_TMPDIR})
    short = env["TMPDIR"]
    assert short.startswith("/tmp/vllm-") and env["VLLM_RPC_BASE_PATH"] == short
    path = f"{short}/{socket_name}"
    assert len(path) < lifecycle.SOCKET_PATH_MAX
    # Stable for the same engine, distinct for another tile.
    assert short_tmpdir(placement["TMPDIR"]) == short
    other = tiles.engine_env(node_layout.Slot("h", (10,)), "FLAT", 29500, root)["TMPDIR"]
    assert short_tmpdir(other) != short
    # The socket really binds there.
    Path(short).mkdir(mode=0o700, exist_ok=True)
    try:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.bind(path)
    finally:
        Path(path).unlink(missing_ok=True)
        Path(short).rmdir()


def test_short_tmpdir_keeps_a_short_one():
    assert short_tmpdir("/tmp/engine-tmp-0/tile-3") == "/tmp/engine-tmp-0/tile-3"


# ----------------------------------------------------------------------------- client errors


class StubHandler(http.server.BaseHTTPRequestHandler):
    """Answers from the class attribute `reply`: (status, body, delay)."""

    reply: tuple[int, bytes, float] = (200, b"{}", 0.0)

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        status, body, delay = self.reply
        time.sleep(delay)
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        # The client may have given up already (the timeout case).
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def stub():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), StubHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


class KeyedModels(http.server.BaseHTTPRequestHandler):
    """GET /v1/models as vLLM's own server answers it (401 without the class's key), or,
    with ``key`` None, as a foreign server: 200 and a model list to every GET."""

    key: str | None = None

    def do_GET(self):
        given = self.headers.get("Authorization")
        refused = self.key is not None and given != f"Bearer {self.key}"
        body = b'{"error": "Unauthorized"}' if refused else b'{"data": [{"id": "m"}]}'
        self.send_response(401 if refused else 200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_identity_for_vllms_own_server_is_the_runs_key_not_liveness():
    """Issue 29: vLLM's own server carries no engine id; it proves the run's key. A
    server without the key (200 to every GET, or 401 to this run's key) is foreign, and
    a check with no key proves nothing."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), KeyedModels)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        KeyedModels.key = "the-runs-key"
        assert client.identify(url, None, "the-runs-key", "key").ours
        for wrong in (None, "another-runs-key"):
            refused = client.identify(url, None, wrong, "key")
            assert refused.answered and not refused.ours
        KeyedModels.key = None  # a server that checks no key
        foreign = client.identify(url, None, "the-runs-key", "key")
        assert not foreign.ours and "with a wrong key: HTTP 200" in foreign.detail
    finally:
        KeyedModels.key = None
        server.shutdown()
        server.server_close()


def test_identity_of_our_servers_is_the_engine_id_on_health(tmp_path):
    """An echo engine answers the id of its start; another id (another run's engine on
    the port) is not ours."""
    engine = stand_in(tmp_path, "pass")
    engine.argv = [PYTHON, str(SCRIPTS / "engine" / "echo_server.py"), "--port", str(engine.port)]
    engine.start()
    try:
        engine.wait_ready(30)
        assert engine.identify().ours and engine.engine_id
        other = client.identify(engine.url, "another-engines-id", None, "id")
        assert other.answered and not other.ours
        assert "engine id " + engine.engine_id in other.detail
    finally:
        engine.stop()


def test_client_400_carries_the_servers_message(stub, monkeypatch):
    server, url = stub
    message = "This model's maximum context length is 256 tokens."
    body = json.dumps({"error": {"message": message, "type": "BadRequestError", "code": 400}})
    server.RequestHandlerClass.reply = (400, body.encode(), 0.0)
    # A site proxy in the environment must not catch requests to a local engine.
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:9")
    with pytest.raises(RequestRejected, match="maximum context length is 256") as caught:
        complete(url, ["p"], SAMPLING)
    assert caught.value.status == 400 and caught.value.message == message


def test_client_server_error_and_bad_answers_are_unavailable(stub):
    server, url = stub
    server.RequestHandlerClass.reply = (500, b'{"message": "EngineCore died"}', 0.0)
    with pytest.raises(EngineUnavailable, match="HTTP 500: EngineCore died"):
        complete(url, ["p"], SAMPLING)
    one_choice = {"choices": [{"index": 0, "text": "x"}], "usage": {}}
    server.RequestHandlerClass.reply = (200, json.dumps(one_choice).encode(), 0.0)
    with pytest.raises(EngineUnavailable, match="1 choices for 2 prompts"):
        complete(url, ["p", "q"], SAMPLING)
    server.RequestHandlerClass.reply = (200, b"not json", 0.0)
    with pytest.raises(EngineUnavailable, match="not JSON"):
        complete(url, ["p"], SAMPLING)
    server.RequestHandlerClass.reply = (200, b"{}", 2.0)
    with pytest.raises(EngineUnavailable, match="no answer"):
        complete(url, ["p"], SAMPLING, timeout=0.5)


def test_client_connection_refused():
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(EngineUnavailable, match="no answer"):
        complete(url, ["p"], SAMPLING, timeout=5)
    with pytest.raises(EngineUnavailable):
        tokenize(url, "p", timeout=5)
    assert health(url) is False
    assert complete(url, [], SAMPLING).texts == []  # nothing to ask: no request


class KeepAliveHandler(StubHandler):
    """HTTP/1.1 as vLLM's server: connections kept alive; an idle one is closed after
    `timeout` seconds (as uvicorn's keep-alive timeout does). Counts connections."""

    protocol_version = "HTTP/1.1"
    opened = 0
    closed = 0

    def setup(self):
        super().setup()
        type(self).opened += 1

    def finish(self):
        super().finish()
        type(self).closed += 1


def test_client_keeps_one_connection_and_replaces_one_the_server_closed():
    handler = type("Handler", (KeepAliveHandler,), {"timeout": 1.0})
    handler.reply = (200, json.dumps({"choices": [{"index": 0, "text": "x"}]}).encode(), 0.0)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        for _ in range(20):
            assert complete(url, ["p"], SAMPLING).texts == ["x"]
        assert (handler.opened, handler.closed) == (1, 0)  # one for all twenty requests
        # idle, the server closes it; the client sees that and opens a new one
        assert wait_until(lambda: handler.closed == 1, 10)
        assert complete(url, ["p"], SAMPLING).texts == ["x"]
        assert handler.opened == 2
    finally:
        server.shutdown()
        server.server_close()


def test_client_reads_a_chunked_answer():
    class Chunked(StubHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self):
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            body = json.dumps({"choices": [{"index": 0, "text": "chunked"}]}).encode()
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for part in (body[:7], body[7:]):
                self.wfile.write(b"%x\r\n%s\r\n" % (len(part), part))
            self.wfile.write(b"0\r\n\r\n")

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Chunked)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        for _ in range(2):  # the second on the same connection: the first read it whole
            assert complete(url, ["p"], SAMPLING).texts == ["chunked"]
    finally:
        server.shutdown()
        server.server_close()


# ----------------------------------------------------------------------------- lifetime, stand-ins


def stand_in(tmp_path, code: str, **options) -> Engine:
    """An Engine whose "server" is a small Python program (no vLLM)."""
    env = {**os.environ, "TMPDIR": str(tmp_path / "t")}
    argv = [PYTHON, "-c", textwrap.dedent(code)]
    return Engine(argv, env, tmp_path / "engine.log", free_port(), name="stand-in", **options)


def test_wait_ready_names_the_log_when_the_server_exits(tmp_path):
    engine = stand_in(tmp_path, "print('boom: no such model', flush=True); raise SystemExit(3)")
    engine.start()
    with pytest.raises(EngineStartError) as caught:
        engine.wait_ready(60)
    text = str(caught.value)
    assert "exited before it was ready" in text and str(engine.log_path) in text
    assert "boom: no such model" in text and "server exited with status 3" in text
    engine.stop()
    engine.stop()  # idempotent


def test_wait_ready_timeout_then_stop_escalates_to_sigkill(tmp_path):
    code = """
        import signal
        import subprocess
        import time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        subprocess.Popen(["sleep", "300"])
        print("ignoring SIGTERM", flush=True)
        time.sleep(300)
    """
    engine = stand_in(tmp_path, code, stop_grace=1.0)
    engine.start()
    with pytest.raises(EngineStartError, match="not ready after 1 s"):
        engine.wait_ready(1.0)
    pgid = engine.pgid
    # The watchdog, the "server" and its child.
    assert wait_until(lambda: len(engine.pids()) == 3, 10)
    engine.stop()
    # The server ignores SIGTERM: only the watchdog's SIGKILL after the grace ends it.
    assert "processes left after the grace period; SIGKILL to the group" in (
        engine.log_path.read_text()
    )
    assert process_group(pgid) == []
    assert not engine.alive()


def test_killed_server_takes_its_orphans_along(tmp_path):
    """As with vLLM: a SIGKILLed server leaves children behind; the watchdog ends them."""
    code = """
        import subprocess
        import time
        subprocess.Popen(["sleep", "300"])
        time.sleep(300)
    """
    engine = stand_in(tmp_path, code, stop_grace=2.0)
    engine.start()
    assert wait_until(lambda: len(engine.pids()) == 3, 10)
    pgid = engine.pgid
    server = next(p for p in engine.pids() if p != pgid and b"-c" in process_cmdline(p))
    os.kill(server, signal.SIGKILL)
    assert wait_until(lambda: not engine.alive(), 10)
    assert process_group(pgid) == []
    assert "server exited with status -9" in engine.log_path.read_text()
    engine.stop()


def test_start_refuses_a_taken_port(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        engine = stand_in(tmp_path, "pass")
        engine.port = sock.getsockname()[1]
        port = engine.port
        with pytest.raises(lifecycle.PortTaken, match=f"another process answers on port {port}"):
            engine.start()


def test_a_port_taken_as_the_server_binds_moves_the_engine_though_freed_since(
    tmp_path, monkeypatch
):
    """Another process takes the port after the start's check and before the server
    binds (another run's engine); by the time the server's exit is seen, that process
    has freed it again (that run ended). The server's exit status (EADDRINUSE) still
    tells wait_ready the port was taken: PortTaken (the supervisor moves the engine to
    another port), not a failed start."""
    monkeypatch.setenv("ECHO_SERVER_START_DELAY_S", "1")
    engine = stand_in(tmp_path, "pass")
    engine.argv = [PYTHON, str(SCRIPTS / "engine" / "echo_server.py"), "--port", str(engine.port)]
    engine.start()
    try:
        with socket.socket() as holder:
            holder.bind(("127.0.0.1", engine.port))
            holder.listen()
            assert wait_until(lambda: not engine.alive(), 30)
        assert "Address already in use" in engine.log_path.read_text()
        with pytest.raises(lifecycle.PortTaken, match="held the port as the engine bound it"):
            engine.wait_ready(30)
    finally:
        engine.stop()


def test_restart_is_bounded(tmp_path):
    engine = stand_in(tmp_path, "import time; time.sleep(300)", max_restarts=0)
    with pytest.raises(EngineStartError, match="max_restarts 0"):
        engine.restart(1)


def test_a_closed_engine_is_never_started_again(tmp_path):
    """The supervisor closes its engines when it ends: a thread still bringing one up
    (moving it off a taken port, restarting it) must not start it after that (a fresh
    clone of 5c8eee7 left two engines of a refused run alive: moved, started again)."""
    engine = stand_in(tmp_path, "import time; time.sleep(300)", stop_grace=1.0)
    engine.start()
    pgid = engine.pgid
    assert wait_until(lambda: len(engine.pids()) == 2, 10)
    engine.close()
    assert process_group(pgid) == [] and not engine.alive()
    with pytest.raises(lifecycle.EngineError, match="stopped for good"):
        engine.start()
    with pytest.raises(lifecycle.EngineError, match="stopped for good"):
        engine.restart(1)
    assert engine.pgid is None and engine.log_path.read_text().count("=== engine") == 1
