"""The port layout of a node's engines, in one place: each engine's API port, vLLM's
internal ports (VLLM_PORT, MASTER_PORT) per slot, and a free block for a local run.

Blocks are BLOCK_STEP ports apart. A free block is a guess, not a claim (another
process may take a port between the check and the engine's bind): the engine binds
its ports itself, proves its identity on its API port (lifecycle.Engine.wait_ready),
and on a conflict the supervisor moves that one engine to the next free block
(next_free_block) and restarts it; its registry entry carries the port it really has.
"""

from __future__ import annotations

import socket
from collections.abc import Mapping, Sequence

from placement.node_layout import Slot


def engine_port(spec: Mapping, slot: Slot) -> int:
    return api_port(spec["tiles"]["base_port"], slot)


def api_port(base_port: int, slot: Slot) -> int:
    # apart from the internal ports (internal_ports: base + 10 t upwards)
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


BLOCK_STEP = 2000


def slot_ports(slot: Slot, base_port: int) -> list[int]:
    """Every port an engine on ``slot`` uses from block ``base_port``: API and internal."""
    return [api_port(base_port, slot), *internal_ports(slot, base_port)]


def next_free_block(slot: Slot, base_port: int, address: str, tries: int = 16) -> int | None:
    """The first block after ``base_port`` where ``slot``'s ports are all free on
    ``address`` (None: none within ``tries`` blocks)."""
    for step in range(1, tries + 1):
        base = base_port + BLOCK_STEP * step
        ports = slot_ports(slot, base)
        if max(ports) > 65535:
            return None
        if not any(_port_taken(address, port) for port in ports):
            return base
    return None


def free_base_port(spec: Mapping, slots: Sequence[Slot], address: str, tries: int = 16) -> int:
    """tiles.base_port, or the first base 2,000 ports up from it whose engine ports (API,
    VLLM_PORT, MASTER_PORT of every slot) are all free on ``address`` (the
    listen address of ``slots``' host).
    A local run's case: another run on this machine may hold them (a PBS node is its
    job's own). Nothing free: tiles.base_port (the engines' logs then say why)."""
    placement = spec["tiles"]
    for step in range(tries):
        base = placement["base_port"] + BLOCK_STEP * step
        ports = [api_port(base, slot) for slot in slots]
        ports += [port for slot in slots for port in internal_ports(slot, base)]
        if max(ports) > 65535:
            break
        if not any(_port_taken(address, port) for port in ports):
            return base
    return placement["base_port"]


def internal_ports(slot: Slot, base_port: int) -> tuple[int, int]:
    """VLLM_PORT and MASTER_PORT of the engine on ``slot``: base + 10 t and base + 10 t + 5
    (vLLM takes further internal ports from VLLM_PORT upwards)."""
    port = base_port + 10 * slot.tiles[0]
    return port, port + 5
