"""How a node's tiles and cores are divided among its engines: slots of `tiles.per_job`
tiles on one socket where they fit, their CPU lists, and the cores Aurora reserves for
the system (0, 52, 104, 156). Stdlib only; the bottom of placement/."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


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
