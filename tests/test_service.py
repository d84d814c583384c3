"""The engine service of a local run (local.LocalService): the one-node case of a PBS
submission, the same supervisor (supervisor.node), registry and pool (routing.RegistryPool),
here on echo servers, in seconds. Real vLLM engines run through it in
tests/test_workflow_local.py; the submission's case on OpenPBS in
tests/test_aurora_runs.py."""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import urllib.request
import uuid
from pathlib import Path

import pytest

import workflow as wf
from engine import client, kv_window, local, supervisor
from formats import registry as registry_format
from formats import settings as run_settings
from pipeline import rank_job
from placement import node_layout, ports
from rank import checks
from workflow import local_profile_config, wait_until

PYTHON = sys.executable
SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
HOST = os.uname().nodename


def echo_spec(tmp_path: Path, engine_args=(), ranks_in_flight: int = 1, **env) -> dict:
    """A local run's spec for two echo engines (``engine_args``: config
    vllm.engine_args), its registry under tmp_path; every process of its engines
    carries a tag of its own in its environment."""
    defaults = local_profile_config()
    config = local_profile_config(
        engine="echo",
        warm={**defaults["warm"], "ranks_in_flight": ranks_in_flight},
        vllm={**defaults["vllm"], "engine_args": list(engine_args)},
    )
    spec = rank_job.local_spec(run_settings.from_config(config), "unused")
    tag = uuid.uuid4().hex
    return spec | {
        "registry_root": str(tmp_path / "engines"),
        "env": spec["env"] | {"SERVICE_TEST_TAG": tag, **env},
        "tag": tag,
    }


def tagged(tag: str) -> list[int]:
    """Live processes whose environment holds SERVICE_TEST_TAG=tag."""
    wanted = f"SERVICE_TEST_TAG={tag}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ours = wanted in (entry / "environ").read_bytes().split(b"\0")
            if ours and (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                found.append(int(entry.name))
        except OSError:
            continue
    return found


@pytest.fixture
def service(tmp_path):
    services = []

    def start(engine_args=(), ranks_in_flight=1, **env):
        spec = echo_spec(tmp_path, engine_args, ranks_in_flight, **env)
        started = local.LocalService(spec)
        services.append((started, spec["tag"]))
        return started, started.start()

    yield start
    for started, tag in services:
        started.stop()
        assert wait_until(lambda tag=tag: not tagged(tag), 30), f"left running: {tagged(tag)}"


def echo_rank(tmp_path: Path, rank: int, prompts: list[str], pool, retries: int = 1) -> dict:
    data = tmp_path / f"{rank}.in"
    data.write_text("".join(f"{p}\n" for p in prompts))
    settings = checks.parse_settings(json.dumps({"engine": "echo", "model": "echo"}))
    wf.serve_rank(rank, settings, data, tmp_path / f"{rank}.out", pool, retries=retries)
    return json.loads((tmp_path / f"{rank}.json").read_text())


def test_a_local_run_starts_its_nodes_engines_serves_with_its_key_and_stops_them(tmp_path, service):
    started, pool = service()
    with pool.route() as first, pool.route() as second:  # one in flight each
        assert {first.name, second.name} == {f"{HOST}/tile0", f"{HOST}/tile1"}
        # loopback only, and the run's key is required
        assert first.url.startswith("http://127.0.0.1:")
        with pytest.raises(client.RequestRejected) as refused:
            client.complete(first.url, ["x"], local_profile_config()["sampling"])
        assert refused.value.status == 401
    record = echo_rank(tmp_path, 3, ["one", "two"], pool)
    assert (tmp_path / "3.out").read_text() == (
        "Prompt: 'one', Generated text: 'one'\n\nPrompt: 'two', Generated text: 'two'\n\n"
    )
    assert record["engine_name"] in (first.name, second.name)
    # the registry says it as a submission's does; the key is in its 0600 file only
    entries = registry_format.read_registry(started.registry)
    assert {e["state"] for e in entries.values()} == {"ready"} and len(entries) == 2
    key_file = started.registry.parent / f"{started.run_id}.key"
    assert key_file.stat().st_mode & 0o777 == 0o600
    key = key_file.read_text().strip()
    for path in started.registry.iterdir():
        assert key not in path.read_text(), path
    started.stop()
    assert {e["state"] for e in registry_format.read_registry(started.registry).values()} == {
        "stopped"
    }


def test_a_stop_that_does_not_wait_stops_the_engines_and_a_later_stop_waits(tmp_path, service):
    """The summary rule tells the engines to stop (every rank is answered) and goes on;
    the run's end waits for them."""
    started, pool = service()
    echo_rank(tmp_path, 1, ["one"], pool)
    process = started._process
    started.stop(wait=False)
    assert started._process is process  # still the run's to wait for
    assert wait_until(lambda: process.poll() is not None, 30)
    states = {e["state"] for e in registry_format.read_registry(started.registry).values()}
    assert states == {"stopped"}
    started.stop()
    assert started._process is None


def test_a_local_run_whose_ports_another_run_holds_takes_free_ones(tmp_path, service, capfd):
    # another run's engine listens on this run's first API port (tiles.base_port + 1000)
    spec = echo_spec(tmp_path)
    placement = spec["tiles"]
    slots = node_layout.engine_slots(placement["per_node"], placement["per_job"], HOST)
    first = ports.engine_port(spec, slots[0])
    holder = socket.socket()
    with holder:
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers bind
        with contextlib.suppress(OSError):  # else something else holds it already
            holder.bind(("127.0.0.1", first))
            holder.listen()
        started, pool = service()
        with pool.route() as one, pool.route() as two:
            got = sorted(int(e.url.rsplit(":", 1)[1]) for e in (one, two))
        assert first not in got and (got[0] - first) % 2000 == 0, got
        assert got[1] == got[0] + 1
        record = echo_rank(tmp_path, 0, ["x"], pool)
    assert record["engine_name"] in (one.name, two.name)
    assert f"this run's engines use tiles.base_port {got[0] - 1000}" in capfd.readouterr().err


def test_engines_that_all_fail_fail_the_ranks_naming_their_logs(tmp_path, service):
    _, pool = service(ECHO_SERVER_FAIL_HOSTS=HOST)
    with pytest.raises(client.EngineError) as caught:
        echo_rank(tmp_path, 0, ["x"], pool)
    text = str(caught.value)
    # the failed engines end the wait, not the ready timeout (warm.ready_timeout_s)
    assert "every engine of this run failed" in text and "ready_timeout" not in text
    assert f"{HOST}-tile0.log" in text and f"{HOST}-tile1.log" in text
    assert not (tmp_path / "0.out").exists()


def test_a_killer_request_fails_its_rank_alone_and_the_engines_come_back(tmp_path, service):
    """Echo servers that die on one prompt: the rank holding it kills the engine it is
    sent to, is sent once more to the other one, kills that too, and fails naming both
    logs; the supervisor restarts both (warm.max_restarts) and the other ranks run."""
    started, pool = service(ECHO_SERVER_DIE_ON="poison")
    with pytest.raises(client.EngineError) as caught:
        echo_rank(tmp_path, 0, ["fine", "poison"], pool)
    text = str(caught.value)
    assert "failed on 2 engine(s) in a row" in text and "retry_after_engine_death 1" in text
    logs = [started.registry / f"{HOST}-tile{t}.log" for t in (0, 1)]
    assert all(str(log) in text for log in logs)
    assert not (tmp_path / "0.out").exists() and not (tmp_path / "0.json").exists()
    for rank in (1, 2, 3):  # they wait for the restarted engines
        record = echo_rank(tmp_path, rank, ["one", "two"], pool)
        assert record["engine_deaths"] == []
    entries = registry_format.read_registry(started.registry).values()
    assert sorted(e["restarts"] for e in entries) == [1, 1]
    assert all("dying on prompt 'poison'" in log.read_text() for log in logs)


def test_requests_to_an_engine_claim_no_more_than_its_kv_cache(tmp_path, service):
    """Echo engines that tell a KV cache of 4 blocks of 16 tokens on /metrics, as vLLM
    does (its flags --num-gpu-blocks-override, --block-size): a rank's requests, each of
    one prompt token and 16 to generate (2 blocks), go 2 at a time (engine/kv_window.py),
    where all 12 would be in flight at once without the window."""
    flags = ["--num-gpu-blocks-override", "4", "--block-size", "16"]
    started, pool = service(flags, ECHO_SERVER_DELAY_S="0.2")
    record = echo_rank(tmp_path, 0, [f"p{i}" for i in range(12)], pool)
    assert record["output_tokens"] == 12
    (engine,) = [m.engine for m in pool.members.values() if m.engine.name == record["engine_name"]]
    assert metric(engine.url, "echo_server_requests_running_peak") == 2
    assert client.kv_cache(engine.url) == client.KvCache(4, 16)


def test_ranks_wait_for_an_engine_with_room_not_behind_a_crowded_one(tmp_path, service):
    """Echo engines with a KV cache of two requests' worth each, 64 ranks in flight: while
    the 24 requests of rank 0 crowd one engine's cache (engine/kv_window.py), eight ranks
    of one request each go to the other engine as it has room, where the count of ranks
    in flight alone would queue half of them behind rank 0."""
    flags = ["--num-gpu-blocks-override", "4", "--block-size", "16"]
    started, pool = service(flags, ranks_in_flight=64, ECHO_SERVER_DELAY_S="0.2")
    assert wait_until(lambda: all_ready(pool), 60)
    done = {}

    def rank(number: int, prompts: list[str]) -> None:
        done[number] = echo_rank(tmp_path, number, prompts, pool)["engine_name"]

    big = threading.Thread(target=rank, args=(0, [f"p{i}" for i in range(24)]))
    big.start()
    engines = [m.engine for m in pool.members.values()]
    assert wait_until(lambda: any(kv_window.crowded(e.url, e.engine_id) for e in engines), 30)
    small = [threading.Thread(target=rank, args=(n, [f"s{n}"])) for n in range(1, 9)]
    for thread in small:
        thread.start()
    for thread in [big, *small]:
        thread.join(60)
    assert len(done) == 9
    behind_rank_0 = [n for n in range(1, 9) if done[n] == done[0]]
    assert behind_rank_0 == [], f"ranks {behind_rank_0} queued behind rank 0 on {done[0]}"


def all_ready(pool) -> bool:
    """Whether every engine of the pool is routed to (reported ready, identity proved)."""
    with pool._cond:
        pool._refresh()
        return all(m.state == registry_format.READY for m in pool.members.values())


def metric(url: str, name: str) -> float:
    """The sum of a metric's values on an engine's /metrics."""
    direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with direct.open(f"{url}/metrics", timeout=2) as answer:
        lines = answer.read().decode().splitlines()
    return sum(float(x.rsplit(" ", 1)[1]) for x in lines if x.split("{")[0].split(" ")[0] == name)


def running(url: str) -> float:
    """Requests the engine runs; 0 when it does not answer."""
    try:
        return metric(url, "vllm:num_requests_running")
    except OSError:
        return 0.0


def test_a_rank_in_flight_when_its_engine_dies_is_served_by_another(tmp_path, service):
    started, pool = service(ECHO_SERVER_DELAY_S="3")
    with pool.route(), pool.route():
        pass  # both engines are ready
    urls = {e["name"]: e["url"] for e in registry_format.read_registry(started.registry).values()}
    done = []
    rank = threading.Thread(target=lambda: done.append(echo_rank(tmp_path, 7, ["x"], pool)))
    rank.start()
    assert wait_until(lambda: any(running(u) for u in urls.values()), 30)
    victim = next(name for name, url in urls.items() if running(url))
    port = urls[victim].rsplit(":", 1)[1].encode()
    (server,) = [
        pid
        for pid in tagged(started.spec["env"]["SERVICE_TEST_TAG"])
        if b"echo_server.py" in (argv := Path(f"/proc/{pid}/cmdline").read_bytes())
        and b"--port\0" + port in argv
        and b"watchdog.py" not in argv
    ]
    os.kill(server, signal.SIGKILL)
    rank.join(60)
    assert done, "the rank did not finish"
    record = done[0]
    assert record["engine_deaths"] == [victim] and record["engine_name"] != victim
    assert (tmp_path / "7.out").read_text() == "Prompt: 'x', Generated text: 'x'\n\n"


OWNER = """
import json
import sys
sys.path.insert(0, sys.argv[1])
from engine import local
service = local.LocalService(json.loads(sys.argv[2]))
pool = service.start()
with pool.route(), pool.route():
    print("ready", flush=True)
sys.stdin.read()
"""


def test_sigkill_of_the_runs_process_leaves_no_engine(tmp_path):
    """What a SIGKILLed Snakemake leaves: nothing. The supervisor's lifeline closes,
    it stops the engines, and ends."""
    spec = echo_spec(tmp_path)
    owner = subprocess.Popen(
        [PYTHON, "-c", OWNER, str(SCRIPTS), json.dumps(spec)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert owner.stdout.readline().strip() == "ready"
        assert len(tagged(spec["tag"])) >= 4  # two echo servers and their watchdogs
        assert len(tagged_supervisors(tmp_path)) == 1
        owner.kill()
        owner.wait()
        assert wait_until(lambda: not tagged(spec["tag"]) and not tagged_supervisors(tmp_path), 30)
    finally:
        if owner.poll() is None:
            owner.kill()
            owner.wait()
    (registry,) = [p for p in (tmp_path / "engines").iterdir() if p.is_dir()]
    assert "owner is gone" in (registry / "supervisor.log").read_text()


def tagged_supervisors(tmp_path: Path) -> list[int]:
    """supervisor.py node processes whose spec lies under tmp_path."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                argv = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if b"supervisor.py\0node\0" in argv and str(tmp_path).encode() in argv:
                found.append(int(entry.name))
    return found


class Foreign(http.server.BaseHTTPRequestHandler):
    """Another run's engine, as this run sees it: 200 to every GET, 401 to every POST."""

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_POST(self):
        self.server.posts.append(self.path)
        self.send_response(401)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


def test_a_server_planted_on_an_engines_port_before_it_binds_is_survived(tmp_path, service, capfd):
    """Issue 29: a foreign server takes an engine's port after the run chose it, while
    the (slow) engine is still starting. The engine proves no id there: it is moved to
    a free block and restarted; its registry entry and the run's output say so; the
    rank runs on this run's engines only, and the foreign server gets no request."""
    started, pool = service(ECHO_SERVER_START_DELAY_S="3")
    spec = json.loads((started.registry.parent / f"{started.run_id}.engines.json").read_text())
    slots = node_layout.engine_slots(spec["tiles"]["per_node"], spec["tiles"]["per_job"], HOST)
    port = ports.engine_port(spec, slots[0])

    def engine_started() -> bool:  # its server runs, and sleeps before it binds its port
        argvs = [Path(f"/proc/{pid}/cmdline").read_bytes() for pid in tagged(spec["tag"])]
        return any(b"echo_server.py" in a and f"--port\0{port}\0".encode() in a for a in argvs)

    assert wait_until(engine_started, 30)
    foreign = http.server.ThreadingHTTPServer(("127.0.0.1", port), Foreign)
    foreign.posts = []
    threading.Thread(target=foreign.serve_forever, args=(0.05,), daemon=True).start()
    try:
        for rank in range(4):
            record = echo_rank(tmp_path, rank, ["one", "two"], pool)
            assert record["engine_deaths"] == []
        name = f"{HOST}-tile{slots[0].tiles[0]}"

        def moved_entry() -> dict:
            return registry_format.read_registry(started.registry).get(name, {})

        assert wait_until(lambda: moved_entry().get("state") == "ready", 30), moved_entry()
        moved = moved_entry()
        assert moved["restarts"] == 1
        assert not moved["url"].endswith(f":{port}")
        (conflict,) = moved["port_conflicts"]
        assert f"another process answers on port {port} of 127.0.0.1" in conflict
        assert "GET /health answered 200 with no engine id" in conflict
        assert "not this run's engine; moved to port" in conflict
        said = capfd.readouterr().err
        assert "this run's engines use tiles.base_port" in said
        assert conflict in said  # the run's output says it, as the pool read it
        assert foreign.posts == []
    finally:
        foreign.shutdown()
        foreign.server_close()


def test_two_runs_started_together_in_two_folders_both_finish_on_their_own_engines(tmp_path):
    """Issue 29: two local runs of one machine, started at the same moment, choose the
    same free ports; slow engines (not bound yet) let both choose them. Each engine
    proves its id before a rank is sent, so the run whose engine finds the other run's
    there moves it; both runs finish every rank, on their own engines only."""
    ranks = {f"{r}.in": f"run rank {r}\nsecond prompt\n" for r in range(3)}
    works = [wf.make_workdir(tmp_path / name, ranks) for name in ("first", "second")]
    # Requests of a second: a run's engines stay up while the other run's bind their
    # ports (a run that ended first would free its ports for the other to take).
    slow = {"ECHO_SERVER_START_DELAY_S": "2", "ECHO_SERVER_DELAY_S": "1"}
    configs = [wf.local_config(work, engine="echo", task_env=slow) for work in works]
    runs = [
        wf.snakemake(work, configfiles=config, popen=True)
        for work, config in zip(works, configs, strict=True)
    ]
    outputs = []
    try:
        for run in runs:
            outputs.append(run.communicate(timeout=300)[0])
    finally:
        for run in runs:
            if run.poll() is None:
                os.killpg(run.pid, signal.SIGKILL)
                run.wait()
    urls = []
    for work, run, output in zip(works, runs, outputs, strict=True):
        assert run.returncode == 0, output[-3000:]
        assert "this run's engines use tiles.base_port" in output
        (registry,) = [p for p in (work / "logs" / "engines").iterdir() if p.is_dir()]
        entries = registry_format.read_registry(registry).values()
        urls.append({e["url"] for e in entries})
        for rank in range(3):
            assert wf.read_records(work / "results" / f"{rank}.out")[0][1] == f"run rank {rank}"
            record = json.loads((work / "results" / "records" / f"{rank}.json").read_text())
            assert record["engine_log"].startswith(str(registry)), record["engine_log"]
    assert not urls[0] & urls[1], urls  # no engine of one run was the other's


def test_engines_start_beside_fetch_model_only_in_a_local_run_of_inprocess_engines(
    tmp_path, monkeypatch
):
    """rank_job.start_beside_fetch: a local warm run of in-process vLLM engines on a model
    folder starts them with rule fetch_model; nothing else does (echo, per-rank engines,
    vLLM's own server, a hub id, profiles/aurora, a node of a PBS submission)."""
    from pbs.settings import RunInfo

    started = []
    monkeypatch.setattr(rank_job.ENGINES, "pool", lambda *a, **k: started.append(k))
    local_run = RunInfo(configfiles=(str(wf.REPO / "profiles" / "local" / "local.yaml"),))
    aurora = RunInfo(configfiles=(str(wf.REPO / "profiles" / "aurora" / "aurora.yaml"),))
    vllm = local_profile_config(engine="vllm")
    folder, marker = str(wf.TINY_MODEL), str(tmp_path / "marker.json")
    refused = [
        (local_run, local_profile_config(engine="echo"), folder),
        (local_run, vllm | {"warm_engines": False}, folder),
        (local_run, wf.deep_merge(vllm, {"warm": {"server": "vllm"}}), folder),
        (local_run, vllm, "facebook/opt-125m"),
        (aurora, vllm, folder),
    ]
    log = str(tmp_path / "fetch_model.log")
    for run, config, model in refused:
        settings = run_settings.from_config(config)
        assert not rank_job.start_beside_fetch(run, settings, model, marker, log)
    monkeypatch.setenv(supervisor.SPEC_VARIABLE, str(tmp_path / "spec.json"))
    settings = run_settings.from_config(vllm)
    assert not rank_job.start_beside_fetch(local_run, settings, folder, marker, log)
    assert started == []
    monkeypatch.delenv(supervisor.SPEC_VARIABLE)
    (tmp_path / "fetch_model.log.claim").write_text("1\n")  # an earlier run's: forgotten
    assert rank_job.start_beside_fetch(local_run, settings, folder, marker, log)
    (started,) = started
    assert started["go_file"] == marker
    # the engines run fetch.py's checks, the first of them to claim them (test_fetch_beside)
    *checks, serve = started["prepare"]
    assert checks[0].endswith("scripts/model/fetch.py") and serve == "--serve"
    assert checks[checks.index("--log") + 1] == log
    assert not (tmp_path / "fetch_model.log.claim").exists()


def test_engines_started_beside_fetch_model_take_the_versions_of_its_marker(tmp_path, service):
    """The spec of engines started beside rule fetch_model has no versions yet (no
    marker): their registry entries take them from the marker once it is written."""
    from engine import vllm_server
    from formats.marker import write_marker

    marker = tmp_path / "marker.json"
    versions = {"vllm": "9.9.9", "torch": "2.0", "ipex": None}
    write_marker(marker, {"path": "unused", "versions": versions})
    started, pool = service(**{vllm_server.GO_FILE_VARIABLE: str(marker)})
    echo_rank(tmp_path, 0, ["one"], pool)
    entries = registry_format.read_registry(started.registry)
    assert entries and all(entry["versions"] == versions for entry in entries.values())
