"""Files shared between the parts of a run: the one atomic write, and safe file names.

Stdlib only: login-node code (pbs/) and the engines' watchdog side import it.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from pathlib import Path

# The process's umask, read once at import: reading it means setting it, and setting it
# while other threads create files (rank threads writing outputs) would give their
# files no umask at all.
_UMASK = os.umask(0o022)


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


def safe_name(name: str) -> str:
    """``name`` (a host, a job id) as one safe file-name part: other characters become _."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)
