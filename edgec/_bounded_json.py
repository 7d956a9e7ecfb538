"""JSON from outside, bounded: size and nesting depth checked before parsing, numbers finite.

``json.loads`` recurses once per nesting level, so a body of 60,000 ``[`` ends in a
``RecursionError``; the depth is therefore counted first, by a scan that does not recurse.
``NaN``, ``Infinity`` and numbers that overflow to infinity (``1e999``) are refused: they are
not JSON, and a stored infinity breaks whatever does arithmetic with it later.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from edgec.errors import UserInputError

__all__ = ["JsonInputError", "json_depth", "loads"]

_SPECIAL = re.compile(rb'[\[\]{}"\\]')
_OPEN, _CLOSE, _QUOTE, _BACKSLASH = frozenset(b"[{"), frozenset(b"]}"), ord('"'), ord("\\")


class JsonInputError(UserInputError):
    """A JSON document from outside is too large, too deep, not UTF-8, or not JSON."""


def json_depth(data: bytes | bytearray, limit: int) -> int:
    """The nesting depth of ``data`` (0 for a scalar), counting no further than ``limit + 1``.

    Brackets inside strings do not count; the scan is linear and never recurses."""
    depth = deepest = 0
    in_string = False
    escaped = -1  # the index of a character a backslash escapes
    for match in _SPECIAL.finditer(data):
        i = match.start()
        if i == escaped:
            continue
        c = data[i]
        if in_string:
            if c == _BACKSLASH:
                escaped = i + 1
            elif c == _QUOTE:
                in_string = False
        elif c == _QUOTE:
            in_string = True
        elif c in _OPEN:
            depth += 1
            if depth > deepest:
                deepest = depth
                if deepest > limit:
                    return deepest
        elif c in _CLOSE:
            depth -= 1
    return deepest


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:20]} is out of range")
    return value


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def loads(data: bytes | bytearray, *, max_bytes: int, max_depth: int) -> Any:
    """Parse ``data`` (UTF-8 JSON); raises ``JsonInputError`` with a one-line reason that
    reads after "the body is" ("not JSON: ...", "nested deeper than 32 levels")."""
    if len(data) > max_bytes:
        raise JsonInputError(f"over the limit of {max_bytes:,} bytes ({len(data):,} bytes)")
    if json_depth(data, max_depth) > max_depth:
        raise JsonInputError(f"nested deeper than {max_depth} levels")
    try:
        text = data.decode("utf-8")
        return json.loads(text, parse_constant=_no_constant, parse_float=_finite)
    except UnicodeDecodeError as e:
        raise JsonInputError(f"not JSON: not UTF-8 (byte {e.start})") from None
    except (ValueError, RecursionError) as e:  # RecursionError: never, after the depth check
        reason = (str(e).splitlines() or [type(e).__name__])[0][:200]
        raise JsonInputError(f"not JSON: {reason}") from None
