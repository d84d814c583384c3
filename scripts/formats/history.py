"""The history of finished runs: ``logs/history.jsonl``, one line per run whose ranks
were answered (written by rule summary), read by the bill before the next run
(scripts/dataset/bill.py): what a request cost on the same model and engine settings.

A JSON object per line:
    format           FORMAT
    written_at       UNIX time
    settings         `settings_key` of the run's config (model, engine and its settings,
                     sampling, tiles, where it ran)
    model, engine    as in the config
    where            "pbs" or "local"
    requests, ranks  answered in this run (ranks of earlier runs not counted)
    output_tokens, prompt_tokens
    nodes            node-submissions (sum of each submission's nodes; a local run: 1)
    node_s           node-seconds used
    work_node_s      node-seconds serving or idle between requests (accounting's parts),
                     less those of engines that served no request (dataset/bill.py)
    fixed_s          seconds per node-submission of set-up, engine start and stop
    ranks_at_once    most ranks a node had in flight (its engines' rank slots, or fewer
                     ranks; lines written before 2026-12-07 have none)

Stdlib only.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Mapping
from pathlib import Path

FORMAT = 1
PATH = "logs/history.jsonl"


def settings_key(config: Mapping, model: str, where: str) -> str:
    """What decides a request's cost: the same key, the same engines doing the same work."""
    vllm = {k: v for k, v in config["vllm"].items() if k not in ("embeddings_npy", "bad_requests")}
    warm = config["warm"]
    fields = {
        "model": model,
        "engine": config["engine"],
        "vllm": vllm,
        "sampling": config["sampling"],
        "warm_engines": config["warm_engines"],
        "warm": [warm["server"], warm["ranks_in_flight"]] if config["warm_engines"] else None,
        "tiles": [config["tiles"]["per_node"], config["tiles"]["per_job"]],
        "where": where,
    }
    text = json.dumps(fields, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def append(entry: dict, path: str | os.PathLike = PATH) -> None:
    """One line more; a line is written whole by one write (O_APPEND)."""
    line = json.dumps({"format": FORMAT, "written_at": time.time(), **entry}) + "\n"
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def read(path: str | os.PathLike = PATH) -> list[dict]:
    """The entries, oldest first (a line that is not one is skipped)."""
    entries = []
    try:
        lines = Path(path).read_text().splitlines()
    except OSError:
        return entries
    for line in lines:
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict) and entry.get("format") == FORMAT:
            entries.append(entry)
    return entries


def latest(key: str, path: str | os.PathLike = PATH, minimum_requests: int = 1) -> dict | None:
    """The newest entry of settings ``key`` with at least ``minimum_requests`` requests."""
    found = [e for e in read(path) if e.get("settings") == key]
    found = [e for e in found if e.get("requests", 0) >= minimum_requests and e.get("work_node_s")]
    return found[-1] if found else None
