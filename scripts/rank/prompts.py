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

import contextlib
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Prompt", "PromptFileError", "format_record", "read_prompts", "write_atomic"]

_BOM = b"\xef\xbb\xbf"
_LINE_END = re.compile(rb"\r\n|\r|\n")


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
    for number, raw in enumerate(_LINE_END.split(data), start=1):
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


# The process's umask, read once at import: reading it means setting it, and setting it
# while other threads create files (rank threads writing outputs) would give their
# files no umask at all.
_UMASK = os.umask(0o022)
os.umask(_UMASK)


def write_atomic(path: str | os.PathLike, content: str | bytes, mode: int | None = None) -> None:
    """Write ``content`` (str as UTF-8, or bytes) to ``path`` atomically.

    The data goes to a temporary file in the same folder, is flushed and fsynced,
    and then replaces ``path`` with ``os.replace``. On any error the temporary
    file is removed and ``path`` is left as it was. ``mode``: the file's permissions
    (e.g. 0o600 for a secret, which is never readable by others, not even briefly);
    default: what a plain open() would give.

    The one atomic write of the project: outputs, records, registry entries, the
    scheduler status store, key files.
    """
    path = Path(path)
    if isinstance(content, str):
        data = content.encode("utf-8")
    elif isinstance(content, bytes | bytearray | memoryview):
        data = bytes(content)
    else:
        raise TypeError(f"write_atomic needs str or bytes, not {type(content).__name__}")
    folder = path.parent
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        # mkstemp makes the file 0600; give it the mode asked, or a plain open()'s.
        if mode is None:
            mode = 0o666 & ~_UMASK
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    # Make the rename itself durable (best effort; not every filesystem allows it).
    with contextlib.suppress(OSError):
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
