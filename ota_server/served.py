"""What the server hands out, to devices over MQTT and to anyone over HTTP: an allowlist.

Only the TUF metadata files python-tuf's ngclient asks for (``metadata/<N>.root.json``,
``<N>.targets.json``, ``<N>.snapshot.json``, ``timestamp.json``) and the files under
``targets/``. Every other path is not found: keys, director state, the director's public
key, anything else in the folder, ``..``, absolute paths, hidden files, symlinks that leave
``metadata/`` or ``targets/``, NUL and other control characters, very long paths. Both
transports ask this one function, so what one serves the other serves.
"""

from __future__ import annotations

import re
from pathlib import Path

__all__ = ["MAX_PATH_CHARS", "METADATA_NAME", "served_file"]

MAX_PATH_CHARS = 1024
METADATA_NAME = re.compile(r"(?:[1-9][0-9]{0,9}\.(?:root|targets|snapshot)|timestamp)\.json")
_UNSAFE = re.compile(r"[\x00-\x1f\x7f\\]")


def _allowed(parts: list[str]) -> bool:
    top, rest = parts[0], parts[1:]
    if top == "metadata":
        return len(rest) == 1 and METADATA_NAME.fullmatch(rest[0]) is not None
    if top == "targets":
        return bool(rest) and all(part and not part.startswith(".") for part in rest)
    return False


def served_file(folder: Path, relative: str) -> Path | None:
    """The file ``relative`` names inside the repository ``folder``, or None if it is not
    one the server hands out (or does not exist)."""
    if not relative or len(relative) > MAX_PATH_CHARS or _UNSAFE.search(relative):
        return None
    parts = relative.split("/")
    if not _allowed(parts):
        return None
    try:
        base = (folder / parts[0]).resolve()
        path = (folder / relative).resolve()
        # a symlink may point anywhere; what it resolves to must stay in metadata/ or targets/
        if not path.is_relative_to(base) or not path.is_file():
            return None
    except (OSError, RuntimeError):  # a symlink loop, a name the filesystem refuses
        return None
    return path
