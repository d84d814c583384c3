"""The warm engines of one PBS submission (config warm_engines with profiles/aurora).

pbs-submit writes ``<job>.engines.json`` (the spec, formats/engine_spec.py) and
``<job>.nodes.json`` (each node's share of the ranks and the group job's Snakemake
command) next to the job script and puts into that script, after the model is staged:

    python supervisor.py launch SPEC &     ONE launcher call starts every engine of the job
    python supervisor.py stop SPEC         at exit: engines down, the launcher ended

``launch`` reads PBS_NODEFILE and runs config ``engine_launcher`` once, e.g. PALS
``mpiexec -n {engines} --ppn {engines_per_node} --cpu-bind list:{cpu_lists}`` (one
process per engine, each taking its tile from its local rank index, as in the seed),
or ``pbsdsh --`` (one process per node, running all its node's engines). Each such
process (``node``) finds its node (tiles.this_host) and its share of the node's tile
slots (local rank i of n takes slots i, i+n, ...), starts one server per slot
(lifecycle.Engine: scripts/engine/vllm_server.py or vLLM's OpenAI server, or echo_server.py for
``engine: echo``) listening on the node's loopback address (config warm.listen),
restarts one that exits (warm.max_restarts), and reports each engine's state in the
registry, a folder on the shared file system:
``<logs/engines>/<job id>/<host>-tile<N>.json`` (and ``.log``; the format:
scripts/formats/registry.py). Engines end when
``stop`` asks, when their process is killed (the lifeline of lifecycle.Engine), or when
PBS ends the job.

``ranks`` runs config ``node_launcher`` once (e.g. ``mpiexec -n {nodes} --ppn 1``);
each ``ranks-node`` process runs its node's share of the ranks in a Snakemake of its
own (threads, on the CPUs no engine is bound to), and `RegistryPool` routes each rank
to the least busy ready engine of that node.

Stdlib only.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # run as a file: scripts/, not this file's folder, on the path
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import console
from engine import client, lifecycle, vllm_server, watchdog
from formats import engine_spec, staged_model
from formats.files import safe_name
from formats.marker import marker_versions
from formats.registry import (
    ENDED,
    FAILED,
    LAUNCHER_EXIT,
    LAUNCHER_PID,
    READY,
    RESTARTING,
    STARTING,
    STOP_FILE,
    STOPPED,
    engine_file,
    read_registry,
    registry_dir,
    write_launcher_exit,
    write_state,
)
from placement import launcher, node_layout, tiles
from placement.ports import engine_port, internal_ports, next_free_block

SPEC_VARIABLE = "AURORA_ENGINES"
ECHO_SERVER = Path(__file__).with_name("echo_server.py")
# Seconds between a node process's looks at its engines and at the stop file.
NODE_POLL_S = 2.0


def _log(message: str) -> None:
    console.say(f"engines: {message}")


# vLLM's refusals that no restart cures: the model with its context (vllm.max_model_len,
# null: the model's full context) does not fit a tile's memory. Messages of
# vllm/v1/core/kv_cache_utils.py _check_enough_kv_cache_memory, in 0.15.0 ("models's max
# seq len") and 0.32.0 ("model's max seq len").
DOES_NOT_FIT = (
    "cache is needed, which is larger than the available KV cache memory",
    "No available memory for the cache blocks",
)
DOES_NOT_FIT_HINT = (
    "the model does not fit the engine's tiles: set config key vllm.max_model_len (ALCF's "
    "examples use 8192), or more tiles per engine (tiles.per_job), or raise "
    "vllm.gpu_memory_utilization"
)


def does_not_fit(log_path: Path | str) -> str | None:
    """The reason, when an engine's log says that the model does not fit (vLLM's line
    quoted); None otherwise."""
    try:
        with open(log_path, "rb") as log:
            log.seek(0, os.SEEK_END)
            log.seek(max(0, log.tell() - 65536))
            text = log.read().decode(errors="replace")
    except OSError:
        return None
    for line in reversed(text.splitlines()):
        if any(pattern in line for pattern in DOES_NOT_FIT):
            return f"{DOES_NOT_FIT_HINT}; vLLM said: {line.strip()[:600]}"
    return None


# ----------------------------------------------------------------------------- layout


def job_hosts(environ: Mapping[str, str]) -> tuple[str, list[str]]:
    """The job id and its hosts (PBS_NODEFILE order), inside a PBS job."""
    job = environ.get("PBS_JOBID")
    if not job or not environ.get("PBS_NODEFILE"):
        raise SystemExit("serve: PBS_JOBID or PBS_NODEFILE is not set (not in a PBS job)")
    return job, tiles.read_hosts(environ)


def spec_api_key(spec: Mapping) -> str | None:
    """The submission's engine key, from the 0600 file pbs-submit wrote (none: no key)."""
    path = spec.get("api_key_file")
    return Path(path).read_text().strip() if path else None


def listen_address(spec: Mapping, host: str) -> str:
    """The address an engine of ``host`` listens on (config warm.listen): a loopback
    address, so that only processes of its own node reach it. "{host}" stands for the
    node's name (the test cluster gives each of its hosts a loopback address)."""
    address = str(spec.get("listen") or "127.0.0.1").replace("{host}", host)
    try:
        infos = socket.getaddrinfo(address, None, type=socket.SOCK_STREAM)
    except OSError as error:
        raise client.EngineStartError(
            f"config key warm.listen: {address!r} does not resolve: {error}"
        ) from None
    outside = lifecycle.not_loopback(infos)
    if outside:
        raise client.EngineStartError(lifecycle.not_loopback_message(address, outside))
    return infos[0][4][0]


# ----------------------------------------------------------------------------- engines


def spec_ready_timeout(spec: Mapping) -> float:
    """config warm.ready_timeout_s, else from the model's size (lifecycle.ready_timeout)."""
    return lifecycle.ready_timeout(spec["ready_timeout_s"], spec.get("weights_bytes"))


def engine_model(spec: Mapping, job_id: str, host: str) -> str:
    """The node's staged copy (config weights.stage), else the shared folder."""
    if spec["stage"]:
        return str(staged_model.staged_path(spec["stage_dir"], job_id, host, spec["model"]))
    return spec["model"]


def make_engine(
    spec: Mapping, slot: node_layout.Slot, job_id: str, registry: Path, environ=os.environ
) -> lifecycle.Engine:
    """The server of one slot, listening on its node's loopback address (config
    warm.listen), its internal ports too: the node's own Snakemake is its only client."""
    placement = spec["tiles"]
    hierarchy = tiles.resolve_hierarchy(placement["hierarchy"], environ)
    tmp_root = launcher.default_tmp_root(environ) / safe_name(slot.host)
    env = tiles.engine_env(slot, hierarchy, placement["base_port"], tmp_root)
    address = listen_address(spec, slot.host)
    env["VLLM_HOST_IP"] = env["MASTER_ADDR"] = address
    port = engine_port(spec, slot)
    settings = spec["vllm"]
    if spec["engine"] == "echo":
        argv = [spec["python"], str(ECHO_SERVER), "--host", address, "--port", str(port)]
        argv += settings.get("engine_args") or []  # vLLM's flags: the few it takes, it keeps
    else:
        argv = lifecycle.server_argv(
            spec["python"],
            engine_model(spec, job_id, slot.host),
            port,
            settings,
            len(slot.tiles),
            host=address,
            server=spec["server"],
        )
        if spec.get("prepare") and argv[1] == str(lifecycle.INPROCESS_SERVER):
            argv = [argv[0], *spec["prepare"], *argv[2:]]  # beside rule fetch_model
    base = {**environ, **spec["env"]}
    cache = (
        staged_model.staged_cache_root(spec["stage_dir"], job_id, slot.host)
        if spec["stage"]
        else None
    )
    if cache is not None and cache.is_dir():  # the node's copy (scripts/model/stage.py)
        base["VLLM_CACHE_ROOT"] = str(cache)
    env = lifecycle.engine_environment(env, settings, base)
    # The node's clients, and vLLM's own requests, must not go through the proxy.
    for name in ("no_proxy", "NO_PROXY"):
        env[name] = ",".join(dict.fromkeys([*env[name].split(","), address]))
    return lifecycle.Engine(
        argv,
        env,
        registry / f"{engine_file(slot)}.log",
        port,
        host=address,
        name=f"{slot.host}/tile{node_layout.tile_ids(slot.tiles)}",
        max_restarts=spec["max_restarts"],
        api_key=spec_api_key(spec),
    )


@dataclass
class _Supervised:
    engine: lifecycle.Engine
    path: Path
    slot: node_layout.Slot
    base_port: int  # the engine's block (placement.ports)
    state: str = STARTING
    busy: bool = False  # a thread is starting it
    # what took its ports, for its registry entry ("port_conflicts") and the run's output
    conflicts: list[str] = field(default_factory=list)


def _move(member: _Supervised, error: lifecycle.PortTaken) -> None:
    """After a port conflict: the engine's next free block, for its restart."""
    engine = member.engine
    engine.stop()
    base = next_free_block(member.slot, member.base_port, engine.host)
    if base is None:
        raise client.EngineStartError(f"{error}; no free block of ports left") from None
    member.base_port = base
    vllm_port, master_port = internal_ports(member.slot, base)
    port = engine_port({"tiles": {"base_port": base}}, member.slot)
    engine.move(port, {"VLLM_PORT": str(vllm_port), "MASTER_PORT": str(master_port)})
    member.conflicts.append(f"{error}; moved to port {port}")
    _log(member.conflicts[-1])


def node(
    spec_path: str, job_id: str, hosts: Sequence[str], environ=os.environ, lifeline: bool = False
) -> int:
    """The engines of this launcher process: start, report, restart, stop.

    ``lifeline``: standard input is a pipe from the owner (a local run's Snakemake):
    end of file, even after a SIGKILL of the owner, stops the engines."""
    spec = engine_spec.read_spec(spec_path)
    registry = registry_dir(spec, job_id)
    host = tiles.this_host(hosts, environ)
    index, count = tiles.local_rank(environ)
    placement = spec["tiles"]
    slots = node_layout.engine_slots(placement["per_node"], placement["per_job"], host)
    slots = slots[index::count]
    stopping = threading.Event()
    fatal: list[str] = []  # a reason no restart cures (does_not_fit)

    ready_s = spec_ready_timeout(spec)

    def report(member: _Supervised, state: str, **extra) -> None:
        if member.conflicts:
            extra["port_conflicts"] = member.conflicts
        # engines started beside rule fetch_model: the versions of the marker they waited for
        waited = spec["env"].get(vllm_server.GO_FILE_VARIABLE)
        versions = spec.get("versions") or marker_versions(waited, quiet=True)
        write_state(member.path, member.engine, state, versions=versions, **extra)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda *_: stopping.set())
    if lifeline:
        threading.Thread(target=_watch_owner, args=(stopping,), daemon=True).start()
    else:  # in a PBS job: end with the launcher's task or with the job
        watchdog.end_with_job(environ)
    members = [
        _Supervised(
            make_engine(spec, slot, job_id, registry, environ),
            registry / f"{engine_file(slot)}.json",
            slot,
            placement["base_port"],
        )
        for slot in slots
    ]
    _log(f"{host}: local rank {index} of {count}: {len(members)} engine(s)")
    lock = threading.Lock()

    def bring_up(member: _Supervised, restart: bool) -> None:
        engine = member.engine
        try:
            while True:
                try:
                    if restart:
                        report(member, RESTARTING)
                        seconds = engine.restart(ready_s)
                    else:
                        engine.start()
                        seconds = engine.wait_ready(ready_s)
                    break
                # Another process on its port: a new block, and a restart (warm.max_restarts).
                except lifecycle.PortTaken as error:
                    _move(member, error)
                    restart = True
            state, extra = READY, {"ready_s": round(seconds, 3)}
        # Whatever it was: an engine left "starting" would never be restarted.
        except Exception as error:
            engine.stop()
            state, extra = FAILED, {"error": str(error)[:2000]}
            if reason := does_not_fit(engine.log_path):
                # The node's other engines run the same model on the same tiles: they
                # fail the same way. Stop them now rather than at their ready timeout.
                extra = {"error": reason, "cause": "does_not_fit"}
                fatal.append(reason)
                stopping.set()
            _log(f"{engine.name}: {extra['error']}")
        with lock:
            if not stopping.is_set() or extra.get("cause"):
                member.state = state
                report(member, state, **extra)
            member.busy = False

    def launch(member: _Supervised, restart: bool) -> None:
        member.busy = True
        threading.Thread(target=bring_up, args=(member, restart), daemon=True).start()

    for member in members:
        report(member, STARTING)
        launch(member, restart=False)
    stop_file = registry / STOP_FILE
    while not stopping.wait(NODE_POLL_S):
        if stop_file.exists():
            break
        with lock:
            for member in members:
                if member.state == READY and not member.busy and not member.engine.alive():
                    if member.engine.restarts >= member.engine.max_restarts:
                        member.state = FAILED
                        report(member, FAILED, error="exited")
                    else:
                        _log(f"{member.engine.name} exited; restarting it")
                        launch(member, restart=True)
    stopping.set()
    # All at once: a vLLM server takes seconds to shut down. Closed: a thread still
    # bringing one up (moving it off a taken port, restarting it) cannot start it again.
    stoppers = [threading.Thread(target=m.engine.close) for m in members]
    for thread in stoppers:
        thread.start()
    for member, thread in zip(members, stoppers, strict=True):
        thread.join()
        # A failed engine's entry keeps its error; nothing is written after the job's end.
        if watchdog.job_gone(environ):
            continue
        if fatal and member.state != FAILED:
            # failed, not stopped: the ranks' pool gives up once every engine has failed.
            member.state = FAILED
            report(member, FAILED, error=fatal[0], cause="does_not_fit")
        elif member.state != FAILED:
            report(member, STOPPED)
    _log(f"{host}: engines stopped" + (f": {fatal[0]}" if fatal else ""))
    return 1 if fatal else 0


def _watch_owner(stopping: threading.Event) -> None:
    with contextlib.suppress(OSError):
        while os.read(0, 4096):
            pass
    _log("owner is gone (lifeline closed); stopping the engines")
    stopping.set()


# ----------------------------------------------------------------------------- job script


def forward_signals(process: subprocess.Popen) -> None:
    """SIGTERM, SIGINT and SIGHUP of this process go on to ``process`` (a launcher or a
    node's Snakemake), which ends its own children."""

    def forward(signum, _frame):
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signum)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)


def launch(spec_path: str, environ=os.environ) -> int:
    """The one launcher call of the submission; runs until the engines end."""
    spec = engine_spec.read_spec(spec_path)
    job_id, hosts = job_hosts(environ)
    registry = registry_dir(spec, job_id)
    registry.mkdir(parents=True, exist_ok=True)
    for name in (STOP_FILE, LAUNCHER_EXIT):
        (registry / name).unlink(missing_ok=True)
    argv = launcher.engine_launcher_argv(spec, hosts) + [
        spec["python"],
        os.path.abspath(__file__),
        "node",
        os.path.abspath(spec_path),
        job_id,
        ",".join(hosts),
    ]
    per_host = node_layout.engines_per_node(spec["tiles"]["per_node"], spec["tiles"]["per_job"])
    _log(
        f"launcher call for {per_host * len(hosts)} engine(s) on {len(hosts)} node(s): "
        f"{json.dumps(argv)}"
    )
    process = subprocess.Popen(argv, stdin=subprocess.DEVNULL)
    (registry / LAUNCHER_PID).write_text(f"{os.getpid()}\n")
    forward_signals(process)
    code = process.wait()
    _log(f"launcher exited with status {code}")
    # The ranks stop waiting for engines that will never come (see RegistryPool).
    write_launcher_exit(registry, code)
    return code


def stop(spec_path: str, environ=os.environ, grace: float = 60.0) -> int:
    """Ask every engine of the job to stop; wait for them (at most ``grace`` s), then
    end the launcher."""
    spec = engine_spec.read_spec(spec_path)
    job_id = environ.get("PBS_JOBID", "")
    registry = registry_dir(spec, job_id)
    if not registry.is_dir():
        return 0
    if watchdog.job_gone(environ):
        # The job script's exit trap after PBS ended the job: its node processes end by
        # their lifelines, and nothing is written into the run folder after the job's end.
        _log(f"job {job_id} has ended; its engines end with it")
        return 0
    (registry / STOP_FILE).write_text("stop\n")
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        states = [entry.get("state") for entry in read_registry(registry).values()]
        # No node process is left to report once the launcher has ended.
        if all(s in ENDED for s in states) or (registry / LAUNCHER_EXIT).exists():
            break
        time.sleep(0.5)
    pid_file = registry / LAUNCHER_PID
    with contextlib.suppress(OSError, ValueError):
        os.kill(int(pid_file.read_text()), signal.SIGTERM)
    left = [
        entry.get("name", name)
        for name, entry in read_registry(registry).items()
        if entry.get("state") not in ENDED
    ]
    _log(f"stopped the engines of job {job_id}" + (f"; not confirmed: {left}" if left else ""))
    return 0


# ----------------------------------------------------------------------------- ranks


# ----------------------------------------------------------------------------- client


# ----------------------------------------------------------------------------- local run


# ----------------------------------------------------------------------------- main

USAGE = "usage: supervisor.py launch SPEC | stop SPEC | node SPEC JOB_ID HOST,... [--lifeline]"


def main(argv: Sequence[str]) -> int:
    if len(argv) == 2 and argv[0] in ("launch", "stop"):
        return (launch if argv[0] == "launch" else stop)(argv[1])
    if len(argv) in (4, 5) and argv[0] == "node" and argv[4:] in ([], ["--lifeline"]):
        return node(argv[1], argv[2], argv[3].split(","), lifeline=len(argv) == 5)
    print(USAGE, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
