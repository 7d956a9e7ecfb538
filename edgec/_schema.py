"""``schema_version`` on read: a newer *major* is refused, everything else is read tolerantly.

Every wire document carries ``schema_version``, an int that is the document's major version
(1 for everything written so far). Additive changes (a new field, a new figure) do not bump
it: readers keep and ignore fields they do not know. A reader also accepts a ``"MAJOR.MINOR"``
string (read as its major), so a later release may spell minors without breaking this one.
Only a document whose major is newer than the reader's is refused, before its fields are
validated (a newer major may change them), with a ``NewerSchemaError`` that says to upgrade.
"""

from __future__ import annotations

import re
from typing import Any

from edgec import __version__
from edgec.errors import NewerSchemaError

__all__ = ["check_schema_version", "major_of"]

FIELD = "schema_version"
_DOTTED = re.compile(r"^([0-9]{1,9})(?:\.[0-9]{1,9}){0,2}$")
_SHOWN_CHARS = 40  # a hostile version is shown clipped


def major_of(value: Any) -> int | None:
    """The major of a ``schema_version`` value: an int, an integral float, or a ``"1.2"``
    string; ``None`` for anything else (left for the model to refuse as invalid)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and (match := _DOTTED.match(value)):
        return int(match.group(1))
    return None


def check_schema_version(
    data: Any,
    *,
    document: str,
    supported: int,
    writer: str,
    upgrade: str,
    error: type[NewerSchemaError] = NewerSchemaError,
    release: str | None = None,
) -> Any:
    """``data`` (a document's JSON object, before validation) unless its ``schema_version``
    has a major over ``supported``: then ``error`` names the document, its version, the one
    this reader supports, who wrote it (``writer``) and what to upgrade. A ``"MAJOR.MINOR"``
    version this reader supports comes back as its major (the model's field is an int)."""
    if not isinstance(data, dict) or FIELD not in data:
        return data  # not an object (the model refuses it), or older than the field: its default
    value = data[FIELD]
    major = major_of(value)
    if major is None:
        return data
    if major > supported:
        found = str(value)
        if len(found) > _SHOWN_CHARS:
            found = found[: _SHOWN_CHARS - 1] + "…"
        raise error(
            f"{document} has schema_version {found}, from a newer {writer}; this edgec {__version__} "
            f"reads schema_version {supported} and older: upgrade the {upgrade}",
            document=document,
            found=found,
            supported=supported,
            release=release,
        )
    if isinstance(value, str | float):
        return {**data, FIELD: major}
    return data
