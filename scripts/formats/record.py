"""The rank record: ``results/records/<rank>.json``, one per finished rank.

Written by the rank's task (scripts/rank/task.py, or a warm rank in scripts/rank/warm.py)
right after its generation ends, atomically and before the rank's answers: an answer file
(``<rank>.out`` or ``<rank>.jsonl``) whose digest its record holds is whole.

Read by the run report (reporting/summary.py, reporting/accounting.py), the progress
lines (reporting/progress.py), the rank files (rank/layout.py: is a rank whole) and the
PBS provider's continuations (pbs/continuation.py: done ranks and their pace).

A JSON object (indent 2), with these fields:
    rank             int
    prompts          requests of the rank (prompts of a ``.in``, lines of a ``.jsonl``)
    output_tokens, prompt_tokens   the engine's counts
    load_s, generate_s, import_s   seconds (per-rank engines: model load, generation,
                     vllm import); python_start_s: process start to main, or null
    tokens_per_s     output tokens / generate_s (0.0 without tokens)
    host, hostname   the engine's host (TILE_HOST) and this process's
    mask, tiles      ZE_AFFINITY_MASK and TILE_IDS of the engine ("" when unset)
    model, engine    the settings' model and engine ("vllm" or "echo")
    served_model_name  the name the answers carry (config vllm.served_model_name's first;
                     records written before 2026-12-06 have none)
    truncated        prompts truncated (long_prompts "truncate")
    resumed          answers kept from a stopped attempt (not generated again)
    versions         vLLM, torch, IPEX that generated it
    written_at       UNIX time of the write (the end of generation)
    out_sha256       sha256 of the answer file's bytes
    format           FORMAT (records written before 2026-12-05 have none: format 1)
    embedded         texts embedded (embedding ranks only; their prompt_tokens are the
                     texts' tokens, output_tokens 0)
Warm ranks add wait_s, request_s, engine_name, engine_log, engine_url and the like.

Stdlib only: the PBS provider reads records under a login node's Python.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

from formats.files import write_atomic

FORMAT = 1
FOLDER = "records"
# The fields a record must have to be read as one (the summary table's columns).
REQUIRED = (
    "rank",
    "prompts",
    "output_tokens",
    "load_s",
    "generate_s",
    "tokens_per_s",
    "host",
    "mask",
)
# Added to each record read by `read_record`: when its generation ended.
END_KEY = "_end"


class RecordError(ValueError):
    """A record file that is not a rank record, named by its path."""


def records_dir(results_dir: str | os.PathLike) -> Path:
    """The records' folder, ``<results>/records``."""
    return Path(results_dir, FOLDER)


def record_file(results_dir: str | os.PathLike, rank) -> Path:
    """The rank's record, ``<results>/records/<rank>.json``."""
    return records_dir(results_dir) / f"{rank}.json"


# ----------------------------------------------------------------------------- writing


def build_record(
    rank: int, settings: Mapping, requests, result: Mapping, started, placement=None
) -> dict:
    """The rank's record; ``placement``: the engine's environment (default: this one).

    Both kinds of rank count alike: "prompts" is the number of requests (prompts of a
    ``.in``, lines of a ``.jsonl``), the tokens are the engine's counts."""
    generate_s = result["generate_s"]
    answers = result["answers"].values()
    tokens = sum(a.output_tokens for a in answers)
    hostname = socket.gethostname()
    placement = os.environ if placement is None else placement
    record = {
        "rank": rank,
        "prompts": len(requests),
        "output_tokens": tokens,
        "prompt_tokens": sum(a.prompt_tokens for a in answers),
        "load_s": round(result["load_s"], 6),
        "generate_s": round(generate_s, 6),
        "tokens_per_s": round(tokens / generate_s, 1) if generate_s > 0 and tokens else 0.0,
        "import_s": round(result["import_s"], 6),
        "python_start_s": started,
        "host": placement.get("TILE_HOST") or hostname,
        "hostname": hostname,
        "mask": placement.get("ZE_AFFINITY_MASK", ""),
        "tiles": placement.get("TILE_IDS", ""),
        "model": settings["model"],
        # the name its answers carry (config vllm.served_model_name; older records: none)
        "served_model_name": (settings.get("served_model_name") or [settings["model"]])[0],
        "engine": settings["engine"],
        "truncated": result["truncated"],
        # answers kept from an earlier, stopped attempt at this rank (not generated again)
        "resumed": result.get("resumed", 0),
        # vLLM, torch, IPEX: what generated it (warm engines: rule fetch_model's marker)
        "versions": result.get("versions", {}),
    }
    embedded = sum(len(a.embeddings or ()) for a in answers)
    if embedded:
        record["embedded"] = embedded
    return record


def output_digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_record(path: str | os.PathLike, record: dict, output_text: str) -> None:
    """Stamp ``record`` (written_at, the digest of ``output_text``, the format) and
    write it atomically; the caller writes the answers after it."""
    # When the rank finished: the files' mtimes do not keep it (Snakemake touches
    # outputs when it checks them, in a PBS submission only at its end).
    record["written_at"] = round(time.time(), 6)
    # Proves the output whole after a kill (layout.forget_finished_incomplete).
    record["out_sha256"] = output_digest(output_text.encode())
    record["format"] = FORMAT
    write_atomic(path, json.dumps(record, indent=2) + "\n")


# ----------------------------------------------------------------------------- reading


def load(path: str | os.PathLike) -> dict | None:
    """The record at ``path``, or None if it cannot be read now (missing, being
    replaced, not a JSON object): for readers that look again later."""
    try:
        record = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def describes(record: Mapping | None, data: bytes) -> bool:
    """Whether ``data`` is the whole answer file ``record`` was written with."""
    return isinstance(record, Mapping) and record.get("out_sha256") == output_digest(data)


def began(record: Mapping) -> float:
    """When the rank's serving began: its end less its request (warm engines) or its
    generation (per-rank engines)."""
    return float(record["written_at"]) - float(
        record.get("request_s") or record.get("generate_s") or 0
    )


def read_record(path: str | os.PathLike) -> dict:
    """One rank's record, with the end of its generation under ``END_KEY``; raises
    RecordError naming the file.

    That is its ``written_at``: the task writes the record right after generation ends.
    Older records have none; their file's modification time stands in (Snakemake may
    touch outputs later, in a PBS submission all at its end).
    """
    path = Path(path)
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise RecordError(f"{path}: cannot read rank record: {exc}") from None
    if not isinstance(record, dict):
        raise RecordError(f"{path}: not a rank record (not a JSON object)")
    missing = [key for key in REQUIRED if key not in record]
    if missing:
        raise RecordError(f"{path}: not a rank record (missing {', '.join(missing)})")
    written = record.get("written_at")
    record[END_KEY] = written if isinstance(written, int | float) else path.stat().st_mtime
    return record


def read_records(paths: Iterable[str | os.PathLike]) -> list[dict]:
    """Records of the given files, in rank order."""
    return sorted((read_record(p) for p in paths), key=lambda r: int(r["rank"]))


def existing_records(records_dir: str | os.PathLike, ranks: Iterable[str]) -> list[dict]:
    """Records of those ``ranks`` that have one in ``records_dir`` (a partial run)."""
    folder = Path(records_dir)
    paths = (folder / f"{rank}.json" for rank in ranks)
    return read_records(p for p in paths if p.is_file())
