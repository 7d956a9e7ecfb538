"""What devices report: retained state, telemetry windows and events (the agent fills them in).

Reports are wire documents read tolerantly: a newer agent's unknown fields are kept and
ignored. They come from devices, so every field is bounded: identifiers by length, free text
(``detail``) clipped, numbers finite, and unknown fields few, short-named and small.

Reports carry no ``schema_version`` yet (major 1); one with a newer major is refused with a
``NewerSchemaError`` (upgrade the server), before its fields are read.
"""

from __future__ import annotations

import enum
import math
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from edgec._schema import check_schema_version

__all__ = ["SCHEMA_VERSION", "DeviceState", "DriftVerdict", "Event", "Telemetry"]

SCHEMA_VERSION = 1  # the major this reader reads (a report without the field is major 1)

MAX_EXTRA_FIELDS = 16  # unknown fields a report may carry
MAX_KEY_CHARS = 64  # the length of an unknown field's name (and of a key inside its value)
MAX_TEXT_CHARS = 256  # a short string: a release, an unknown field's text
MAX_DETAIL_CHARS = 1024  # free text (an error message) is clipped to this, not refused
MAX_ITEMS = 32  # a list or object in an unknown field (flat, of short values)
MAX_COUNT = 2**53  # request and error counts, sequence numbers: exact in every JSON reader


def _clip(limit: int) -> BeforeValidator:
    def clip(value: Any) -> Any:
        if isinstance(value, str) and len(value) > limit:
            return value[: limit - 1] + "…"
        return value

    return BeforeValidator(clip)


Text = Annotated[str, Field(max_length=MAX_TEXT_CHARS)]
Detail = Annotated[str, _clip(MAX_DETAIL_CHARS)]
Moment = Annotated[str, Field(max_length=40)]  # ISO 8601, UTC
Count = Annotated[int, Field(ge=0, le=MAX_COUNT)]
Milliseconds = Annotated[float, Field(ge=0)]


def _is_short(value: Any) -> bool:
    if value is None or isinstance(value, bool):
        return True
    if isinstance(value, int):
        return abs(value) <= MAX_COUNT
    if isinstance(value, float):
        return math.isfinite(value)
    return isinstance(value, str) and len(value) <= MAX_TEXT_CHARS


def _check_extras(extra: dict[str, Any] | None) -> None:
    """Unknown fields: at most ``MAX_EXTRA_FIELDS``, short names, and each value a short
    scalar or a flat list/object of at most ``MAX_ITEMS`` of them."""
    extra = extra or {}
    if len(extra) > MAX_EXTRA_FIELDS:
        raise ValueError(f"{len(extra)} unknown fields; at most {MAX_EXTRA_FIELDS} are kept")
    for key, value in extra.items():
        if len(key) > MAX_KEY_CHARS:
            raise ValueError(f"an unknown field's name is over {MAX_KEY_CHARS} characters")
        items: list[Any] = [value]
        if isinstance(value, list):
            items = value
        elif isinstance(value, dict):
            if any(len(k) > MAX_KEY_CHARS for k in value):
                raise ValueError(f"a key in field {key[:MAX_KEY_CHARS]!r} is over {MAX_KEY_CHARS} characters")
            items = list(value.values())
        if len(items) > MAX_ITEMS or not all(_is_short(v) for v in items):
            raise ValueError(
                f"field {key!r} is not a short value (a number, a string of at most {MAX_TEXT_CHARS} "
                f"characters, or a flat list or object of at most {MAX_ITEMS} of them)"
            )


def _readable(data: Any, document: str) -> Any:
    return check_schema_version(
        data, document=document, supported=SCHEMA_VERSION, writer="agent", upgrade="server"
    )


class DeviceState(BaseModel):
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    status: Annotated[str, Field(max_length=64)]  # serving, installing, rolled-back, error, ...
    installed: Text | None = None  # NAME:VERSION of the committed model
    detail: Detail | None = None

    @model_validator(mode="before")
    @classmethod
    def _readable_version(cls, data: Any) -> Any:
        return _readable(data, "device state report")

    @model_validator(mode="after")
    def _bounded_extras(self) -> DeviceState:
        _check_extras(self.model_extra)
        return self


class DriftVerdict(enum.StrEnum):
    """A telemetry window's drift verdict, from the PSI of its tensors (worst one wins)."""

    OK = "ok"  # PSI < 0.1
    WARN = "warn"  # PSI < 0.25
    DRIFT = "drift"


class Telemetry(BaseModel):
    """One telemetry window; every field but the counts is optional, so older agents validate."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)  # windows grow new figures over time

    window_s: float
    requests: Count
    errors: Count = 0
    p50_ms: Milliseconds | None = None
    p95_ms: Milliseconds | None = None
    p99_ms: Milliseconds | None = None
    # a DriftVerdict value; None when no tensor saw enough values
    drift: Annotated[str, Field(max_length=16)] | None = None
    seq: Count | None = None  # window number, increasing across the agent's restarts
    model: Text | None = None  # NAME:VERSION of the model that served every request of the window
    started_at: Moment | None = None
    ended_at: Moment | None = None
    # per tensor that saw enough values (tensor names can be long: the report's size cap bounds them)
    psi: dict[Annotated[str, Field(max_length=1024)], float] | None = None

    @model_validator(mode="before")
    @classmethod
    def _readable_version(cls, data: Any) -> Any:
        return _readable(data, "telemetry window")

    @model_validator(mode="after")
    def _bounded_extras(self) -> Telemetry:
        _check_extras(self.model_extra)
        return self

    def figures(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=True)


class Event(BaseModel):
    """One device event: install progress, a refusal, an error. ``event`` names its kind
    (``accepted``, ``fetched``, ``committed``, ``refused``, ...); figures ride along as extra
    fields (``attempt``, ``bytes``, ``p95_ms``)."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    event: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")]
    release: Text | None = None
    detail: Detail | None = None
    step: Annotated[str, Field(max_length=64)] | None = None  # where a refusal happened
    at: Moment | None = None

    @model_validator(mode="before")
    @classmethod
    def _readable_version(cls, data: Any) -> Any:
        return _readable(data, "device event")

    @model_validator(mode="after")
    def _bounded_extras(self) -> Event:
        _check_extras(self.model_extra)
        return self
