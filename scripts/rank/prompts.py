"""Prompt files and output records, as the seed test reads and writes them.

Pure Python: no vLLM, no torch. Used by scripts/rank/task.py and the tests.

* A prompt file holds one prompt per line; a prompt is the line stripped of
  surrounding whitespace (the seed's ``line.strip()``), and blank lines are
  skipped. CRLF line ends and a UTF-8 byte order mark are accepted. A file that
  is not UTF-8 raises ``PromptFileError`` naming the file and the line.
* An output record is the seed's
  ``f"Prompt: {prompt!r}, Generated text: {generated_text!r}\\n\\n"``.
* ``write_atomic`` writes a file so that readers see the old content or the
  whole new content, never a part.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Prompt", "PromptFileError", "format_record", "read_prompts"]

_BOM = b"\xef\xbb\xbf"
LINE_END = re.compile(rb"\r\n|\r|\n")  # as text mode reads lines (read_prompts)


class PromptFileError(Exception):
    """A prompt file that cannot be read as UTF-8 text."""


@dataclass(frozen=True)
class Prompt:
    text: str
    line: int  # 1-based line number in the file


def read_prompts(path: str | os.PathLike) -> list[Prompt]:
    """Stripped, non-empty lines of ``path`` with their 1-based line numbers."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise PromptFileError(f"{path}: cannot read prompt file: {exc.strerror or exc}") from exc
    if data.startswith(_BOM):
        data = data[len(_BOM) :]
    prompts = []
    # Lines end where the seed's text-mode file iteration (universal newlines) ends
    # them: at "\r\n", "\n" or a lone "\r". Other Unicode line breaks (U+2028,
    # U+0085, ...) stay inside the line; strip() removes them at its ends.
    for number, raw in enumerate(LINE_END.split(data), start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise PromptFileError(
                f"{path}: line {number}: not valid UTF-8 "
                f"(byte 0x{raw[exc.start]:02x} at column {exc.start + 1})"
            ) from None
        text = line.strip()
        if text:
            prompts.append(Prompt(text=text, line=number))
    return prompts


def format_record(prompt: str, generated: str) -> str:
    """One output record, exactly as the seed writes it."""
    return f"Prompt: {prompt!r}, Generated text: {generated!r}\n\n"
