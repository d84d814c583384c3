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
import os
import re
import socket
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from placement.node_layout import Slot, engine_slots, tile_ids
from placement.ports import internal_ports

HIERARCHIES = ("FLAT", "COMPOSITE")
HIERARCHY_VARIABLE = "ZE_FLAT_DEVICE_HIERARCHY"


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
