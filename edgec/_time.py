"""Times that devices send: ISO 8601 read into an aware UTC moment, one way everywhere."""

from __future__ import annotations

import datetime as dt
from typing import Any

__all__ = ["utc_moment"]


def utc_moment(value: Any) -> dt.datetime | None:
    """``value`` (ISO 8601, ``Z`` or an offset; naive is taken as UTC) as a UTC datetime, or
    None when it is not a string that reads as a time."""
    if not isinstance(value, str):
        return None
    try:
        moment = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.UTC)
    return moment.astimezone(dt.UTC)
