"""Atomic file writes: one mechanism for the agent's state, the server's keys and metadata,
the build cache and the simulator's files.

``atomic_write`` writes bytes it is given; ``atomic_replace`` puts a file that was streamed
into a temp file of the same folder (a resumable download) in place the same way.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

__all__ = ["atomic_replace", "atomic_write", "fsync_path"]


def fsync_path(path: Path) -> None:
    """Flush a file, or a folder's entries (a rename is durable once its folder is synced)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_replace(tmp: Path, path: Path) -> None:
    """Put ``tmp`` (a finished temp file in ``path``'s folder) in place of ``path``: fsync
    it, rename it, fsync the folder. After a crash ``path`` holds its old content or the
    new one, never a mix, and the rename is not lost."""
    fsync_path(tmp)
    os.replace(tmp, path)
    fsync_path(path.parent)


def atomic_write(path: Path, data: bytes, mode: int | None = None) -> None:
    """A unique temp file in the same folder (``mode`` set before any byte is written), fsync,
    rename, fsync the folder: after a crash the file holds its old content or its new one,
    never a mix, and two writers never share a temp file. A failed write leaves no temp file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            if mode is not None:
                os.fchmod(f.fileno(), mode)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_path(path.parent)
