"""A rank's answers written out: the seed's records (``.out``) or answer lines (``.jsonl``),
atomically and in input order, and the key that ties partial answers to their settings."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

from formats.files import write_atomic
from rank.jsonl import Partial, Request, answer_line, is_jsonl, npy_bytes
from rank.prompts import format_record


def partial_key(path, settings: dict) -> dict:
    """What a rank's kept answers depend on (jsonl_ranks.Partial): the rank file's bytes
    and the settings that shape answers."""
    from rank.jsonl import file_digest

    shaping = ("engine", "model", "sampling", "chat_template", "long_prompts", "max_model_len")
    return {"input": file_digest(path)} | {k: settings[k] for k in shaping}


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
    from rank.jsonl import file_digest

    digest = file_digest(rank_file)
    starts = starts or [None] * len(requests)
    return "".join(
        answer_line(r, a, rank, digest, model, row)
        for r, a, row in zip(requests, ordered, starts, strict=True)
    )


def write_outputs(
    rank_file,
    requests: list[Request],
    result: dict,
    record: dict,
    output,
    record_path,
    npy: bool = False,
) -> str:
    """Write the record, then the output (both atomically), then drop the rank's partial
    answers; return the one-line summary. ``npy`` (config vllm.embeddings_npy): an
    embeddings rank's vectors go to ``<rank>.npy`` beside the output, written before it,
    its lines naming their rows."""
    starts = None
    if npy and requests and requests[0].embedding:
        starts, rows = npy_rows(requests, result["answers"])
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        write_atomic(npy_path(output), npy_bytes(rows))
        record["npy"] = str(npy_path(output))
    text = output_text(
        rank_file, requests, result["answers"], record["rank"], record["model"], starts
    )
    for target in (record_path, output):
        Path(target).parent.mkdir(parents=True, exist_ok=True)
    # When the rank finished: the files' mtimes do not keep it (Snakemake touches
    # outputs when it checks them, in a PBS submission only at its end).
    record["written_at"] = round(time.time(), 6)
    # Proves the output whole after a kill (ranks.forget_finished_incomplete).
    record["out_sha256"] = hashlib.sha256(text.encode()).hexdigest()
    # Record first, output last: the output existing means the rank finished.
    write_atomic(record_path, json.dumps(record, indent=2) + "\n")
    write_atomic(output, text)
    Partial(output, {}).remove()
    r = record
    return (
        f"rank {r['rank']}: {r['prompts']} prompts, {r['output_tokens']} tokens, "
        f"load {r['load_s']:.2f} s, generate {r['generate_s']:.2f} s, "
        f"{r['tokens_per_s']:.1f} tok/s, host {r['host']}, mask {r['mask'] or '-'}"
        + (f", {r['resumed']} answers kept from a stopped attempt" if r["resumed"] else "")
    )
