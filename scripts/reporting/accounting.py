"""Where the node-hours went: per submission (results/submissions.tsv), per engine
(results/engines.tsv) and over time (results/timeline.png).

Sources, all written by the run itself:

* the rank records ``results/records/<rank>.json`` (scripts/formats/record.py): when each
  rank's request ended (``written_at``), how long it took (``request_s``, per-rank
  engines: ``generate_s``), how long it waited for an engine or loaded its model,
  and which engine served it (``engine_name``, ``host``, ``tiles``);
* the engine registry ``logs/engines/<job>/<host>-tile<N>.json`` (scripts/formats/registry.py):
  each engine's first start, first ready time, restarts and seconds spent restarting;
* ``logs/pbs/submissions.tsv`` (pbs-submit): each submission's job id, name, nodes,
  walltime and ranks;
* ``logs/pbs/<job>.phases.json``, written by the submission's job script (``python
  accounting.py phase ...``) as it passes each phase: ``start`` (before the site
  setup), ``setup`` (site setup done), ``staged`` (preflight and model copies done),
  ``ranks_done`` and ``end`` (after the engines stopped and the copies were removed).

A submission's node-seconds, ``nodes x (end - start)``, are split into

* set-up: start to staged (site setup, preflight, model staging), on every node;
* engine start: per engine, staged until it was ready, and its restarts;
* serving: per engine, the time some rank's request was on it;
* idle: per engine, ready with no request (the tail of uneven ranks, a slow client);
* stop: ranks done to end (engines stopping, model copies removed), on every node;

an engine counting for ``1 / (engines of its node)`` of its node, so that the parts
add up to the node-seconds used. With per-rank engines, a tile's "engine start" is
its ranks' model loads. A local run is "one local node", from its first rank (or
engine start) to its last rank's end.

Stdlib only at import time (the Snakefile imports it); matplotlib in `timeline_png`.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # run as a file: scripts/, not this file's folder, on the path
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from formats import registry as registry_format
from formats.files import safe_name, write_atomic
from placement.node_layout import engines_per_node

PHASES = ("start", "setup", "staged", "ranks_done", "end")
PARTS = ("setup", "engine_start", "serving", "idle", "stop")
PART_NAMES = {
    "setup": "set-up",
    "engine_start": "engine start",
    "serving": "serving",
    "idle": "idle",
    "stop": "stop",
}
SUBMISSION_HEADER = (
    "submission",
    "name",
    "nodes",
    "engines",
    "ranks",
    "walltime",
    "node_hours_requested",
    "node_hours_used",
    *(f"{part}_node_hours" for part in PARTS),
)
ENGINE_HEADER = (
    "submission",
    "engine",
    "host",
    "tile",
    "ready_s",
    "restarts",
    "ranks",
    "prompts",
    "output_tokens",
    "busy_fraction",
)
INDEX_KEYS = ("time", "id", "name", "nodes", "walltime", "queue", "ranks")
LOCAL = "local"


# ----------------------------------------------------------------------------- phases


def phases_path(log_dir: str | os.PathLike, job_id: str) -> Path:
    return Path(log_dir) / f"{safe_name(job_id)}.phases.json"


def record_phases(
    log_dir: str | os.PathLike, marks: Sequence[str], environ=os.environ, now=time.time
) -> Path:
    """Add the phases ``marks`` ("staged", or "start=<epoch s>") to the job's phases
    file, replaced atomically. The first call also notes the job's hosts."""
    job = environ.get("PBS_JOBID", "")
    if not job:
        raise SystemExit("accounting phase: PBS_JOBID is not set (not in a PBS job)")
    path = phases_path(log_dir, job)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        data = {}
    if data.get("job_id") != job:
        hosts = []
        node_file = environ.get("PBS_NODEFILE")
        if node_file:
            with open(node_file) as lines:
                hosts = list(dict.fromkeys(x.strip() for x in lines if x.strip()))
        data = {"job_id": job, "hosts": hosts, "phases": {}}
    for mark in marks:
        name, _, when = mark.partition("=")
        if name not in PHASES:
            raise SystemExit(f"accounting phase: unknown phase {name!r} (one of {PHASES})")
        try:
            data["phases"][name] = float(when) if when else now()
        except ValueError:
            raise SystemExit(f"accounting phase: {mark!r}: not a time in seconds") from None
    write_atomic(path, json.dumps(data))
    return path


# ----------------------------------------------------------------------------- inputs


def read_index(log_dir: str | os.PathLike) -> list[dict]:
    """logs/pbs/submissions.tsv: one dict per qsub (ranks as ints, time as epoch s)."""
    path = Path(log_dir) / "submissions.tsv"
    rows = []
    try:
        text = path.read_text()
    except OSError:
        return rows
    for number, line in enumerate(text.splitlines(), 1):
        cells = line.split("\t")
        if len(cells) != len(INDEX_KEYS):
            raise ValueError(f"{path}, line {number}: not a submission line: {line!r}")
        row = dict(zip(INDEX_KEYS, cells, strict=True))
        row["time"] = time.mktime(time.strptime(row["time"], "%Y-%m-%d %H:%M:%S"))
        row["nodes"] = int(row["nodes"])
        row["ranks"] = {int(r) for r in row["ranks"].split(",") if r}
        rows.append(row)
    return rows


def read_registry(folder: str | os.PathLike) -> list[dict]:
    """The engine entries of one registry folder, in name order."""
    return [e for _, e in sorted(registry_format.read_registry(folder).items()) if "name" in e]


def walltime_hours(text: str) -> float | None:
    parts = text.split(":")
    if len(parts) != 3 or not all(p.isdigit() for p in parts):
        return None
    h, m, s = (int(p) for p in parts)
    return h + m / 60 + s / 3600


# ----------------------------------------------------------------------------- slots


@dataclass
class Slot:
    """One engine (warm) or one tile slot (per-rank engines) of a submission."""

    name: str
    host: str
    tile: str
    ready_s: float | None = None
    restarts: int | None = None
    started_at: float | None = None
    ready_at: float | None = None
    restart_s: float = 0.0
    registered: bool = False  # in the engine registry of a PBS submission
    records: list = field(default_factory=list)
    start_intervals: list = field(default_factory=list)
    busy_intervals: list = field(default_factory=list)


def _num(value) -> float:
    return float(value) if isinstance(value, int | float) else 0.0


def rank_intervals(record: Mapping) -> tuple[tuple[float, float], tuple[float, float] | None]:
    """(request interval, start-up interval or None) of one rank, epoch seconds.

    Warm engines: the request is ``request_s`` up to the record's end; the start-up is
    the engine's (see Slot). Per-rank engines: generation up to the end, and before it
    the interpreter start, imports and model load of the rank's own engine."""
    end = record["_end"]
    if "request_s" in record:
        return (end - _num(record["request_s"]), end), None
    generate = _num(record.get("generate_s"))
    load = _num(record.get("load_s")) + _num(record.get("import_s"))
    load += _num(record.get("python_start_s"))
    return (end - generate, end), (end - generate - load, end - generate)


def rank_begin(record: Mapping) -> float:
    """When the rank began: its wait for an engine (warm) or its engine start."""
    (busy_start, _), startup = rank_intervals(record)
    if startup is not None:
        return startup[0]
    return busy_start - _num(record.get("wait_s"))


def slot_key(record: Mapping) -> str:
    if record.get("engine_name"):
        return record["engine_name"]
    tiles = record.get("tiles") or ""
    return f"{record['host']}/tile{tiles}" if tiles else record["host"]


def slots_of(records: Sequence[Mapping], registry: Sequence[Mapping] = ()) -> list[Slot]:
    """The engines of a submission (registry entries, then any engine only the records
    name), each with its ranks."""
    slots: dict[str, Slot] = {}
    for entry in registry:
        env = entry.get("env") or {}
        name = entry["name"]
        slots[name] = Slot(
            name=name,
            host=env.get("TILE_HOST") or name.split("/")[0],
            tile=env.get("TILE_IDS", ""),
            ready_s=entry.get("ready_s"),
            restarts=entry.get("restarts"),
            started_at=entry.get("started_at"),
            ready_at=entry.get("ready_at"),
            restart_s=_num(entry.get("restart_s")),
            registered=True,
        )
    for record in records:
        key = slot_key(record)
        slot = slots.get(key)
        if slot is None:
            slot = slots[key] = Slot(name=key, host=record["host"], tile=record.get("tiles") or "")
        slot.records.append(record)
        busy, startup = rank_intervals(record)
        slot.busy_intervals.append(busy)
        if startup is not None:
            slot.start_intervals.append(startup)
    for slot in slots.values():
        if slot.ready_s is None and slot.started_at is not None and slot.ready_at is not None:
            slot.ready_s = round(slot.ready_at - slot.started_at, 3)
        if slot.ready_s is None and slot.start_intervals:  # per-rank: its ranks' loads
            slot.ready_s = round(sum(b - a for a, b in slot.start_intervals), 3)
    return sorted(slots.values(), key=lambda s: _natural(s.name))


def _natural(text: str) -> list:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", text)]


# ----------------------------------------------------------------------------- intervals


def union(intervals: Iterable[tuple[float, float]]) -> list[tuple[float, float]]:
    merged: list[list[float]] = []
    for start, end in sorted(intervals):
        if end <= start:
            continue
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [(a, b) for a, b in merged]


def clip(intervals, low: float, high: float) -> list[tuple[float, float]]:
    return [(max(a, low), min(b, high)) for a, b in intervals if min(b, high) > max(a, low)]


def length(intervals) -> float:
    return sum(b - a for a, b in intervals)


def minus(intervals, holes) -> list[tuple[float, float]]:
    """``intervals`` without ``holes`` (both unions)."""
    result = []
    for start, end in intervals:
        cursor = start
        for a, b in holes:
            if b <= cursor or a >= end:
                continue
            if a > cursor:
                result.append((cursor, a))
            cursor = max(cursor, b)
        if cursor < end:
            result.append((cursor, end))
    return result


# ----------------------------------------------------------------------------- accounting


@dataclass
class Submission:
    """One PBS submission (or the local run) and where its node-seconds went."""

    id: str
    name: str
    nodes: int
    walltime: str
    hosts: list
    start: float
    staged: float
    ranks_done: float
    end: float
    slots: list
    parts: dict  # node-seconds per PARTS
    estimated: bool = False  # phases missing: times from the records and registry

    @property
    def used_s(self) -> float:
        return self.nodes * (self.end - self.start)

    @property
    def requested_hours(self) -> float | None:
        hours = walltime_hours(self.walltime)
        return None if hours is None else self.nodes * hours


def warm_ready(slot: Slot, low: float, high: float) -> float | None:
    """When a warm engine of the window [low, high] was first ready (its start-up runs
    from the window's start: launcher, process start, model load); ``high`` if never;
    None for an engine with no start of its own (the in-process echo engine)."""
    if slot.ready_at is not None:
        return slot.ready_at
    if slot.registered:
        return low + slot.ready_s if slot.ready_s is not None else high
    return slot.started_at and high


def slot_parts(slot: Slot, low: float, high: float) -> dict:
    """Seconds of the window [low, high] this slot spent serving, starting, idle."""
    busy = union(clip(slot.busy_intervals, low, high))
    starting = list(slot.start_intervals) + [
        (low, ready) for ready in [warm_ready(slot, low, high)] if ready
    ]
    starting = minus(union(clip(starting, low, high)), busy)
    window = high - low
    restart = min(slot.restart_s, max(0.0, window - length(busy) - length(starting)))
    serving, start = length(busy), length(starting) + restart
    return {"serving": serving, "engine_start": start, "idle": max(0.0, window - serving - start)}


def account(
    slots: Sequence[Slot],
    hosts: Sequence[str],
    start: float,
    staged: float,
    ranks_done: float,
    end: float,
    tile_slots: int | None = None,
    served_only: bool = False,
) -> dict:
    """Node-seconds per part; they add up to ``len(hosts) x (end - start)``.
    ``tile_slots``: per-rank engines' slots per node (config tiles); the slots no rank
    used count as idle, unless ``served_only`` leaves out every slot that served none."""
    staged = min(max(staged, start), end)
    ranks_done = min(max(ranks_done, staged), end)
    nodes = len(hosts)
    parts = dict.fromkeys(PARTS, 0.0)
    parts["setup"] = nodes * (staged - start)
    parts["stop"] = nodes * (end - ranks_done)
    per_host: dict[str, list[Slot]] = {h: [] for h in hosts}
    for slot in slots:
        per_host.setdefault(slot.host, []).append(slot)
    for host in hosts:
        members = per_host[host]
        share = max(len(members), tile_slots or 0, 1)  # a node with no engine: idle
        if share > len(members) and not served_only:
            parts["idle"] += (ranks_done - staged) * (share - len(members)) / share
        for slot in (s for s in members if s.records or not served_only):
            for part, seconds in slot_parts(slot, staged, ranks_done).items():
                parts[part] += seconds / share
    return parts


def assign_records(records: Sequence[Mapping], index: Sequence[Mapping], phases: Mapping) -> dict:
    """Submission id -> its records; records of no submission under LOCAL. A rank's
    record belongs to the latest submission of that rank made before it was written
    (and, if its phases are known, ended after it)."""
    owners: dict[str, list] = {}
    for record in records:
        best = None
        for row in index:
            if int(record["rank"]) not in row["ranks"] or row["time"] > record["_end"]:
                continue
            ended = phases.get(row["id"], {}).get("phases", {}).get("end")
            if ended is not None and ended + 1.0 < record["_end"]:
                continue
            if best is None or row["time"] > best["time"]:
                best = row
        owners.setdefault(best["id"] if best else LOCAL, []).append(record)
    return owners


def local_registry(records: Sequence[Mapping]) -> list[dict]:
    """The registry entries of the local runs that served ``records`` (warm engines: the
    folder of each record's engine log, logs/engines/local-<run>/), oldest run first, so
    that an engine's latest run counts."""
    folders = {Path(r["engine_log"]).parent for r in records if r.get("engine_log")}
    entries = []
    for folder in sorted(folders, key=lambda f: f.stat().st_mtime if f.exists() else 0):
        entries += read_registry(folder)
    latest = {entry["name"]: entry for entry in entries}
    return list(latest.values())


def submissions(
    records: Sequence[Mapping],
    pbs_logs: str | os.PathLike = "logs/pbs",
    engine_logs: str | os.PathLike = registry_format.REGISTRY_ROOT,
    tile_slots: int | None = None,
) -> list[Submission]:
    """The submissions that wrote ``records`` (read with summarize.read_records), then
    the local run if some records came from one. ``tile_slots``: see `account`."""
    index = read_index(pbs_logs)
    phases = {}
    for row in index:
        with contextlib.suppress(OSError, ValueError):  # not written (yet): estimated
            phases[row["id"]] = json.loads(phases_path(pbs_logs, row["id"]).read_text())
    owners = assign_records(records, index, phases)
    result = []
    for row in index:
        mine = owners.get(row["id"])
        if not mine:
            continue
        registry = read_registry(registry_format.job_registry(engine_logs, row["id"]))
        slots = slots_of(mine, registry)
        known = phases.get(row["id"], {})
        marks = known.get("phases", {})
        hosts = known.get("hosts") or sorted({s.host for s in slots}, key=_natural)
        for slot in slots:  # an engine on a host the nodes file lacks still counts
            if slot.host not in hosts:
                hosts.append(slot.host)
        first = min([rank_begin(r) for r in mine] + [s.started_at for s in slots if s.started_at])
        last = max(r["_end"] for r in mine)
        start = marks.get("start", first)
        staged = marks.get("staged", marks.get("setup", start))
        ranks_done = marks.get("ranks_done", last)
        end = marks.get("end", max(ranks_done, last))
        times = (start, staged, ranks_done, end)
        estimated = not {"start", "end"} <= set(marks)
        row_name, walltime = row["name"], row["walltime"]
        result.append(
            _submission(row["id"], row_name, walltime, hosts, slots, times, tile_slots, estimated)
        )
    local = owners.get(LOCAL)
    if local:
        slots = slots_of(local, local_registry(local))
        hosts = sorted({s.host for s in slots}, key=_natural)
        first = min([rank_begin(r) for r in local] + [s.started_at for s in slots if s.started_at])
        last = max(r["_end"] for r in local)
        name = "one local node" if len(hosts) == 1 else f"{len(hosts)} local hosts"
        times = (first, first, last, last)  # no set-up or stop of its own
        result.append(_submission(LOCAL, name, "", hosts, slots, times, tile_slots))
    return result


def _submission(
    id: str, name: str, walltime: str, hosts, slots, times, tile_slots, estimated=False
) -> Submission:
    """A Submission and its parts; ``times``: start, staged, ranks done, end."""
    start, staged, ranks_done, end = times
    return Submission(
        id=id,
        name=name,
        nodes=len(hosts),
        walltime=walltime,
        hosts=hosts,
        start=start,
        staged=staged,
        ranks_done=ranks_done,
        end=end,
        slots=slots,
        parts=account(slots, hosts, *times, tile_slots),
        estimated=estimated,
    )


# ----------------------------------------------------------------------------- tables


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:.6f}"


def submissions_tsv(subs: Sequence[Submission]) -> str:
    lines = ["\t".join(SUBMISSION_HEADER)]
    for s in subs:
        requested = s.requested_hours
        cells = [
            s.id,
            s.name,
            str(s.nodes),
            str(len(s.slots)),
            str(sum(len(slot.records) for slot in s.slots)),
            s.walltime,
            "" if requested is None else f"{requested:.6f}",
            _hours(s.used_s),
            *(_hours(s.parts[p]) for p in PARTS),
        ]
        lines.append("\t".join(" ".join(c.split()) for c in cells))
    return "\n".join(lines) + "\n"


def busy_fraction(slot: Slot, low: float, high: float) -> float | None:
    """Serving time over the time the engine was up (serving + idle) in [low, high]."""
    parts = slot_parts(slot, low, high)
    up = parts["serving"] + parts["idle"]
    return parts["serving"] / up if up > 0 else None


def engines_tsv(subs: Sequence[Submission]) -> str:
    lines = ["\t".join(ENGINE_HEADER)]
    for s in subs:
        for slot in s.slots:
            fraction = busy_fraction(slot, s.staged, s.ranks_done)
            cells = [
                s.id,
                slot.name,
                slot.host,
                slot.tile,
                "" if slot.ready_s is None else f"{slot.ready_s:.3f}",
                "" if slot.restarts is None else str(slot.restarts),
                str(len(slot.records)),
                str(sum(int(r["prompts"]) for r in slot.records)),
                str(sum(int(r["output_tokens"]) for r in slot.records)),
                "" if fraction is None else f"{fraction:.3f}",
            ]
            lines.append("\t".join(" ".join(c.split()) for c in cells))
    return "\n".join(lines) + "\n"


def parse_tsv(text: str) -> list[dict]:
    """Rows of submissions.tsv or engines.tsv as dicts of strings (for tests and tools)."""
    lines = text.splitlines()
    header = lines[0].split("\t")
    return [dict(zip(header, line.split("\t"), strict=True)) for line in lines[1:]]


def paragraph(subs: Sequence[Submission]) -> str:
    """The node-hours paragraph printed at the end of a run."""
    texts = []
    for s in subs:
        used = s.used_s
        # Short runs (tests, local) in node-seconds: node-hours would all read 0.000.
        unit, scale = ("node-hours", 3600) if used >= 360 else ("node-seconds", 1)
        parts = ", ".join(
            f"{PART_NAMES[p]} {s.parts[p] / scale:.{3 if scale > 1 else 1}f}"
            + (f" ({100 * s.parts[p] / used:.0f}%)" if used > 0 else "")
            for p in PARTS
        )
        requested = s.requested_hours
        what = (
            f"{s.name} ({s.id}, {s.nodes} node(s), {len(s.slots)} engine(s))"
            if s.id != LOCAL
            else f"{s.name} ({len(s.slots)} engine(s))"
        )
        text = f"Node-hours, {what}: "
        if requested is not None:
            text += f"requested {requested:.3f} node-hours, "
        text += f"used {used / scale:.{3 if scale > 1 else 1}f} {unit} = {parts}"
        if s.estimated:
            text += " (phase times not recorded: estimated from the records)"
        texts.append(text + ".")
    return "\n".join(texts)


# ----------------------------------------------------------------------------- entry points


def tile_slots(config: Mapping) -> int | None:
    """Engine slots per node of a run with per-rank engines (None: warm engines, whose
    engines the registry or the records name)."""
    if config.get("warm_engines", True):
        return None
    return max(1, engines_per_node(config["tiles"]["per_node"], config["tiles"]["per_job"]))


def _main(argv: Sequence[str]) -> int:
    """``accounting.py phase LOG_DIR NAME[=EPOCH_S]...``: note phases of this PBS job."""
    if len(argv) < 3 or argv[0] != "phase":
        print("usage: accounting.py phase LOG_DIR NAME[=EPOCH_S]...", file=sys.stderr)
        return 2
    record_phases(argv[1], argv[2:])
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
