"""A rank's partial answers: ``results/.partial/<answer file name>``, the answers a
rank has so far, kept while it runs so that a rank stopped mid-way and run again
generates only the rest.

Written and read by the rank's task (rank/task.py with rank/offline.py, or rank/warm.py
on warm engines); removed once the rank's whole answer file is written
(rank/answer_files.py).

JSON lines, appended and flushed as each answer finishes:
    line 1   {"key": K, "format": FORMAT}: K is the sha256 of `partial_key` (the rank
             file's digest and the settings that shape answers); files written before
             2026-12-05 have no "format" (format 1)
    then     {"index": i, "text": ..., "finish_reason": ..., "prompt_tokens": n,
             "output_tokens": n}, one per finished request (any order); an embeddings
             answer's vectors as "embeddings_f32" (format 2: base64 of each vector's
             little-endian float32, when float32 holds them exactly, as vLLM's vectors
             always are) or as "embeddings" (lists of numbers)
Answers under another key are dropped (the input or the settings changed); so is a
last line a kill cut short.

Stdlib only.
"""

from __future__ import annotations

import array
import base64
import hashlib
import json
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from formats.files import write_atomic

FORMAT = 2
FOLDER = ".partial"
# The settings that shape a rank's answers: kept answers under other values are dropped.
SHAPING = ("engine", "model", "sampling", "chat_template", "long_prompts", "max_model_len")


@dataclass(frozen=True)
class Answer:
    """One request's answer, as the engine gave it."""

    text: str
    finish_reason: str | None
    prompt_tokens: int
    output_tokens: int
    # OpenAI's choices when they say more than `text` (n > 1, logprobs): answered as they are
    choices: list | None = None
    # a refused request: {"message", "param"} (answered as OpenAI's batch error line)
    error: dict | None = None
    # embeddings: one vector per input text, in input order
    embeddings: list | None = None
    # score and rerank: the engine's answer body as vLLM's server gave it
    body: dict | None = None


def file_digest(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes (a rank file: the partial answers' key, answer lines)."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def partial_key(path, settings: Mapping) -> dict:
    """What a rank's kept answers depend on: the rank file's bytes and the settings
    that shape answers."""
    return {"input": file_digest(path)} | {k: settings[k] for k in SHAPING}


def partial_path(output: str | os.PathLike) -> Path:
    """Where a rank keeps the answers it has so far: results/.partial/<output name>."""
    output = Path(output)
    return output.parent / FOLDER / output.name


def unpack_float32(text: str) -> list[float]:
    """Base64 of little-endian float32 (as "embeddings_f32" holds them, and as vLLM's
    /v1/embeddings sends them with encoding_format "base64") as a list of floats;
    ValueError when it is not that."""
    values = array.array("f")
    values.frombytes(base64.b64decode(text, validate=True))
    if sys.byteorder == "big":
        values.byteswap()
    return values.tolist()


def _packed(vectors: list) -> list[str] | None:
    """Each vector as base64 of its little-endian float32, or None when float32 does not
    hold every number exactly (they then stay numbers: a resumed rank's bytes are an
    uninterrupted one's)."""
    packed = []
    for vector in vectors:
        try:
            values = array.array("f", vector)
        except (TypeError, OverflowError):
            return None
        if values.tolist() != list(vector):
            return None
        if sys.byteorder == "big":
            values.byteswap()
        packed.append(base64.b64encode(values.tobytes()).decode("ascii"))
    return packed


def _vectors(entry: dict) -> list | None:
    """An entry's embeddings, from "embeddings_f32" or "embeddings"."""
    if "embeddings_f32" not in entry:
        return entry.get("embeddings")
    return [unpack_float32(text) for text in entry["embeddings_f32"]]


class Partial:
    """The answers a rank has so far (the module's format), one JSON line per finished
    request, appended and flushed as each finishes: a rank stopped by SIGKILL,
    walltime, Ctrl-C or an engine crash keeps them (the kernel has them; no fsync per
    answer: a node crash is the one case that can lose some, and their rerun asks them
    again), and its rerun sends only the rest.

    The first line is a key: the digest of the rank file and the settings that shape
    the answers (model, sampling, template). Answers under another key are dropped (the
    input or the settings changed); so is a last line a kill cut short."""

    def __init__(self, output: str | os.PathLike, key: dict):
        self.path = partial_path(output)
        self.key = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
        self._handle = None
        self._kept: dict[int, Answer] = {}

    def load(self) -> dict[int, Answer]:
        """Answers kept from an earlier attempt, by request index."""
        try:
            lines = self.path.read_bytes().split(b"\n")
        except FileNotFoundError:
            return {}
        answers = {}
        try:
            if json.loads(lines[0]).get("key") != self.key:
                return {}
        except (ValueError, AttributeError):
            return {}
        for raw in lines[1:]:
            try:
                entry = json.loads(raw)
                answers[int(entry["index"])] = Answer(
                    entry["text"],
                    entry["finish_reason"],
                    entry["prompt_tokens"],
                    entry["output_tokens"],
                    # absent from older partial files
                    entry.get("choices"),
                    entry.get("error"),
                    _vectors(entry),
                    entry.get("body"),
                )
            except (ValueError, KeyError, TypeError):
                continue  # a line cut short by a kill
        return answers

    def open(self, kept: dict[int, Answer]) -> None:
        """Get ready to append after the ``kept`` answers. The file is written afresh at
        the first new answer (key, kept answers, no torn last line), so a rank that
        fails before any answer (bad input) leaves nothing behind."""
        self._kept = dict(kept)

    @staticmethod
    def _line(index: int, answer: Answer) -> str:
        # choices, error, embeddings, body only when there (older partial files stay as they were)
        entry = {"index": index, **{k: v for k, v in answer.__dict__.items() if v is not None}}
        entry.setdefault("finish_reason", None)
        packed = answer.embeddings and _packed(answer.embeddings)
        if packed:  # a tenth of the time of their decimal text (10,240 vectors: 0.74 s)
            del entry["embeddings"]
            entry["embeddings_f32"] = packed
        return json.dumps(entry, ensure_ascii=False) + "\n"

    def add(self, index: int, answer: Answer) -> None:
        """Append one finished answer, in the file (the kernel's) before this returns."""
        if self._handle is None:
            lines = [json.dumps({"key": self.key, "format": FORMAT}) + "\n"]
            lines += [self._line(i, a) for i, a in sorted(self._kept.items())]
            # The folder stays once made: a rank removing it when empty would race the
            # ranks about to write into it (hundreds at once in a node's Snakemake).
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if self._kept:  # a kill while rewriting must not lose them
                write_atomic(self.path, "".join(lines))
                self._handle = open(self.path, "a", encoding="utf-8")  # noqa: SIM115
            else:  # a torn key line only makes the rerun start afresh
                self._handle = open(self.path, "w", encoding="utf-8")  # noqa: SIM115
                self._handle.write(lines[0])
        self._handle.write(self._line(index, answer))
        self._handle.flush()

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def remove(self) -> None:
        """After the whole output is written: the partial answers are in it."""
        self.close()
        self.path.unlink(missing_ok=True)


def resume(output: str | os.PathLike, rank_file, settings: Mapping) -> tuple[Partial, dict]:
    """The partial answers of the rank of ``rank_file`` whose answers go to ``output``,
    ready to take new ones, and the answers an earlier attempt kept (by request index)
    under the same rank file and ``settings`` (`partial_key`)."""
    partial = Partial(output, partial_key(rank_file, settings))
    kept = partial.load()
    partial.open(kept)
    return partial, kept
