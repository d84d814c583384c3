"""Tile placement: which (host, tiles) a job runs on, and the environment it runs with.

One vLLM engine runs per GPU tile, 12 tiles per Aurora node. Every job of an
allocation asks this module for a slot; slots are unique among all processes
that share a lock directory, by one `flock` per (host, tile). The kernel drops
a flock when the last file descriptor holding it is closed, so a killed holder
never leaves a stale lock behind.

Stdlib only: imported by the Snakefile, by the task scripts and by tests, with
no scheduler, Snakemake or vLLM present.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import signal
import socket
import string
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from placement.ports import internal_ports

HIERARCHIES = ("FLAT", "COMPOSITE")
HIERARCHY_VARIABLE = "ZE_FLAT_DEVICE_HIERARCHY"
# What each launcher setting may name: config launcher (one per-rank engine),
# engine_launcher (all engines of a submission), node_launcher (one process per node).
LAUNCHER_PLACEHOLDERS = ("host", "cpus", "tiles")
ENGINE_LAUNCHER_PLACEHOLDERS = ("nodes", "engines", "engines_per_node", "cpu_lists")
NODE_LAUNCHER_PLACEHOLDERS = ("nodes",)

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
# Values of these variables are kept out of the job log (they still reach the child).
_SECRET_NAME = re.compile(r"TOKEN|SECRET|PASSWORD|PASSWD|API_KEY|ACCESS_KEY", re.IGNORECASE)


@dataclass(frozen=True)
class Slot:
    host: str
    tiles: tuple[int, ...]


# An Aurora node has two CPU sockets; cards 0-2 (tiles 0-5) hang off the first, cards
# 3-5 (tiles 6-11) off the second, and config tiles.cpu_bind lists each tile's cores on
# its socket. A tensor-parallel engine whose tiles span both sockets talks across the
# socket link; ALCF's TP=4 example runs 2 engines per node, one per socket
# (GettingStarted AI_ML/LLM_Inference, --cpu-bind list:1-48:53-100).
SOCKETS = 2
# Cores the system keeps for itself on an Aurora node (ALCF running-jobs-aurora.md, 2026):
# no engine or rank may be bound to them.
RESERVED_CORES = (0, 52, 104, 156)


def tiles_per_socket(per_node: int) -> int:
    """Tiles of one socket: half a node (the whole node when it cannot be halved)."""
    return per_node // SOCKETS if per_node % SOCKETS == 0 else per_node


def engine_slots(per_node: int, per_job: int, host: str) -> list[Slot]:
    """The slots of a node's engines: ``per_job`` tiles each, in tile order, and none
    across the two sockets when ``per_job`` fits in one: TP=2 gives 6 engines, TP=3 4,
    TP=4 and TP=6 2 (tiles 0-3 and 6-9, 0-5 and 6-11); TP=8 and TP=12 one over both."""
    per_socket = tiles_per_socket(per_node)
    if per_job > per_socket:
        starts = range(0, per_node - per_job + 1, per_job)
    else:
        starts = [
            socket * per_socket + offset
            for socket in range(per_node // per_socket)
            for offset in range(0, per_socket - per_job + 1, per_job)
        ]
    return [Slot(host, tuple(range(first, first + per_job))) for first in starts]


def engines_per_node(per_node: int, per_job: int) -> int:
    """How many engines (or per-rank engine slots) a node holds (`engine_slots`)."""
    return len(engine_slots(per_node, per_job, ""))


def cpu_numbers(text: str, key: str = "tiles.cpu_bind") -> list[int]:
    """The cores of one PALS CPU list ("1-8", "53-60,61"); a malformed one is a
    ValueError naming config ``key``."""
    cores = []
    for part in str(text).split(","):
        first, dash, last = part.strip().partition("-")
        if not first.isdigit() or (dash and not last.isdigit()) or int(last or first) < int(first):
            raise ValueError(f"config key {key}: {text!r} is not a CPU list like 1-8 or 1-8,53")
        cores += range(int(first), int(last or first) + 1)
    return cores


def compact_cpus(cores: Sequence[int]) -> str:
    """One PALS CPU list for ``cores``, runs joined: [1..48] -> "1-48"."""
    parts: list[str] = []
    for core in sorted(set(cores)):
        if parts and core == int(parts[-1].rpartition("-")[2]) + 1:
            parts[-1] = f"{parts[-1].partition('-')[0]}-{core}"
        else:
            parts.append(str(core))
    return ",".join(parts)


def reserved_core_problems(cpu_bind: Sequence[str]) -> list[str]:
    """config tiles.cpu_bind entries that are malformed or bind a reserved core."""
    problems = []
    for index, text in enumerate(cpu_bind):
        try:
            taken = sorted(set(cpu_numbers(text)) & set(RESERVED_CORES))
        except ValueError as error:
            problems.append(str(error))
            continue
        if taken:
            problems.append(
                f"config key tiles.cpu_bind: entry {index} ({text!r}, tile {index}) binds "
                f"core(s) {', '.join(map(str, taken))}, which Aurora reserves for the system "
                f"(cores {', '.join(map(str, RESERVED_CORES))})"
            )
    return problems


def slot_cpus(slot: Slot, per_node: int, per_job: int, cpu_bind: Sequence[str]) -> str:
    """The CPU list of one engine: the cores of its socket's tiles, shared evenly among
    the socket's engines (TP=4: tiles 0-5's cores "1-48" for the engine on tiles 0-3, as
    ALCF binds it; TP=2: its two tiles' cores). Checked against the reserved cores."""
    problems = reserved_core_problems(cpu_bind)
    if problems:
        raise ValueError(problems[0])
    if max(slot.tiles) >= len(cpu_bind):
        raise ValueError(
            f"tiles.cpu_bind has {len(cpu_bind)} entries; tile {max(slot.tiles)} has none"
        )
    per_socket = tiles_per_socket(per_node)
    socket = slot.tiles[0] // per_socket
    group = [
        s for s in engine_slots(per_node, per_job, slot.host) if s.tiles[0] // per_socket == socket
    ]
    if per_job > per_socket or slot not in group:
        owned = list(slot.tiles)  # over both sockets, or a slot of no fixed layout
    else:
        first = socket * per_socket
        share = per_socket // len(group)
        at = group.index(slot)
        owned = list(range(first + at * share, first + (at + 1) * share))
        owned = [t for t in owned if t < len(cpu_bind)]
    return compact_cpus([core for tile in owned for core in cpu_numbers(cpu_bind[tile])])


def engine_cpu_lists(per_node: int, per_job: int, cpu_bind: Sequence[str]) -> str:
    """{cpu_lists} of config engine_launcher: every engine's CPU list, ":" between them
    (PALS --cpu-bind list:...); TP=4 on Aurora: "1-48:53-100"."""
    return ":".join(
        slot_cpus(slot, per_node, per_job, cpu_bind) for slot in engine_slots(per_node, per_job, "")
    )


def tile_ids(tiles: Sequence[int]) -> str:
    """The tiles as the user reads them: "3" or "4,5"."""
    return ",".join(str(t) for t in tiles)


def affinity_mask(tiles: Sequence[int], hierarchy: str) -> str:
    """ZE_AFFINITY_MASK for `tiles` under the device hierarchy in force.

    FLAT: every tile is a device ("4,5"). COMPOSITE: card.tile ("2.0,2.1").
    """
    if not tiles:
        raise ValueError("affinity_mask needs at least one tile")
    if any(t < 0 for t in tiles):
        raise ValueError(f"tile numbers must be >= 0, got {list(tiles)}")
    if hierarchy == "FLAT":
        return tile_ids(tiles)
    if hierarchy == "COMPOSITE":
        return ",".join(f"{t // 2}.{t % 2}" for t in tiles)
    raise ValueError(f"unknown device hierarchy {hierarchy!r}; expected FLAT or COMPOSITE")


def resolve_hierarchy(setting: str, environ: Mapping[str, str]) -> str:
    """The hierarchy for the engines: the explicit setting, or with "auto" the node's.

    "auto" follows ZE_FLAT_DEVICE_HIERARCHY, FLAT when unset (as under
    `module load frameworks`), so the mask matches what Level Zero will use.
    """
    choice = setting.strip().upper()
    if choice in HIERARCHIES:
        return choice
    if choice != "AUTO":
        raise ValueError(
            f"tiles.hierarchy is {setting!r}; expected auto, FLAT or COMPOSITE",
        )
    value = environ.get(HIERARCHY_VARIABLE)
    if value is None or value.strip() == "":
        return "FLAT"
    if value.strip().upper() in HIERARCHIES:
        return value.strip().upper()
    raise ValueError(
        f"{HIERARCHY_VARIABLE}={value!r} is not FLAT or COMPOSITE; "
        "fix the variable or set tiles.hierarchy explicitly",
    )


def read_hosts(environ: Mapping[str, str]) -> list[str]:
    """Hosts of the allocation in PBS_NODEFILE order, each once; this host outside PBS."""
    nodefile = environ.get("PBS_NODEFILE")
    if not nodefile:
        return [socket.gethostname()]
    try:
        text = Path(nodefile).read_text()
    except OSError as error:
        raise FileNotFoundError(
            f"PBS_NODEFILE={nodefile!r} cannot be read: {error.strerror or error}",
        ) from error
    hosts = list(dict.fromkeys(line.strip() for line in text.splitlines() if line.strip()))
    if not hosts:
        raise ValueError(f"PBS_NODEFILE={nodefile!r} lists no hosts")
    return hosts


# Set by launchers for each process they start: its node's index in PBS_NODEFILE
# (PALS mpiexec, PBS's own pbsdsh / pbs_tmrsh), then the global rank, which is the node
# index only with one process per node.
NODE_INDEX_VARIABLES = ("PALS_NODEID", "PBS_NODENUM", "PMI_RANK", "PALS_RANKID")
# (local rank, processes on this node) as launchers set them; none: one per node.
LOCAL_RANK_VARIABLES = (
    ("PALS_LOCAL_RANKID", "PALS_LOCAL_SIZE"),
    ("PMI_LOCAL_RANK", "PMI_LOCAL_SIZE"),
    ("MPI_LOCALRANKID", "MPI_LOCALNRANKS"),
    ("OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE"),
)


def this_host(hosts: Sequence[str], environ: Mapping[str, str]) -> str:
    """This node's name as PBS_NODEFILE spells it, for a process a launcher started.

    The host name first (short names compared): a launcher may pass the job script's
    own PBS_NODENUM (0) on to every node. Then the launcher's node index.
    """
    short = socket.gethostname().split(".")[0]
    for host in hosts:
        if host.split(".")[0] == short:
            return host
    for name in NODE_INDEX_VARIABLES:
        value = environ.get(name, "")
        if value.isdigit() and int(value) < len(hosts):
            return hosts[int(value)]
    raise ValueError(f"cannot tell which of {list(hosts)} this node ({short}) is")


def local_rank(environ: Mapping[str, str]) -> tuple[int, int]:
    """(index, count) of the processes a launcher started on this node; (0, 1) if it
    says nothing (e.g. pbsdsh: one process per node)."""
    for rank_name, size_name in LOCAL_RANK_VARIABLES:
        rank, size = environ.get(rank_name, ""), environ.get(size_name, "")
        if rank.isdigit() and size.isdigit() and int(rank) < int(size):
            return int(rank), int(size)
    return 0, 1


def default_lock_dir(environ: Mapping[str, str]) -> Path:
    """Node-local lock directory shared by all jobs of one PBS submission.

    Snakemake starts every job of a submission on the allocation's first node,
    so locks there see all of them; separate allocations never share locks.
    """
    job = (environ.get("PBS_JOBID") or "local").replace("/", "_")
    return Path(tempfile.gettempdir()) / f"tile-locks-{os.getuid()}" / job


def _lock_path(lock_dir: Path, host: str, tile: int) -> Path:
    safe_host = re.sub(r"[^A-Za-z0-9._-]", "_", host)
    return lock_dir / f"{safe_host}.tile-{tile:02d}.lock"


def _try_lock(path: Path) -> int | None:
    """An fd holding an exclusive flock on `path`, or None when someone else holds it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        os.close(fd)
        if error.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return None
        raise
    # Informational only: who took the tile last.
    with contextlib.suppress(OSError):
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _release(fds: Sequence[int]) -> None:
    # Close, never LOCK_UN: an fd inherited by a still running child shares the
    # lock, and LOCK_UN would free the tile under it.
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def _lock_all(lock_dir: Path, host: str, tiles: Sequence[int]) -> list[int] | None:
    fds: list[int] = []
    for tile in tiles:
        fd = _try_lock(_lock_path(lock_dir, host, tile))
        if fd is None:
            _release(fds)
            return None
        fds.append(fd)
    return fds


def _lock_any(lock_dir: Path, host: str, count: int, per_node: int) -> tuple | None:
    fds: list[int] = []
    taken: list[int] = []
    for tile in range(per_node):
        fd = _try_lock(_lock_path(lock_dir, host, tile))
        if fd is not None:
            fds.append(fd)
            taken.append(tile)
            if len(taken) == count:
                return tuple(taken), fds
    _release(fds)
    return None


def _try_slot(
    lock_dir: Path,
    hosts: Sequence[str],
    per_node: int,
    per_job: int,
) -> tuple[Slot, list[int]] | None:
    """One non-blocking pass over the candidates; all tiles of a slot or none."""
    if per_job == 1:
        for host in hosts:
            for tile in range(per_node):
                fds = _lock_all(lock_dir, host, (tile,))
                if fds is not None:
                    return Slot(host, (tile,)), fds
        return None
    # Aligned blocks first, on any host: (0,1) is one card, (1,2) spans two; none
    # across the sockets where the block fits in one (engine_slots).
    for host in hosts:
        for block in engine_slots(per_node, per_job, host):
            fds = _lock_all(lock_dir, host, block.tiles)
            if fds is not None:
                return block, fds
    for host in hosts:
        found = _lock_any(lock_dir, host, per_job, per_node)
        if found is not None:
            tiles, fds = found
            return Slot(host, tiles), fds
    return None


@contextlib.contextmanager
def _acquire_fds(
    lock_dir: Path | str,
    hosts: Sequence[str],
    tiles_per_node: int,
    tiles_per_job: int,
    poll: float,
    timeout: float | None,
) -> Iterator[tuple[Slot, list[int]]]:
    if not hosts:
        raise ValueError("no hosts to place a job on")
    if tiles_per_node < 1 or tiles_per_job < 1:
        raise ValueError(
            f"tiles per node ({tiles_per_node}) and per job ({tiles_per_job}) must be >= 1",
        )
    if tiles_per_job > tiles_per_node:
        raise ValueError(
            f"a job needs {tiles_per_job} tiles but a node has only {tiles_per_node}",
        )
    lock_dir = Path(lock_dir)
    lock_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    if lock_dir.stat().st_uid != os.getuid():
        raise PermissionError(f"tile lock directory {lock_dir} belongs to another user")
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        found = _try_slot(lock_dir, hosts, tiles_per_node, tiles_per_job)
        if found is not None:
            break
        if deadline is not None and time.monotonic() + poll > deadline:
            raise TimeoutError(
                f"no {tiles_per_job} free tile(s) on one of {len(hosts)} host(s) "
                f"{list(hosts)} within {timeout} s (locks in {lock_dir})",
            )
        time.sleep(poll)
    slot, fds = found
    try:
        yield slot, fds
    finally:
        _release(fds)


@contextlib.contextmanager
def acquire(
    lock_dir: Path | str,
    hosts: Sequence[str],
    tiles_per_node: int,
    tiles_per_job: int,
    poll: float = 0.1,
    timeout: float | None = None,
) -> Iterator[Slot]:
    """Hold `tiles_per_job` tiles of one host, unique among users of `lock_dir`.

    Waits (polling every `poll` s) while every candidate is taken; `timeout`
    seconds without a slot raise TimeoutError. Released on exit.
    """
    with _acquire_fds(lock_dir, hosts, tiles_per_node, tiles_per_job, poll, timeout) as (
        slot,
        _fds,
    ):
        yield slot


def engine_env(
    slot: Slot,
    hierarchy: str,
    base_port: int,
    tmp_root: Path | str,
) -> dict[str, str]:
    """Placement variables of one engine; 12 engines per node collide without them.

    RANK=0 and WORLD_SIZE=<its tiles>: every engine is a torch.distributed world of its
    own, as in ALCF's MPI example; a launcher's rank variables (one mpiexec over all
    engines of a submission) must not make an engine think it is rank 37 of 3,072.
    """
    first = slot.tiles[0]
    vllm_port, master_port = internal_ports(slot, base_port)
    return {
        "RANK": "0",
        "WORLD_SIZE": str(len(slot.tiles)),
        "ZE_AFFINITY_MASK": affinity_mask(slot.tiles, hierarchy),
        "ZE_ENABLE_PCI_ID_DEVICE_ORDER": "1",
        HIERARCHY_VARIABLE: hierarchy,
        "TMPDIR": str(Path(tmp_root) / f"tile-{first}"),
        "VLLM_PORT": str(vllm_port),
        "MASTER_PORT": str(master_port),
        "VLLM_HOST_IP": "127.0.0.1",
        "MASTER_ADDR": "127.0.0.1",
        "TILE_HOST": slot.host,
        "TILE_IDS": tile_ids(slot.tiles),
    }


def _placeholders(element: str) -> list[str]:
    try:
        parsed = list(string.Formatter().parse(element))
    except ValueError as error:
        raise ValueError(f"launcher element {element!r} is malformed: {error}") from error
    return [field for _, field, _, _ in parsed if field is not None]


def launcher_fields(template: Sequence[str], allowed: Sequence[str], key: str) -> set[str]:
    """The {placeholders} a launcher argument list (config ``key``) uses; an unknown or
    malformed one is a ValueError naming the key."""
    used = set()
    for element in template:
        try:
            fields = _placeholders(element)
        except ValueError as error:
            raise ValueError(f"config key {key}: {error}") from None
        unknown = [f for f in fields if f not in allowed]
        if unknown:
            raise ValueError(
                f"config key {key}: placeholder {{{unknown[0]}}} in {element!r} is unknown; "
                f"allowed: {', '.join('{' + p + '}' for p in allowed)}"
            )
        used.update(fields)
    return used


def render_launcher(template: Sequence[str], values: Mapping[str, str], key: str) -> list[str]:
    """A launcher argument list (config ``key``) with its {placeholders} filled in from
    ``values`` (checked by `launcher_fields`)."""
    launcher_fields(template, list(values), key)
    return [element.format_map(values) for element in template]


def launch_argv(
    template: Sequence[str],
    slot: Slot,
    cpus: Sequence[str],
    env: Mapping[str, str],
    command: Sequence[str],
) -> list[str]:
    """The argv that runs `command` on the slot's host with `env` set.

    `cpus` is config `tiles.cpu_bind` (one CPU list per tile; a multi-tile job
    gets its tiles' lists joined by commas, PALS's syntax for one rank). The variables are
    passed through `env` on the command line, since mpiexec/srun may not
    forward the caller's environment.
    """
    used = launcher_fields(template, LAUNCHER_PLACEHOLDERS, "launcher")
    if not cpus:
        if "cpus" in used:
            raise ValueError("the launcher uses {cpus} but tiles.cpu_bind is empty")
        cpu_list = ""
    elif max(slot.tiles) < len(cpus):
        if problems := reserved_core_problems(cpus):
            raise ValueError(problems[0])
        # A multi-tile engine is one rank: it gets the cores of all its tiles.
        cpu_list = compact_cpus([core for tile in slot.tiles for core in cpu_numbers(cpus[tile])])
    else:
        raise ValueError(f"tiles.cpu_bind has {len(cpus)} entries; tile {max(slot.tiles)} has none")
    values = {"host": slot.host, "cpus": cpu_list, "tiles": tile_ids(slot.tiles)}
    for name, value in env.items():
        if not _ENV_NAME.match(name):
            raise ValueError(f"environment variable name {name!r} is not valid")
        if not isinstance(value, str):
            raise ValueError(f"environment variable {name} must be a string, got {value!r}")
    if not command:
        raise ValueError("empty command")
    if "=" in command[0]:
        # `env` would take it for another variable assignment.
        raise ValueError(f"command {command[0]!r} contains '='; `env` cannot run it")
    return (
        render_launcher(template, values, "launcher")
        + ["env"]
        + [f"{name}={env[name]}" for name in sorted(env)]
        + list(command)
    )


def _loggable(argv: Sequence[str]) -> list[str]:
    shown = []
    for arg in argv:
        name, sep, _ = arg.partition("=")
        if sep and _ENV_NAME.match(name) and _SECRET_NAME.search(name):
            arg = f"{name}=<hidden>"
        shown.append(arg)
    return shown


def _extra_env(extra_env: Mapping[str, object], placement: Mapping[str, str]) -> dict[str, str]:
    overridden = sorted(set(extra_env) & set(placement))
    if overridden:
        raise ValueError(
            f"task environment may not set placement variable(s) {', '.join(overridden)}",
        )
    result = {}
    for name, value in extra_env.items():
        # YAML turns HF_HUB_OFFLINE: 1 into an int; bool would become "True".
        if isinstance(value, int) and not isinstance(value, bool):
            value = str(value)
        if not isinstance(value, str):
            raise ValueError(f"task environment {name} must be a string, got {value!r}")
        result[name] = value
    return result


def default_tmp_root(environ: Mapping[str, str]) -> Path:
    """Parent of the per-engine TMPDIRs (the task creates its own directory)."""
    return Path(environ.get("TMPDIR") or "/tmp") / f"engine-tmp-{os.getuid()}"


def _wait_forwarding_signals(process: subprocess.Popen) -> int:
    if threading.current_thread() is not threading.main_thread():
        # No handlers off the main thread; a signal to the process group reaches the child.
        return process.wait()

    def forward(signum, _frame):
        if process.poll() is None:
            process.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        return process.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


PR_SET_PDEATHSIG = 1


def end_with_parent() -> None:
    """In a child before it runs (Linux): SIGTERM when the thread that started it ends,
    e.g. when its Snakemake is SIGKILLed, so that a rank's task does not outlive its run
    (infer.py ends its engine's processes on SIGTERM)."""
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def run_placed(
    command: Sequence[str] | Callable[[Slot], Sequence[str]],
    *,
    log_path: Path | str,
    tiles_per_job: int,
    tiles_per_node: int,
    hierarchy_setting: str,
    base_port: int,
    cpu_bind: Sequence[str],
    launcher: Sequence[str],
    extra_env: Mapping[str, object],
    environ: Mapping[str, str] = os.environ,
    lock_dir: Path | str | None = None,
    tmp_root: Path | str | None = None,
    poll: float = 0.1,
    timeout: float | None = None,
) -> int:
    """Run `command` on a free slot of the allocation; return its exit code.

    `command` may be a function of the slot (e.g. a model copy on the slot's host).
    Output goes to `log_path` after a placement line and the argv. The child
    inherits the slot's lock descriptors, so the tiles stay taken until the
    child (and anything it forked) is gone, even if this process is killed.
    """
    hosts = read_hosts(environ)
    hierarchy = resolve_hierarchy(hierarchy_setting, environ)
    if lock_dir is None:
        lock_dir = default_lock_dir(environ)
    if tmp_root is None:
        tmp_root = default_tmp_root(environ)
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with _acquire_fds(lock_dir, hosts, tiles_per_node, tiles_per_job, poll, timeout) as (
        slot,
        fds,
    ):
        env = engine_env(slot, hierarchy, base_port, tmp_root)
        env.update(_extra_env(extra_env, env))
        if callable(command):
            command = command(slot)
        argv = launch_argv(launcher, slot, cpu_bind, env, command)
        with log_path.open("ab") as log:
            log.write(
                (
                    f"placement: host={slot.host} tiles={tile_ids(slot.tiles)} "
                    f"mask={env['ZE_AFFINITY_MASK']} hierarchy={hierarchy} pid={os.getpid()}\n"
                    f"argv: {json.dumps(_loggable(argv))}\n"
                ).encode(),
            )
            log.flush()
            process = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, **env},
                pass_fds=fds,
                preexec_fn=end_with_parent,
            )
            code = _wait_forwarding_signals(process)
            log.write(f"placement: exit code {code}\n".encode())
    return code
