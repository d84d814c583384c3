"""A rank's answers written out: the seed's records (``.out``) or answer lines (``.jsonl``),
atomically and in input order, after the rank's record (formats/record.py); `finish_rank`
is the end of every rank, on warm engines (rank/warm.py) or an engine of its own
(rank/task.py)."""

from __future__ import annotations

from pathlib import Path

from formats.files import write_atomic
from formats.partial import Partial, file_digest
from formats.record import build_record, write_record
from rank.checks import fail_on_refused, refused_requests
from rank.jsonl import Request, answer_line, embedding_rank, is_jsonl, npy_bytes
from rank.prompts import format_record


def npy_path(output) -> Path:
    """Where config vllm.embeddings_npy puts a rank's vectors: beside its JSONL output."""
    return Path(output).with_suffix(".npy")


def npy_rows(requests: list[Request], answers: dict) -> tuple[list, list]:
    """Each request's first row in the rank's .npy (None: no vectors), and all the rows."""
    starts, rows = [], []
    for i, request in enumerate(requests):
        vectors = answers[i].embeddings if request.embedding else None
        starts.append(len(rows) if vectors else None)
        rows += vectors or []
    return starts, rows


def output_text(
    rank_file, requests: list[Request], answers: dict, rank: int, model: str, starts=None
) -> str:
    """The rank's output: seed records for a ``.in``, answer lines for a ``.jsonl``
    (``starts``: each request's first row in the rank's .npy, when it has one)."""
    ordered = [answers[i] for i in range(len(requests))]
    if not is_jsonl(rank_file):
        return "".join(
            format_record(r.prompt, a.text) for r, a in zip(requests, ordered, strict=True)
        )
    digest = file_digest(rank_file)
    starts = starts or [None] * len(requests)
    return "".join(
        answer_line(r, a, rank, digest, model, row)
        for r, a, row in zip(requests, ordered, starts, strict=True)
    )


def finish_rank(
    rank: int,
    settings: dict,
    requests: list[Request],
    result: dict,
    paths: tuple,
    started: float | None = None,
    placement=None,
    fields: dict | None = None,
) -> str:
    """The end of a rank: its refused requests checked (config vllm.bad_requests
    "fail_rank" raises UsageError, nothing written), then its record written, then its
    output (both atomically), then its partial answers dropped; the one-line summary.

    ``paths``: the rank file, the output, the record. The record is formats/record.py's
    `build_record` (``started``, ``placement``) with the caller's ``fields``. Config
    vllm.embeddings_npy: an embeddings rank's vectors go to ``<rank>.npy`` beside the
    output, written before it, its lines naming their rows."""
    rank_file, output, record_path = paths
    fail_on_refused(requests, result["answers"], settings, rank_file)
    starts = None
    npy = None
    if settings["embeddings_npy"] and embedding_rank(requests):
        starts, rows = npy_rows(requests, result["answers"])
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        write_atomic(npy_path(output), npy_bytes(rows))
        npy = str(npy_path(output))
    record = build_record(rank, settings, requests, result, started, placement)
    record |= fields or {}
    record |= refused_requests(requests, result["answers"], rank_file)  # issue 30
    if npy:
        record["npy"] = npy
    text = output_text(
        rank_file, requests, result["answers"], record["rank"], record["served_model_name"], starts
    )
    for target in (record_path, output):
        Path(target).parent.mkdir(parents=True, exist_ok=True)
    # Record first, output last: the output existing means the rank finished.
    write_record(record_path, record, text)
    write_atomic(output, text)
    Partial(output, {}).remove()
    r = record
    return (
        f"rank {r['rank']}: {r['prompts']} prompts, {r['output_tokens']} tokens, "
        f"load {r['load_s']:.2f} s, generate {r['generate_s']:.2f} s, "
        f"{r['tokens_per_s']:.1f} tok/s, host {r['host']}, mask {r['mask'] or '-'}"
        + (f", {r['resumed']} answers kept from a stopped attempt" if r["resumed"] else "")
    )
