"""Find the rank files of a run: ``<data_dir>/<rank>.in`` (one prompt a line, answered
in ``<rank>.out``) or ``<data_dir>/<rank>.jsonl`` (requests, answered in ``<rank>.jsonl``),
with ``rank`` a non-negative integer."""

import base64
import contextlib
import os
import re
import sys
from collections import defaultdict
from pathlib import Path

from formats import record as rank_record
from formats.record import record_file  # noqa: F401 (the rank's record, for this module's callers)
from rank.prompts import LINE_END

RANK_FILE = re.compile(r"(\d+)\.(?:in|jsonl)")
# input suffix -> output suffix
OUTPUT_OF = {".in": ".out", ".jsonl": ".jsonl"}


class RankFileError(ValueError):
    """The data folder does not describe a clean set of ranks."""


def discover_ranks(data_dir: str | Path) -> list[str]:
    """The ranks of the data folder, as spelled in their file names, in numeric order.

    Every ``*.in`` and ``*.jsonl`` must be named by a non-negative integer, and no two
    files may name the same rank (``7.in`` and ``07.in``, or ``7.in`` and ``7.jsonl``):
    the user meant one of them, and guessing which would silently drop prompts.
    """
    return list(discover_rank_files(data_dir))


def discover_rank_files(data_dir: str | Path) -> dict[str, str]:
    """Rank -> its file's name, in numeric order (`discover_ranks`)."""
    data = Path(data_dir)
    if not data.is_dir():
        raise RankFileError(f"data folder {str(data)!r} does not exist (config key data_dir)")
    bad, names_of = [], defaultdict(list)
    found = [*data.glob("*.in"), *data.glob("*.jsonl")]
    for path in sorted(found, key=lambda p: p.name):
        match = RANK_FILE.fullmatch(path.name)
        if match:
            names_of[int(match.group(1))].append(path.name)
        else:
            bad.append(path.name)
    problems = []
    if bad:
        problems.append(
            "input files whose name is not a non-negative integer rank: " + ", ".join(bad)
        )
    clashes = [names for names in names_of.values() if len(names) > 1]
    if clashes:
        problems.append(
            "several files for one rank: " + "; ".join(" and ".join(n) for n in clashes)
        )
    if problems:
        raise RankFileError(f"data folder {str(data)!r}: " + "; ".join(problems))
    if not names_of:
        raise RankFileError(f"data folder {str(data)!r} has no <rank>.in or <rank>.jsonl files")
    return {names[0].split(".")[0]: names[0] for _, names in sorted(names_of.items())}


def input_file(data_dir: str | Path, rank: str) -> Path:
    """The rank's file: ``<rank>.jsonl`` if there is one, else ``<rank>.in``."""
    jsonl = Path(data_dir, f"{rank}.jsonl")
    return jsonl if jsonl.exists() else Path(data_dir, f"{rank}.in")


def count_requests(path: str | os.PathLike) -> int:
    """Requests of a rank file, unchecked (the bill's count): its non-blank lines, as
    rank/prompts.py and rank/jsonl.py read them (a blank line is no request)."""
    with open(path, "rb") as handle:
        return sum(1 for raw in LINE_END.split(handle.read()) if raw.strip())


def output_file(results_dir: str | Path, data_dir: str | Path, rank: str) -> Path:
    """Where the rank's answers go: ``<rank>.out`` for a ``.in``, ``<rank>.jsonl`` for a
    ``.jsonl``."""
    return Path(results_dir, rank + OUTPUT_OF[input_file(data_dir, rank).suffix])


def outputs(results_dir: str, rank_files: dict[str, str]) -> list[str]:
    """The answer files of ``rank_files`` (`discover_rank_files`), for rule all."""
    return [
        f"{results_dir}/{rank}{OUTPUT_OF[Path(name).suffix]}" for rank, name in rank_files.items()
    ]


def records(results_dir: str, ranks: list[str]) -> list[str]:
    """The records of ``ranks``, written by the rule that writes each rank's answers."""
    return [str(record_file(results_dir, rank)) for rank in ranks]


def rule_of(rank_file: str) -> str:
    """The Snakefile rule that answers a rank file."""
    return "infer_jsonl" if rank_file.endswith(".jsonl") else "infer"


def rank_is_whole(results_dir: str | Path, rank: str) -> bool:
    """Whether ``<rank>.out`` (or ``<rank>.jsonl``) is the whole file its record
    describes (out_sha256).

    The task writes the record, then the output, each atomically; the record carries
    the output's digest, so this holds exactly for a rank that finished writing."""
    results = Path(results_dir)
    record = rank_record.load(record_file(results, rank))
    if record is None:
        return False
    for suffix in (".out", ".jsonl"):
        try:
            data = (results / f"{rank}{suffix}").read_bytes()
        except OSError:
            continue
        if rank_record.describes(record, data):
            return True
    return False


def forget_finished_incomplete(
    results_dir: str, marker_dir: str | Path = ".snakemake/incomplete"
) -> list[str]:
    """Drop Snakemake's "incomplete" marks of ranks whose outputs are whole; return them.

    Snakemake records a job as finished only after the job returns: a Snakemake killed
    between a rank's last write and that record (up to a second when many warm-engine
    ranks finish together) leaves the rank marked, and --rerun-incomplete would redo
    it although its output is whole. A rank still being written has no .out yet (atomic
    writes), so its mark is kept."""
    folder = re.escape(str(results_dir).rstrip("/"))
    pattern = re.compile(rf"{folder}/(?:{rank_record.FOLDER}/)?(\d+)\.(?:out|json|jsonl)")
    forgotten = []
    with contextlib.suppress(FileNotFoundError):
        for entry in os.scandir(marker_dir):
            try:
                path = base64.urlsafe_b64decode(entry.name).decode()
            except ValueError:
                continue  # Snakemake's own files (migration_underway)
            match = pattern.fullmatch(path)
            if match and rank_is_whole(results_dir, match.group(1)):
                with contextlib.suppress(FileNotFoundError):
                    os.remove(entry.path)
                forgotten.append(match.group(1))
    return sorted(set(forgotten), key=int)


def report_kept(kept: list[str], stream=None) -> None:
    if kept:
        shown = ", ".join(kept[:10]) + (f" and {len(kept) - 10} more" if len(kept) > 10 else "")
        print(
            f"Kept {len(kept)} rank(s) that an interrupted run had finished but Snakemake had "
            f"not yet recorded (their records prove the outputs whole): {shown}",
            file=stream or sys.stderr,
        )


def pending_ranks(ranks, data_dir: str, results_dir: str, marker=()) -> list[str]:
    """Ranks whose outputs (``.out`` or ``.jsonl``, and record) are missing or older than
    the input.

    What a run will redo: rule infer writes both, and rule summary needs the records.

    All of them while the model still has to be fetched (``marker`` missing): the
    fetch job then updates every rank's input.
    """
    if any(not os.path.exists(path) for path in marker):
        return list(ranks)
    pending = []
    for rank in ranks:
        since = input_file(data_dir, rank).stat().st_mtime
        outputs = (
            output_file(results_dir, data_dir, rank),
            record_file(results_dir, rank),
        )
        if any(not out.exists() or out.stat().st_mtime < since for out in outputs):
            pending.append(rank)
    return pending
