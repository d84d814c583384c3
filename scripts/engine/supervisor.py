"""The warm engines of one PBS submission (config warm_engines with profiles/aurora).

pbs-submit writes ``<job>.engines.json`` (the spec) and ``<job>.nodes.json`` (each
node's share of the ranks and the group job's Snakemake command) next to the job
script and puts into that script, after the model is staged:

    python supervisor.py launch SPEC &     ONE launcher call starts every engine of the job
    python supervisor.py ranks SPEC NODES  ONE launcher call runs a Snakemake on every node
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
``<logs/engines>/<job id>/<host>-tile<N>.json`` (and ``.log``). Engines end when
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
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # run as a file: scripts/, not this file's folder, on the path
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from model import stage
from placement import tiles
from rank import prompts
from reporting import console

from engine import client, lifecycle

SPEC_VARIABLE = "AURORA_ENGINES"
ECHO_SERVER = Path(__file__).with_name("echo_server.py")
STOP_FILE = "stop"
LAUNCHER_EXIT = "launcher.exit"
# Seconds between a node process's looks at its engines and at the stop file.
NODE_POLL_S = 2.0
# Seconds between the client's reads of the registry: while engines start or restart,
# and once all have settled.
REFRESH_S = 1.0
SETTLED_REFRESH_S = 10.0


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)


def _log(message: str) -> None:
    console.say(f"engines: {message}")


# ----------------------------------------------------------------------------- layout


def engine_port(spec: Mapping, slot: tiles.Slot) -> int:
    return api_port(spec["tiles"]["base_port"], slot)


def api_port(base_port: int, slot: tiles.Slot) -> int:
    # apart from the internal ports (tiles.internal_ports: base + 10 t upwards)
    return base_port + 1000 + slot.tiles[0]


def _port_taken(address: str, port: int) -> bool:
    """Whether something listens on ``port`` of ``address``: a bind as the servers make
    it (SO_REUSEADDR: a port in TIME_WAIT is free) fails."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((address, port))
        except OSError:
            return True
    return False


def free_base_port(spec: Mapping, host: str, tries: int = 16) -> int:
    """tiles.base_port, or the first base 2,000 ports up from it whose engine ports (API,
    VLLM_PORT, MASTER_PORT of every slot) are all free on ``host``'s listen address.
    A local run's case: another run on this machine may hold them (a PBS node is its
    job's own). Nothing free: tiles.base_port (the engines' logs then say why)."""
    address = listen_address(spec, host)
    placement = spec["tiles"]
    slots = tiles.engine_slots(placement["per_node"], placement["per_job"], host)
    for step in range(tries):
        base = placement["base_port"] + 2000 * step
        ports = [api_port(base, slot) for slot in slots]
        ports += [port for slot in slots for port in tiles.internal_ports(slot, base)]
        if max(ports) > 65535:
            break
        if not any(_port_taken(address, port) for port in ports):
            return base
    return placement["base_port"]


def engine_file(slot: tiles.Slot) -> str:
    """The engine's name in the registry (``.json`` state, ``.log`` output)."""
    return f"{_safe(slot.host)}-tile{slot.tiles[0]}"


def registry_dir(spec: Mapping, job_id: str) -> Path:
    return Path(spec["registry_root"]) / _safe(job_id)


def job_hosts(environ: Mapping[str, str]) -> tuple[str, list[str]]:
    """The job id and its hosts (PBS_NODEFILE order), inside a PBS job."""
    job = environ.get("PBS_JOBID")
    if not job or not environ.get("PBS_NODEFILE"):
        raise SystemExit("serve: PBS_JOBID or PBS_NODEFILE is not set (not in a PBS job)")
    return job, tiles.read_hosts(environ)


def launcher_argv(spec: Mapping, hosts: Sequence[str]) -> list[str]:
    """config engine_launcher with {nodes}, {engines}, {engines_per_node}, {cpu_lists}."""
    per_node, per_job = spec["tiles"]["per_node"], spec["tiles"]["per_job"]
    per_host = per_node // per_job
    binds = spec["tiles"]["cpu_bind"]
    # One CPU list per engine (a TP engine gets the lists of all its tiles).
    cpu_lists = ":".join(
        ",".join(binds[t] for t in slot.tiles if t < len(binds))
        for slot in tiles.engine_slots(per_node, per_job, "")
    )
    values = {
        "nodes": str(len(hosts)),
        "engines": str(per_host * len(hosts)),
        "engines_per_node": str(per_host),
        "cpu_lists": cpu_lists,
    }
    return tiles.render_launcher(spec["launcher"], values, "engine_launcher")


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
        return str(stage.staged_path(spec["stage_dir"], job_id, host, spec["model"]))
    return spec["model"]


def make_engine(
    spec: Mapping, slot: tiles.Slot, job_id: str, registry: Path, environ=os.environ
) -> lifecycle.Engine:
    """The server of one slot, listening on its node's loopback address (config
    warm.listen), its internal ports too: the node's own Snakemake is its only client."""
    placement = spec["tiles"]
    hierarchy = tiles.resolve_hierarchy(placement["hierarchy"], environ)
    tmp_root = tiles.default_tmp_root(environ) / _safe(slot.host)
    env = tiles.engine_env(slot, hierarchy, placement["base_port"], tmp_root)
    address = listen_address(spec, slot.host)
    env["VLLM_HOST_IP"] = env["MASTER_ADDR"] = address
    port = engine_port(spec, slot)
    settings = spec["vllm"]
    if spec["engine"] == "echo":
        argv = [spec["python"], str(ECHO_SERVER), "--host", address, "--port", str(port)]
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
    base = {**environ, **spec["env"]}
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
        name=f"{slot.host}/tile{tiles.tile_ids(slot.tiles)}",
        max_restarts=spec["max_restarts"],
        api_key=spec_api_key(spec),
    )


def write_state(
    path: Path, engine: lifecycle.Engine, state: str, versions: Mapping | None = None, **extra
) -> None:
    """One engine's registry entry, replaced atomically; ``versions``: vLLM, torch and
    IPEX as rule fetch_model found them (the spec's)."""
    record = {
        "name": engine.name,
        "url": engine.url,
        "log": str(engine.log_path),
        "state": state,
        "restarts": engine.restarts,
        "time": time.time(),
        "env": {k: engine.env.get(k, "") for k in ("ZE_AFFINITY_MASK", "TILE_HOST", "TILE_IDS")},
        "versions": dict(versions or {}),
        # first start and first ready (epoch s), seconds of restarts: reporting/accounting.py
        "started_at": engine.started_at,
        "ready_at": engine.ready_at,
        "restart_s": round(engine.restart_s, 3),
        **extra,
    }
    prompts.write_atomic(path, json.dumps(record))


@dataclass
class _Supervised:
    engine: lifecycle.Engine
    path: Path
    state: str = "starting"
    busy: bool = False  # a thread is starting it


def node(
    spec_path: str, job_id: str, hosts: Sequence[str], environ=os.environ, lifeline: bool = False
) -> int:
    """The engines of this launcher process: start, report, restart, stop.

    ``lifeline``: standard input is a pipe from the owner (a local run's Snakemake):
    end of file, even after a SIGKILL of the owner, stops the engines."""
    spec = json.loads(Path(spec_path).read_text())
    registry = registry_dir(spec, job_id)
    host = tiles.this_host(hosts, environ)
    index, count = tiles.local_rank(environ)
    placement = spec["tiles"]
    slots = tiles.engine_slots(placement["per_node"], placement["per_job"], host)[index::count]
    stopping = threading.Event()

    ready_s = spec_ready_timeout(spec)

    def report(path: Path, engine: lifecycle.Engine, state: str, **extra) -> None:
        write_state(path, engine, state, versions=spec.get("versions"), **extra)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda *_: stopping.set())
    if lifeline:
        threading.Thread(target=_watch_owner, args=(stopping,), daemon=True).start()
    members = [
        _Supervised(
            make_engine(spec, slot, job_id, registry, environ),
            registry / f"{engine_file(slot)}.json",
        )
        for slot in slots
    ]
    _log(f"{host}: local rank {index} of {count}: {len(members)} engine(s)")
    lock = threading.Lock()

    def bring_up(member: _Supervised, restart: bool) -> None:
        engine = member.engine
        try:
            if restart:
                report(member.path, engine, "restarting")
                seconds = engine.restart(ready_s)
            else:
                engine.start()
                seconds = engine.wait_ready(ready_s)
            state, extra = "ready", {"ready_s": round(seconds, 3)}
        # Whatever it was: an engine left "starting" would never be restarted.
        except Exception as error:
            engine.stop()
            state, extra = "failed", {"error": str(error)[:2000]}
            _log(f"{engine.name}: {error}")
        with lock:
            if not stopping.is_set():
                member.state = state
                report(member.path, engine, state, **extra)
            member.busy = False

    def launch(member: _Supervised, restart: bool) -> None:
        member.busy = True
        threading.Thread(target=bring_up, args=(member, restart), daemon=True).start()

    for member in members:
        report(member.path, member.engine, "starting")
        launch(member, restart=False)
    stop_file = registry / STOP_FILE
    while not stopping.wait(NODE_POLL_S):
        if stop_file.exists():
            break
        with lock:
            for member in members:
                if member.state == "ready" and not member.busy and not member.engine.alive():
                    if member.engine.restarts >= member.engine.max_restarts:
                        member.state = "failed"
                        report(member.path, member.engine, "failed", error="exited")
                    else:
                        _log(f"{member.engine.name} exited; restarting it")
                        launch(member, restart=True)
    stopping.set()
    # All at once: a vLLM server takes seconds to shut down.
    stoppers = [threading.Thread(target=m.engine.stop) for m in members]
    for thread in stoppers:
        thread.start()
    for member, thread in zip(members, stoppers, strict=True):
        thread.join()
        if member.state != "failed":  # a failed engine's entry keeps its error
            report(member.path, member.engine, "stopped")
    _log(f"{host}: engines stopped")
    return 0


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
    spec = json.loads(Path(spec_path).read_text())
    job_id, hosts = job_hosts(environ)
    registry = registry_dir(spec, job_id)
    registry.mkdir(parents=True, exist_ok=True)
    for name in (STOP_FILE, LAUNCHER_EXIT):
        (registry / name).unlink(missing_ok=True)
    argv = launcher_argv(spec, hosts) + [
        spec["python"],
        os.path.abspath(__file__),
        "node",
        os.path.abspath(spec_path),
        job_id,
        ",".join(hosts),
    ]
    per_host = spec["tiles"]["per_node"] // spec["tiles"]["per_job"]
    _log(
        f"launcher call for {per_host * len(hosts)} engine(s) on {len(hosts)} node(s): "
        f"{json.dumps(argv)}"
    )
    process = subprocess.Popen(argv, stdin=subprocess.DEVNULL)
    (registry / "launcher.pid").write_text(f"{os.getpid()}\n")
    forward_signals(process)
    code = process.wait()
    _log(f"launcher exited with status {code}")
    # The ranks stop waiting for engines that will never come (see RegistryPool).
    (registry / LAUNCHER_EXIT).write_text(f"{code}\n")
    return code


def stop(spec_path: str, environ=os.environ, grace: float = 60.0) -> int:
    """Ask every engine of the job to stop; wait for them (at most ``grace`` s), then
    end the launcher."""
    spec = json.loads(Path(spec_path).read_text())
    job_id = environ.get("PBS_JOBID", "")
    registry = registry_dir(spec, job_id)
    if not registry.is_dir():
        return 0
    (registry / STOP_FILE).write_text("stop\n")
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        states = [entry.get("state") for entry in read_registry(registry).values()]
        # No node process is left to report once the launcher has ended.
        if all(s in ("stopped", "failed") for s in states) or (registry / LAUNCHER_EXIT).exists():
            break
        time.sleep(0.5)
    pid_file = registry / "launcher.pid"
    with contextlib.suppress(OSError, ValueError):
        os.kill(int(pid_file.read_text()), signal.SIGTERM)
    left = [
        entry.get("name", name)
        for name, entry in read_registry(registry).items()
        if entry.get("state") not in ("stopped", "failed")
    ]
    _log(f"stopped the engines of job {job_id}" + (f"; not confirmed: {left}" if left else ""))
    return 0


def read_registry(registry: Path) -> dict[str, dict]:
    """Registry file name (without .json) -> its entry; unreadable entries are skipped
    (being replaced right now: the next read gets them)."""
    found = {}
    with contextlib.suppress(FileNotFoundError):
        for entry in os.scandir(registry):
            if entry.name.endswith(".json") and not entry.name.startswith("."):
                with contextlib.suppress(OSError, ValueError):
                    found[entry.name[:-5]] = json.loads(Path(entry.path).read_text())
    return found


# ----------------------------------------------------------------------------- ranks


def cpu_numbers(lists: Sequence[str]) -> set[int]:
    """CPU numbers of config tiles.cpu_bind lists ("1-8", "53-60,61")."""
    found = set()
    for text in lists:
        for part in str(text).split(","):
            first, _, last = part.strip().partition("-")
            if first.isdigit():
                found.update(range(int(first), int(last or first) + 1))
    return found


def cpu_list_text(cpus: set[int]) -> str:
    """ "0,52-60" for {0, 52, ..., 60}."""
    parts, run = [], []
    for cpu in sorted(cpus):
        if run and cpu != run[-1] + 1:
            parts.append(run)
            run = []
        run.append(cpu)
    if run:
        parts.append(run)
    return ",".join(f"{r[0]}-{r[-1]}" if len(r) > 1 else str(r[0]) for r in parts)


def node_share(nodes: Mapping, index: int, count: int) -> list[int]:
    """The ranks of the node at ``index`` of ``count`` (share i goes to node i mod count:
    PBS gave fewer nodes than planned only if the plan was wrong, and no rank is lost)."""
    shares = nodes["shares"]
    return sorted(r for i, share in enumerate(shares) if i % count == index for r in share)


def ranks_dir(spec: Mapping, job_id: str) -> Path:
    """Where each node's Snakemake leaves its exit status (``<host>.exit``)."""
    return registry_dir(spec, job_id) / "ranks"


def ranks(spec_path: str, nodes_path: str, environ=os.environ) -> int:
    """The job's ranks: ONE launcher call (config node_launcher) runs ``ranks-node`` on
    every node; fails unless every node with ranks reported success."""
    spec_path, nodes_path = os.path.abspath(spec_path), os.path.abspath(nodes_path)
    spec = json.loads(Path(spec_path).read_text())
    nodes = json.loads(Path(nodes_path).read_text())
    job_id, hosts = job_hosts(environ)
    done = ranks_dir(spec, job_id)
    done.mkdir(parents=True, exist_ok=True)
    for old in done.glob("*.exit"):
        old.unlink()
    command = [spec["python"], os.path.abspath(__file__), "ranks-node", spec_path, nodes_path]
    command += [job_id, ",".join(hosts)]
    if nodes["node_launcher"]:
        launcher = stage.launcher_argv(nodes["node_launcher"], len(hosts))
    elif len(hosts) == 1:
        launcher = []  # the job's own node is its only one
    else:
        raise SystemExit(
            f"ranks: config key node_launcher is empty but the job has {len(hosts)} nodes: "
            "each node's ranks run on that node, started by one launcher call"
        )
    argv = launcher + command
    _log(f"ranks: launcher call for {len(hosts)} node Snakemake(s): {json.dumps(argv)}")
    try:
        process = subprocess.Popen(argv, stdin=subprocess.DEVNULL)
    except OSError as error:
        _log(f"ranks: cannot run the launcher (config key node_launcher): {error}")
        return 1
    forward_signals(process)
    code = process.wait()
    failed = []
    for index, host in enumerate(hosts):
        if not node_share(nodes, index, len(hosts)):
            continue
        try:
            status = (done / f"{_safe(host)}.exit").read_text().strip()
        except OSError:
            status = "no report (its Snakemake never ended)"
        if status != "0":
            failed.append(f"{host}: {status}")
    if failed:
        _log(f"ranks: launcher exited with status {code}; node Snakemakes failed: {failed}")
        return 1
    _log(f"ranks: every node's Snakemake succeeded (launcher status {code})")
    return 0


def ranks_node(
    spec_path: str, nodes_path: str, job_id: str, hosts: Sequence[str], environ=os.environ
) -> int:
    """This node's Snakemake: its share of the job's ranks, as threads, against this
    node's engines only, on CPUs no engine is bound to (config tiles.cpu_bind)."""
    spec = json.loads(Path(spec_path).read_text())
    nodes = json.loads(Path(nodes_path).read_text())
    host = tiles.this_host(hosts, environ)
    share = node_share(nodes, hosts.index(host), len(hosts))
    report = ranks_dir(spec, job_id) / f"{_safe(host)}.exit"
    if not share:
        _log(f"ranks: {host}: no ranks")
        prompts.write_atomic(report, "0\n")
        return 0
    cpus = set(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else set()
    free = cpus - cpu_numbers(spec["tiles"]["cpu_bind"])
    pin = None
    if free and free != cpus:
        # In the child before it runs: every thread of its Snakemake stays off the
        # engines' cores.
        def pin():
            os.sched_setaffinity(0, free)

    rules = nodes.get("rules", {})  # infer_jsonl for a .jsonl rank
    argv = nodes["argv"] + [
        "--target-jobs",
        *(f"{rules.get(str(r), 'infer')}:rank={r}" for r in share),
    ]
    env = {**environ, SPEC_VARIABLE: spec_path, lifecycle.NODE_VARIABLE: host, "PBS_JOBID": job_id}
    on = f"CPUs {cpu_list_text(free)}" if pin else "all its CPUs"
    _log(f"ranks: {host}: {len(share)} rank(s) in one Snakemake on {on}")
    process = subprocess.Popen(
        argv, cwd=nodes["workdir"], env=env, stdin=subprocess.DEVNULL, preexec_fn=pin
    )
    forward_signals(process)
    code = process.wait()
    prompts.write_atomic(report, f"{code}\n")
    _log(f"ranks: {host}: its Snakemake exited with status {code}")
    return code


# ----------------------------------------------------------------------------- client


@dataclass(frozen=True)
class RemoteEngine:
    """What a rank needs of an engine on another node (as lifecycle.Engine offers it)."""

    name: str
    url: str
    log_path: str
    env: dict = field(default_factory=dict, compare=False, hash=False)
    api_key: str | None = field(default=None, compare=False, hash=False, repr=False)


def spec_api_key(spec: Mapping) -> str | None:
    """The submission's engine key, from the 0600 file pbs-submit wrote (none: no key)."""
    path = spec.get("api_key_file")
    return Path(path).read_text().strip() if path else None


@dataclass
class _Remote:
    file: str
    engine: RemoteEngine | None = None
    state: str = "starting"  # starting, ready, suspect, restarting, failed, stopped
    in_flight: int = 0
    suspect_since: float = 0.0


PBS_LAUNCHER = (
    "the engines' launcher (config engine_launcher) exited with status {status} "
    "(the job's PBS log has its output)"
)


class RegistryPool:
    """The engines of a PBS job's node, or of a local run, as the registry reports
    them; what infer.serve_rank routes through (`route`, `mark_failed`).

    Ranks wait while no engine is ready; a rank fails, naming engine logs, when none
    became ready within ``ready_timeout`` seconds of the pool's creation, or when all
    have failed. An engine a rank found unavailable is left out until its node
    process reports it restarted, or it answers /health again.
    """

    def __init__(
        self,
        registry: Path,
        expected: Sequence[str],
        max_in_flight: int,
        ready_timeout: float,
        clock=time.monotonic,
        stall_timeout: float = 600.0,
        api_key: str | None = None,
        scope: str = "this job",
        launcher: str = PBS_LAUNCHER,
    ):
        self.registry = Path(registry)
        self.scope = scope  # what the engines are, for messages
        self.launcher = launcher  # what started them, for messages
        self.members = {name: _Remote(name) for name in expected}
        self.max_in_flight = max_in_flight
        self.ready_timeout = ready_timeout
        self.stall_timeout = stall_timeout
        self.api_key = api_key
        self.clock = clock
        self.created = clock()
        self._progress_at = self.created  # a request slot freed or an engine's state changed
        self._cond = threading.Condition()
        self._read_at = -1.0
        self._mtimes: dict[str, float] = {}
        self._launcher_exit: int | None = None

    @classmethod
    def for_job(cls, spec: Mapping, environ=os.environ) -> RegistryPool:
        """The engines of this node (``ranks-node`` names it), else of the whole job."""
        if environ.get(lifecycle.NODE_VARIABLE) and environ.get("PBS_JOBID"):
            host = environ[lifecycle.NODE_VARIABLE]
            return cls.for_hosts(spec, environ["PBS_JOBID"], [host], f"node {host}")
        job_id, hosts = job_hosts(environ)
        return cls.for_hosts(spec, job_id, hosts, "this job")

    @classmethod
    def for_hosts(
        cls,
        spec: Mapping,
        job_id: str,
        hosts: Sequence[str],
        scope: str,
        launcher: str = PBS_LAUNCHER,
    ) -> RegistryPool:
        """The engines that ``node`` starts for ``hosts`` under ``job_id``."""
        per_node, per_job = spec["tiles"]["per_node"], spec["tiles"]["per_job"]
        expected = [
            engine_file(slot)
            for host in hosts
            for slot in tiles.engine_slots(per_node, per_job, host)
        ]
        return cls(
            registry_dir(spec, job_id),
            expected,
            spec["ranks_in_flight"],
            spec_ready_timeout(spec),
            stall_timeout=spec["stall_timeout_s"],
            api_key=spec_api_key(spec),
            scope=scope,
            launcher=launcher,
        )

    def _refresh(self) -> None:
        """Read the registry entries that changed (at most every REFRESH_S); with the
        condition held."""
        now = self.clock()
        # Once every engine has settled, the registry is read rarely: at 3,072 engines
        # a read is thousands of stat calls on the shared file system.
        settled = all(m.state in ("ready", "failed", "stopped") for m in self.members.values())
        if now - self._read_at < (SETTLED_REFRESH_S if settled else REFRESH_S):
            return
        self._read_at = now
        with contextlib.suppress(FileNotFoundError):
            for entry in os.scandir(self.registry):
                name = entry.name[:-5]
                member = self.members.get(name)
                if member is None or not entry.name.endswith(".json"):
                    continue
                with contextlib.suppress(OSError, ValueError):
                    mtime = entry.stat().st_mtime
                    if self._mtimes.get(name) == mtime:
                        continue
                    record = json.loads(Path(entry.path).read_text())
                    self._mtimes[name] = mtime
                    self._update(member, record)
        with contextlib.suppress(OSError, ValueError):
            self._launcher_exit = int((self.registry / LAUNCHER_EXIT).read_text())

    def _update(self, member: _Remote, record: Mapping) -> None:
        member.engine = RemoteEngine(
            record["name"],
            record["url"],
            record["log"],
            dict(record.get("env") or {}),
            api_key=self.api_key,
        )
        state = record["state"]
        if member.state == "suspect" and state == "ready" and record["time"] < member.suspect_since:
            return  # the report predates the failure: wait for the restart's report
        if state != member.state:
            self._progress_at = self.clock()
        member.state = state

    def _failure(self, what: str) -> str:
        logs = [
            m.engine.log_path if m.engine else str(self.registry / f"{m.file}.log")
            for m in self.members.values()
            if m.state != "ready"
        ]
        return f"{what}; engine logs: {', '.join(logs[:3])}" + (
            f" and {len(logs) - 3} more in {self.registry}" if len(logs) > 3 else ""
        )

    def _pick(self) -> _Remote | None:
        self._refresh()
        ready = [m for m in self.members.values() if m.state == "ready"]
        if not ready:
            if all(m.state in ("failed", "stopped") for m in self.members.values()):
                raise client.EngineUnavailable(
                    self._failure(f"every engine of {self.scope} failed")
                )
            if self._launcher_exit is not None:
                raise client.EngineUnavailable(
                    self._failure(
                        self.launcher.format(status=self._launcher_exit) + " and no engine is ready"
                    )
                )
            if self.clock() - self.created > self.ready_timeout:
                raise client.EngineUnavailable(
                    self._failure(
                        f"no engine of {self.scope} was ready within {self.ready_timeout:.0f} s "
                        "(config warm.ready_timeout_s)"
                    )
                )
        free = [m for m in ready if m.in_flight < self.max_in_flight]
        if not free and ready and self.clock() - self._progress_at > self.stall_timeout:
            busy = [f"{m.file} {m.in_flight} in flight" for m in ready]
            raise client.EngineUnavailable(
                self._failure(
                    f"no request finished and no engine changed state for "
                    f"{self.stall_timeout:.0f} s (config warm.stall_timeout_s) while ranks "
                    f"wait for an engine ({', '.join(busy[:3])})"
                )
            )
        return min(free, key=lambda m: m.in_flight) if free else None

    @contextlib.contextmanager
    def route(self, timeout: float | None = None) -> Iterator[RemoteEngine]:
        """Hold one request slot of the least busy ready engine (waits while none is free)."""
        deadline = None if timeout is None else self.clock() + timeout
        with self._cond:
            while (member := self._pick()) is None:
                left = REFRESH_S
                if deadline is not None:
                    left = min(left, deadline - self.clock())
                    if left <= 0:
                        raise client.EngineUnavailable(f"no engine free within {timeout} s")
                self._cond.wait(left)
            member.in_flight += 1
        try:
            yield member.engine
        finally:
            with self._cond:
                member.in_flight -= 1
                self._progress_at = self.clock()
                self._cond.notify()

    def mark_failed(self, engine: RemoteEngine) -> None:
        """Leave the engine out until its node process reports it restarted, or it
        answers /health again (asked by a thread of its own: no lock is held across a
        network call)."""
        with self._cond:
            for member in self.members.values():
                same = member.engine is not None and member.engine.name == engine.name
                if same and member.state == "ready":
                    member.state = "suspect"
                    member.suspect_since = time.time()
                    threading.Thread(target=self._probe, args=(member,), daemon=True).start()

    def _probe(self, member: _Remote) -> None:
        while True:
            with self._cond:
                if member.state != "suspect":
                    return
                url = member.engine.url
            if client.health(url, timeout=1.0):
                with self._cond:
                    if member.state == "suspect":
                        member.state = "ready"
                        self._progress_at = self.clock()
                        self._cond.notify_all()
                return
            time.sleep(max(REFRESH_S, 0.2))


# ----------------------------------------------------------------------------- local run

LOCAL_LAUNCHER = "the engines' supervisor exited with status {status} (its log: {log})"


class LocalService:
    """The engines of a local run: the one-node case of a submission.

    ``start`` writes the run's spec and a new key (``<registry root>/<run>.engines.json``
    and ``.key``, 0600, as pbs-submit does per submission), runs ``node`` (the
    supervisor a submission's launcher starts on each node) as a child in a session of
    its own, and returns the RegistryPool of its engines. The child's standard input is
    a pipe only this process holds: when this process ends, even by SIGKILL, the child
    reads end of file and stops the engines. ``stop`` closes that pipe and waits.
    """

    def __init__(self, spec: Mapping, host: str | None = None, run_id: str | None = None):
        self.spec = dict(spec)
        self.host = host or socket.gethostname()
        self.run_id = run_id or f"local-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
        self.registry = registry_dir(self.spec, self.run_id)
        self.log_path = self.registry / "supervisor.log"
        self._process: subprocess.Popen | None = None
        self._lock = threading.Lock()

    def start(self) -> RegistryPool:
        self.registry.mkdir(parents=True, exist_ok=True)
        root = self.registry.parent
        key_file = root / f"{self.run_id}.key"
        lifecycle.write_key_file(key_file, lifecycle.new_api_key())
        base = free_base_port(self.spec, self.host)
        if base != self.spec["tiles"]["base_port"]:
            _log(
                f"ports from tiles.base_port {self.spec['tiles']['base_port']} are in use on "
                f"this machine (another run's engines?): this run's engines use "
                f"tiles.base_port {base}"
            )
        placement = self.spec["tiles"] | {"base_port": base}
        spec = self.spec | {"api_key_file": str(key_file), "tiles": placement}
        spec_path = root / f"{self.run_id}.engines.json"
        prompts.write_atomic(spec_path, json.dumps(spec))
        argv = [sys.executable, os.path.abspath(__file__), "node", str(spec_path)]
        argv += [self.run_id, self.host, "--lifeline"]
        # Launchers' local-rank variables would give this one process a share of the node.
        local_rank = {name for pair in tiles.LOCAL_RANK_VARIABLES for name in pair}
        env = {k: v for k, v in os.environ.items() if k not in local_rank}
        with self._lock, open(self.log_path, "ab") as log:
            self._process = subprocess.Popen(
                argv,
                stdin=subprocess.PIPE,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        threading.Thread(target=self._report_exit, args=(self._process,), daemon=True).start()
        launcher = LOCAL_LAUNCHER.replace("{log}", str(self.log_path))
        return RegistryPool.for_hosts(spec, self.run_id, [self.host], "this run", launcher)

    def _report_exit(self, process: subprocess.Popen) -> None:
        """As ``launch`` does: ranks stop waiting for engines that will never come."""
        code = process.wait()
        prompts.write_atomic(self.registry / LAUNCHER_EXIT, f"{code}\n")

    def stop(self, grace: float = 60.0) -> None:
        """Stop the engines (all at once) and wait for the supervisor, at most ``grace`` s."""
        with self._lock:
            process, self._process = self._process, None
        if process is None:
            return
        with contextlib.suppress(OSError):
            process.stdin.close()
        try:
            process.wait(grace)
        except subprocess.TimeoutExpired:
            # Its engines' own lifelines end them once it is gone.
            process.kill()
            process.wait()


# ----------------------------------------------------------------------------- main

USAGE = """usage: supervisor.py launch SPEC | stop SPEC | node SPEC JOB_ID HOST,... [--lifeline]
                | ranks SPEC NODES | ranks-node SPEC NODES JOB_ID HOST,HOST,..."""


def main(argv: Sequence[str]) -> int:
    if len(argv) == 2 and argv[0] in ("launch", "stop"):
        return (launch if argv[0] == "launch" else stop)(argv[1])
    if len(argv) in (4, 5) and argv[0] == "node" and argv[4:] in ([], ["--lifeline"]):
        return node(argv[1], argv[2], argv[3].split(","), lifeline=len(argv) == 5)
    if len(argv) == 3 and argv[0] == "ranks":
        return ranks(argv[1], argv[2])
    if len(argv) == 5 and argv[0] == "ranks-node":
        return ranks_node(argv[1], argv[2], argv[3], argv[4].split(","))
    print(USAGE, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
