"""What devices report: retained state, telemetry windows and events (the agent fills them in).

Reports are wire documents read tolerantly: a newer agent's unknown fields are kept and
ignored. They come from devices, so every field is bounded: identifiers by length, free text
(``detail``) clipped, numbers finite, and unknown fields few, short-named and small.

Reports carry no ``schema_version`` yet (major 1); one with a newer major is refused with a
``NewerSchemaError`` (upgrade the server), before its fields are read.

The closed sets an agent writes are enums: ``EventKind`` (what an event says happened),
``DeviceStatus`` (a device's retained state) and ``InstallStep`` (where an install was
refused). A reader gets the enum member for a value it knows and keeps any other value (a
newer agent's) as the string it was, so logic that compares with the enum ignores it and
nothing is refused for it.
"""

from __future__ import annotations

import enum
import math
from typing import TYPE_CHECKING, Annotated, Any

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from edgec._schema import check_schema_version

__all__ = [
    "SCHEMA_VERSION",
    "SHADOW_FIGURES",
    "DeviceState",
    "DeviceStatus",
    "DriftVerdict",
    "Event",
    "EventKind",
    "InstallStep",
    "Telemetry",
]

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


class EventKind(enum.StrEnum):
    """What a device event says happened (``Event.event``): every kind this release's agent emits."""

    ACCEPTED = "accepted"  # a director document passed its checks; its install begins
    FETCHED = "fetched"  # one file of the bundle downloaded and checked (figures: file, of, bytes,
    # resumed_at; fetched_bytes and reused_bytes: downloaded, and copied from installed releases)
    RETRYING = "retrying"  # a transport failure; the fetch starts again (figures: attempt, delay_s)
    SHADOW = "shadow"  # a window of a shadow run: the candidate beside the serving model (figures)
    SHADOWED = "shadowed"  # a shadow run ended (its totals), or was skipped (``detail`` says why)
    SWAPPED = "swapped"  # the new model serves, on probation
    COMMITTED = "committed"  # probation passed, the new model is the committed one (figures)
    REFUSED = "refused"  # the install of a document ends here (``step`` says where)
    STARTED = "started"  # the agent started and serves its committed model
    LOAD_FAILED = "load-failed"  # the committed model does not load at start
    ERROR = "error"  # something outside an install's steps: the agent's state on disk, trust


# the figures a ``shadow`` or ``shadowed`` event carries as extra fields (a flat object of the
# per-output agreement besides, ``outputs``; ``skipped`` where the run could not run)
SHADOW_FIGURES = (
    "sampled",
    "compared",
    "dropped",
    "over_budget",
    "errors",
    "agreement",
    "p50_ms",
    "p95_ms",
    "p99_ms",
    "serving_p50_ms",
    "serving_p95_ms",
    "serving_p99_ms",
    "reason",
)


class DeviceStatus(enum.StrEnum):
    """A device's retained state (``DeviceState.status``)."""

    NEW = "new"  # never reported (the registry's and the simulator's value before a first state)
    IDLE = "idle"  # no model committed (yet, or the only install was refused)
    INSTALLING = "installing"  # an install runs; the committed model (if any) serves meanwhile
    SERVING = "serving"
    ERROR = "error"  # no model serves: the committed one does not load, or an install stopped
    OFFLINE = "offline"  # the broker's will: the device's connection went away


class InstallStep(enum.StrEnum):
    """Where an install was refused (``Event.step`` of a ``refused`` event), in pipeline order."""

    ACCEPT = "accept"  # the director document (signature, device, version, expiry, names)
    VERIFY = "verify"  # the image repository does not sign the same files
    FIT = "fit"  # the release's signed peak memory does not fit in what the device has free
    FETCH = "fetch"  # the download gave up (attempts, a newer document)
    STAGE = "stage"  # the staged bundle does not match its manifest or the document
    LOAD = "load"
    SELF_TEST = "self-test"
    PROBATION = "probation"


def _known_or_kept(enum_type: type[enum.StrEnum], **bounds: Any) -> Any:
    """A string field (with the bounds it always had) read as the enum's member when the value
    is known, and kept as the string it was otherwise (a newer writer's value, which our logic
    ignores): a report is never refused for a kind or status this reader does not know."""

    def known(value: str) -> enum.StrEnum | str:
        try:
            return enum_type(value)
        except ValueError:
            return value

    return Annotated[str, Field(**bounds), AfterValidator(known)]


if TYPE_CHECKING:  # what the fields hold, for the type checker
    Kind = EventKind | str
    Status = DeviceStatus | str
    StepName = InstallStep | str
else:
    Kind = _known_or_kept(EventKind, min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    Status = _known_or_kept(DeviceStatus, max_length=64)
    StepName = _known_or_kept(InstallStep, max_length=64)


class DeviceState(BaseModel):
    """A device's retained state: its status and the release it has committed."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    status: Status
    installed: Text | None = None  # NAME:VERSION of the committed model
    detail: Detail | None = None
    # the device's clock when this state began (ISO 8601): server replicas take a device's
    # reports in parallel, and a state older than the one stored is not written over it
    at: Text | None = None

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
    """One device event: install progress, a refusal, an error. ``event`` names its kind (an
    ``EventKind``, or a newer agent's kind kept as a string); figures ride along as extra
    fields (``attempt``, ``bytes``, ``p95_ms``)."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    event: Kind
    release: Text | None = None
    detail: Detail | None = None
    step: StepName | None = None  # where a refusal happened
    at: Moment | None = None

    @model_validator(mode="before")
    @classmethod
    def _readable_version(cls, data: Any) -> Any:
        return _readable(data, "device event")

    @model_validator(mode="after")
    def _bounded_extras(self) -> Event:
        _check_extras(self.model_extra)
        return self
