"""Cut a dataset into rank files, streaming: ``<folder>/<rank>.jsonl`` of ``rank_size``
requests each (the last one fewer), and the manifest ``<folder>/ranks.json`` that the
Snakefile's checkpoint ``cut_dataset`` writes and reads (this module owns its format).

The cut is deterministic: rank ``r`` holds requests ``r x rank_size`` to
``(r + 1) x rank_size - 1`` (blank lines are skipped). A rank file whose bytes would not
change is not written again, so it keeps its time stamp and Snakemake does not answer
it again: a rerun redoes nothing, and lines appended to the dataset rerun only its last,
partly filled rank and the new ones.

Every line passes rank/jsonl.py's checks; a bad one stops the cut naming the dataset and
its line. Changed rank files are written to a staging folder first and moved into place
only when the whole dataset has passed: a failed cut leaves the folder as it was.

A short line without an ``id`` gets its line number in the dataset as its id, so its
answer is named by its place in the dataset, not in its rank.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from formats.files import write_atomic
from rank.jsonl import RequestFileError, check_next, parse_line

from . import tables
from .source import Dataset, DatasetError

MANIFEST = "ranks.json"
FORMAT = 1
STAGING = ".cut"
BOM = b"\xef\xbb\xbf"


def manifest_path(folder: str | os.PathLike) -> Path:
    return Path(folder, MANIFEST)


def read_manifest(path: str | os.PathLike) -> dict | None:
    """The manifest, or None if there is none (or an unreadable one)."""
    try:
        manifest = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) and manifest.get("format") == FORMAT else None


def rank_files(manifest: dict) -> dict[str, str]:
    """Rank -> its file's name, as rank/layout.py's discover_rank_files gives them."""
    return {str(rank): f"{rank}.jsonl" for rank in range(manifest["ranks"])}


def current_manifest(dataset: Dataset, folder: str | os.PathLike) -> dict | None:
    """The manifest if it describes this dataset as it is now (cut after its last change,
    with the same settings), else None."""
    path = manifest_path(folder)
    manifest = read_manifest(path)
    if manifest is None or manifest.get("settings") != cut_settings(dataset):
        return None
    with contextlib.suppress(OSError, DatasetError):
        if tables.newest_change(dataset.source) <= path.stat().st_mtime:
            return manifest
    return None


def cut_settings(dataset: Dataset) -> dict:
    """What decides the rank files' bytes besides the dataset's own."""
    settings = {"rank_size": dataset.rank_size}
    if dataset.table:
        settings |= {"column": dataset.column, "embed": dataset.embed}
    return settings


def jsonl_lines(source: str) -> Iterator[tuple[int, bytes, str]]:
    """(line number, raw line, the file as messages name it) of a JSONL dataset."""
    with open(source, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if number == 1 and raw.startswith(BOM):
                raw = raw[len(BOM) :]
            yield number, raw.rstrip(b"\n"), source


def table_lines(dataset: Dataset) -> Iterator[tuple[int, bytes, str]]:
    """(row number, a short request line, the file as messages name it) of a table
    dataset's column (tables.py: a Parquet file or a datasets folder): a string is a prompt
    (with dataset.embed a text to embed), a list of {role, content} the messages. The
    row's index (from 0) is its id."""
    names = tables.columns(dataset.source)
    if dataset.column not in names:
        raise DatasetError(
            f"{dataset.source}: no column {dataset.column!r} (config key dataset.column; "
            f"columns: {', '.join(names)})"
        )
    where = f"{dataset.source} (column {dataset.column}, rows counted from 1)"
    row = 0
    for batch in tables.batches(dataset.source, [dataset.column]):
        for value in batch.column(0).to_pylist():
            if dataset.embed:
                key = "input"
            else:
                key = "prompt" if isinstance(value, str) or value is None else "messages"
            line = json.dumps({"id": row, key: value}, ensure_ascii=False).encode()
            row += 1
            yield row, line, where


def rank_lines(dataset: Dataset) -> Iterator[tuple[int, bytes]]:
    """(rank, its request lines joined) in order, every line checked."""
    table = dataset.table  # once: for a folder it is a stat of the source
    lines = table_lines(dataset) if table else jsonl_lines(dataset.source)
    first, seen, chunk, rank = [], {}, [], 0
    for number, raw, where in lines:
        request = parse_line(raw, number, where)
        if request is None:
            continue
        # one kind in the whole dataset, ids unique within a rank
        check_next(first, request, seen, where)
        first = first or [request]
        if not request.batch and request.id == number and not table:
            fields = json.loads(raw)
            if "id" not in fields:
                raw = json.dumps({"id": number, **fields}, ensure_ascii=False).encode()
        chunk.append(raw)
        if len(chunk) == dataset.rank_size:
            yield rank, b"\n".join(chunk) + b"\n"
            chunk, seen, rank = [], {}, rank + 1
    if chunk:
        yield rank, b"\n".join(chunk) + b"\n"


def same_bytes(path: Path, data: bytes) -> bool:
    try:
        if path.stat().st_size != len(data):
            return False
        return path.read_bytes() == data
    except OSError:
        return False


def cut(dataset: Dataset, folder: str | os.PathLike, log=None) -> dict:
    """Cut ``dataset`` into ``folder``; write the manifest last; return it.

    Raises DatasetError (or rank/jsonl's RequestFileError, a ValueError too) naming the
    file and line; the folder then holds what it held before."""
    folder = Path(folder)
    staging = folder / STAGING
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    sizes, changed, total_bytes = [], [], 0
    try:
        for rank, data in rank_lines(dataset):
            sizes.append(data.count(b"\n"))
            total_bytes += len(data)
            if not same_bytes(folder / f"{rank}.jsonl", data):
                # no fsync per file: the manifest, written last, is what says the cut is whole
                (staging / f"{rank}.jsonl").write_bytes(data)
                changed.append(rank)
    except (RequestFileError, DatasetError, OSError) as error:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(error, OSError):
            raise DatasetError(f"{dataset.source}: {error.strerror or error}") from None
        raise
    if not sizes:
        shutil.rmtree(staging, ignore_errors=True)
        raise DatasetError(f"{dataset.source}: no requests (config key dataset.input)")
    with contextlib.suppress(FileNotFoundError):
        manifest_path(folder).unlink()  # from here on the folder is not a whole cut
    for rank in changed:
        os.replace(staging / f"{rank}.jsonl", folder / f"{rank}.jsonl")
    shutil.rmtree(staging, ignore_errors=True)
    for path in folder.glob("*.jsonl"):  # ranks of a longer dataset, or a larger rank_size
        if path.stem.isdigit() and int(path.stem) >= len(sizes):
            path.unlink()
    manifest = {
        "format": FORMAT,
        "source": dataset.source,
        "settings": cut_settings(dataset),
        "requests": sum(sizes),
        "ranks": len(sizes),
        "sizes": sizes,
        "bytes": total_bytes,
        "changed": changed if len(changed) < 1000 else len(changed),
    }
    write_atomic(manifest_path(folder), json.dumps(manifest) + "\n")
    if log:
        Path(log).parent.mkdir(parents=True, exist_ok=True)
        Path(log).write_text(describe_cut(manifest, changed) + "\n")
    return manifest


def describe_cut(manifest: dict, changed: list[int]) -> str:
    kept = manifest["ranks"] - len(changed)
    return (
        f"{manifest['source']}: {manifest['requests']} requests in {manifest['ranks']} ranks "
        f"of {manifest['settings']['rank_size']}; {len(changed)} rank file(s) written, "
        f"{kept} unchanged"
    )


def known_rank_files(dataset: Dataset, folder: str | os.PathLike) -> dict[str, str]:
    """The rank files of the dataset's last cut (empty before the first), for what the
    Snakefile needs when it loads; the ranks the DAG runs come from the checkpoint."""
    manifest = read_manifest(manifest_path(folder))
    return rank_files(manifest) if manifest else {}


def ranks_now(folder: str | os.PathLike, ranks: list[str]) -> list[str]:
    """The ranks at the end of a run: a dataset's cut may have changed them since the
    Snakefile loaded (``ranks``: what it knew then)."""
    manifest = read_manifest(manifest_path(folder))
    return list(rank_files(manifest)) if manifest else ranks


def count_requests(dataset: Dataset) -> int:
    """Requests of the dataset as it is now, without checking them (the bill's count)."""
    if dataset.table:
        return tables.count_rows(dataset.source)
    count = 0
    with open(dataset.source, "rb") as handle:
        for raw in handle:
            count += bool(raw.strip())
    return count
