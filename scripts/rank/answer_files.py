"""A rank's answers written out: the seed's records (``.out``) or answer lines (``.jsonl``),
atomically and in input order, and the key that ties partial answers to their settings."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

from formats.files import write_atomic
from rank.jsonl import Partial, Request, answer_line, is_jsonl
from rank.prompts import format_record


def partial_key(path, settings: dict) -> dict:
    """What a rank's kept answers depend on (jsonl_ranks.Partial): the rank file's bytes
    and the settings that shape answers."""
    from rank.jsonl import file_digest

    shaping = ("engine", "model", "sampling", "chat_template", "long_prompts", "max_model_len")
    return {"input": file_digest(path)} | {k: settings[k] for k in shaping}


def output_text(rank_file, requests: list[Request], answers: dict, rank: int, model: str) -> str:
    """The rank's output: seed records for a ``.in``, answer lines for a ``.jsonl``."""
    ordered = [answers[i] for i in range(len(requests))]
    if not is_jsonl(rank_file):
        return "".join(
            format_record(r.prompt, a.text) for r, a in zip(requests, ordered, strict=True)
        )
    from rank.jsonl import file_digest

    digest = file_digest(rank_file)
    return "".join(
        answer_line(r, a, rank, digest, model) for r, a in zip(requests, ordered, strict=True)
    )


def write_outputs(
    rank_file, requests: list[Request], result: dict, record: dict, output, record_path
) -> str:
    """Write the record, then the output (both atomically), then drop the rank's partial
    answers; return the one-line summary."""
    text = output_text(rank_file, requests, result["answers"], record["rank"], record["model"])
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
