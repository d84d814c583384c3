"""The rank answers of a dataset put back together, in input order, streaming (one rank
file, or one batch of the input table, in memory at a time) and atomically (a temporary
file in the same folder, renamed when whole): ``results/<name>.jsonl``, or
``results/<name>.parquet`` with the input's carried columns beside the answer columns (the
input a Parquet file or a datasets folder, read through tables.py).

A request the engine refused keeps its place: its error line in the JSONL, its ``error``
column in the Parquet file.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

from . import tables

# Answer columns of a Parquet output (besides the carried ones).
ANSWER_COLUMNS = ("id", "text", "finish_reason", "prompt_tokens", "output_tokens", "error")


@contextlib.contextmanager
def atomic_target(target: str | os.PathLike):
    """A temporary path beside ``target``, renamed to it when the block ends without error
    (removed otherwise)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def merge_jsonl(answers: Sequence[str | os.PathLike], target: str | os.PathLike) -> None:
    """The ranks' answer files, in rank order, as one file. Embedding ranks whose vectors
    are in ``<rank>.npy`` (vllm.embeddings_npy): their rows in one ``<name>.npy`` beside
    the target, written first, and each line's ``npy_row`` counted in it."""
    npys = [Path(a).with_suffix(".npy") for a in answers]
    offsets = (
        merge_npy(npys, Path(target).with_suffix(".npy"))
        if all(p.exists() for p in npys) and npys
        else None
    )
    with atomic_target(target) as tmp, open(tmp, "wb") as out:
        for rank, path in enumerate(answers):
            with open(path, "rb") as part:
                if offsets is None:
                    shutil.copyfileobj(part, out, 1 << 20)
                    continue
                for raw in part:
                    out.write(shifted_rows(raw, offsets[rank]))
        out.flush()
        os.fsync(out.fileno())


NPY_MAGIC = b"\x93NUMPY\x01\x00"


def npy_rows(path: Path) -> tuple[int, int, int]:
    """(rows, width, header bytes) of a float32 .npy as rank/jsonl.py's npy_bytes writes."""
    with open(path, "rb") as handle:
        head = handle.read(10)
        if not head.startswith(NPY_MAGIC):
            raise ValueError(f"{path}: not a .npy file of format 1.0")
        size = int.from_bytes(head[8:10], "little")
        header = handle.read(size).decode("latin1")
    match = re.search(r"'shape': \((\d+), (\d+)\)", header)
    if "'<f4'" not in header or not match:
        raise ValueError(f"{path}: not a 2-D float32 .npy: {header.strip()}")
    return int(match.group(1)), int(match.group(2)), 10 + size


def merge_npy(parts: Sequence[Path], target: Path) -> list[int]:
    """The rows of ``parts`` in one .npy (atomically); each part's first row in it."""
    shapes = [npy_rows(p) for p in parts]
    widths = {w for rows, w, _ in shapes if rows}
    if len(widths) > 1:
        raise ValueError(f"{target}: the ranks' vectors differ in width: {sorted(widths)}")
    total, width = sum(rows for rows, _, _ in shapes), next(iter(widths), 0)
    header = f"{{'descr': '<f4', 'fortran_order': False, 'shape': ({total}, {width}), }}"
    header += " " * (-(len(header) + 11) % 64) + "\n"
    offsets, at = [], 0
    with atomic_target(target) as tmp, open(tmp, "wb") as out:
        out.write(NPY_MAGIC + len(header).to_bytes(2, "little") + header.encode())
        for path, (rows, _, skip) in zip(parts, shapes, strict=True):
            offsets.append(at)
            at += rows
            with open(path, "rb") as part:
                part.seek(skip)
                shutil.copyfileobj(part, out, 1 << 20)
        out.flush()
        os.fsync(out.fileno())
    return offsets


def shifted_rows(raw: bytes, offset: int) -> bytes:
    """An answer line with its items' ``npy_row`` moved by ``offset``."""
    if not offset or b'"npy_row"' not in raw:
        return raw
    line = json.loads(raw)
    body = (line.get("response") or {}).get("body") if "response" in line else line
    for item in (body or {}).get("data") or ():
        if item.get("npy_row") is not None:
            item["npy_row"] += offset
    return (json.dumps(line, ensure_ascii=False) + "\n").encode()


def answer_rows(answers: Sequence[str | os.PathLike]) -> Iterator[dict]:
    """Each answer line's fields, in order (OpenAI batch lines read into the short form)."""
    for path in answers:
        with open(path, "rb") as part:
            for raw in part:
                yield answer_fields(json.loads(raw))


def answer_fields(line: dict) -> dict:
    """One answer line as the Parquet columns: a short line's fields, or a batch line's."""
    if "response" in line or "custom_id" in line:
        body = (line.get("response") or {}).get("body") or {}
        error = body.get("error") or line.get("error")
        choice = (body.get("choices") or [{}])[0]
        text = choice.get("text", (choice.get("message") or {}).get("content"))
        usage = body.get("usage") or {}
        line = {
            "id": line.get("custom_id"),
            "text": text,
            "finish_reason": choice.get("finish_reason"),
            "prompt_tokens": usage.get("prompt_tokens"),
            "output_tokens": usage.get("completion_tokens"),
            "error": error,
            "data": body.get("data"),
        }
    row = {key: line.get(key) for key in ANSWER_COLUMNS}
    row["id"] = None if row["id"] is None else str(row["id"])
    if row["error"] is not None:
        row["error"] = json.dumps(row["error"], ensure_ascii=False)
    if line.get("data") is not None:  # embeddings: the first text's vector
        vectors = [item.get("embedding") for item in line["data"]]
        row["embedding"] = vectors[0] if len(vectors) == 1 else None
        row["embeddings"] = vectors
        row["text"] = None
    return row


def merge_parquet(
    source: str,
    answers: Sequence[str | os.PathLike],
    target: str | os.PathLike,
    carry: Sequence[str] = (),
    embed: bool = False,
) -> None:
    """The answers as Parquet, each row beside the input row's ``carry`` columns (the input
    ``source``: a Parquet file or a datasets folder)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    given = tables.schema(source)
    missing = [c for c in carry if c not in given.names]
    if missing:
        raise tables.DatasetError(
            f"{source}: no column(s) {missing} (config key dataset.carry; columns: "
            f"{', '.join(given.names)})"
        )
    columns = list(ANSWER_COLUMNS) + (["embedding"] if embed else [])
    types = {
        "id": pa.string(),
        "text": pa.string(),
        "finish_reason": pa.string(),
        "prompt_tokens": pa.int64(),
        "output_tokens": pa.int64(),
        "error": pa.string(),
        "embedding": pa.list_(pa.float32()),
    }
    carried = [given.field(c) for c in carry]
    schema = pa.schema(carried + [pa.field(c, types[c]) for c in columns])
    rows = answer_rows(answers)
    with atomic_target(target) as tmp:
        writer = pq.ParquetWriter(tmp, schema)
        try:
            for batch in tables.batches(source, list(carry)):
                got = [next(rows, None) for _ in range(batch.num_rows)]
                if any(row is None for row in got):
                    raise ValueError(f"{target}: fewer answers than rows in {source}")
                arrays = [batch.column(c) for c in carry]
                arrays += [pa.array([r.get(c) for r in got], types[c]) for c in columns]
                writer.write_batch(pa.record_batch(arrays, schema=schema))
        finally:
            writer.close()
        if next(rows, None) is not None:
            raise ValueError(f"{target}: more answers than rows in {source}")


def merge(dataset, answers: Sequence[str | os.PathLike], target: str | os.PathLike) -> None:
    """Rule merge_dataset: the answer file of ``dataset`` (a source.Dataset)."""
    if dataset.table:
        merge_parquet(dataset.source, answers, target, dataset.carry, dataset.embed)
    else:
        merge_jsonl(answers, target)
