"""What an operator asks of a rollout, and the states the server reports it and its devices in.

A rollout may judge each wave in shadow first (``shadow_s``/``shadow_requests``): its devices
run the release beside the serving model without serving it, and rules on the ``shadow_*``
figures can stop the rollout before any device answers with the new model.

A person writes the spec (``edgec rollout start`` builds it from flags, or a client posts it to
``/v1/rollouts``), so a typo fails: ``RolloutSpec`` forbids unknown fields, and every wave,
duration and abort rule is checked here, before the server stores it. The command line parses
``--bake 10m`` with this module alone: it imports neither the server nor a database.
"""

from __future__ import annotations

import enum
import logging
import math
import re
from dataclasses import dataclass
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from edgec.director import MAX_SHADOW_REQUESTS, MAX_SHADOW_S, ShadowRequest
from edgec.errors import OptionError
from edgec.names import Name, Release
from edgec.reports import DriftVerdict

__all__ = [
    "MAX_DURATION_S",
    "MAX_WAVES",
    "AbortRule",
    "Comparison",
    "MemberState",
    "Metric",
    "RolloutSpec",
    "RolloutState",
    "Verdict",
    "parse_duration",
    "parse_rule",
]

logger = logging.getLogger(__name__)

# bounds of a rollout spec: far beyond any real rollout, well inside what datetime arithmetic,
# the database and a status page can hold
MAX_DURATION_S = 30 * 24 * 3600.0  # bake_s and device_timeout_s: 30 days
MAX_WAVES = 100
MAX_RULES = 32
MAX_RULE_CHARS = 128
MAX_DEVICES = 1_000_000

_RULE = re.compile(r"^\s*([a-z0-9_]+)\s*(>=|<=|>|<|=)\s*(.+?)\s*$")
_REFERENCE = re.compile(r"^(?:([0-9.]+)\s*\*\s*)?(control|serving)$")
_WAVE = re.compile(r"(\d+(\.\d+)?%|\d+)")


class RolloutState(enum.StrEnum):
    """Where a rollout stands: ``pending → running ⇄ paused → completed | aborted → rolled-back``."""

    PENDING = "pending"
    RUNNING = "running"
    PAUSED = "paused"
    COMPLETED = "completed"
    ABORTED = "aborted"
    ROLLED_BACK = "rolled-back"


class MemberState(enum.StrEnum):
    """Where one device of a rollout stands."""

    WAITING = "waiting"  # its wave has not started: it is in the control cohort
    SHADOWING = "shadowing"  # it was sent the release to run in shadow and has not answered yet
    SHADOWED = "shadowed"  # it reported its shadow figures; the wave's shadow verdict is pending
    ASSIGNED = "assigned"  # it was sent the release and has not answered yet
    INSTALLED = "installed"
    FAILED = "failed"  # it refused the release, or could not be sent it
    TIMED_OUT = "timed-out"  # it did not answer within the device timeout
    ROLLED_BACK = "rolled-back"
    NO_BUNDLE = "no-bundle"  # the release has no bundle for its profile: left out


class Metric(enum.StrEnum):
    """What an abort rule judges: figures of the canary cohort, some against the control's."""

    INSTALL_FAILURE_RATE = "install_failure_rate"
    ERROR_RATE = "error_rate"
    P50_MS = "p50_ms"
    P95_MS = "p95_ms"
    P99_MS = "p99_ms"
    DRIFT = "drift"
    # the wave's shadow run: the candidate beside the serving model, on the same requests
    SHADOW_AGREEMENT = "shadow_agreement"  # share of compared requests on which every output agrees
    SHADOW_ERROR_RATE = "shadow_error_rate"  # the candidate's failures over the requests it was given
    SHADOW_P50_MS = "shadow_p50_ms"  # the candidate's latency; N*serving: against the serving model's
    SHADOW_P95_MS = "shadow_p95_ms"
    SHADOW_P99_MS = "shadow_p99_ms"

    @property
    def shadow(self) -> bool:
        return self.value.startswith("shadow_")


_SERVING_COMPARABLE = frozenset({Metric.SHADOW_P50_MS, Metric.SHADOW_P95_MS, Metric.SHADOW_P99_MS})


class Comparison(enum.StrEnum):
    GT = ">"
    GE = ">="
    LT = "<"
    LE = "<="
    EQ = "="


class Verdict(enum.StrEnum):
    """An abort rule's verdict on the figures of a wave."""

    ABORT = "abort"
    OK = "ok"
    NO_DATA = "no data"  # the figures it needs are not there


def parse_duration(value: str) -> float:
    """``90``, ``30s``, ``10m``, ``2h`` -> seconds."""
    match = re.fullmatch(r"\s*([0-9.]+)\s*([smh]?)\s*", value)
    if not match:
        raise OptionError(f"bad duration {value!r}: use 30s, 10m or 2h")
    try:
        seconds = float(match[1])
    except ValueError:  # "1.2.3"
        raise OptionError(f"bad duration {value!r}: use 30s, 10m or 2h") from None
    return seconds * {"": 1, "s": 1, "m": 60, "h": 3600}[match[2]]


@dataclass(frozen=True)
class AbortRule:
    """A parsed abort rule: ``p95_ms>1.5*control`` is metric p95_ms, op >, value 1.5, of_control;
    ``shadow_p95_ms>1.2*serving`` compares the candidate's shadow latency with the serving
    model's on the same requests (of_serving)."""

    text: str
    metric: Metric
    op: Comparison
    value: float | DriftVerdict  # a number, a factor of the reference figure, or a drift verdict
    of_control: bool = False
    of_serving: bool = False

    @property
    def relative(self) -> bool:
        """Its threshold is a factor of another figure (the control's or the serving model's)."""
        return self.of_control or self.of_serving


def parse_rule(rule: str) -> AbortRule:
    """``install_failure_rate>0.05``, ``p95_ms>1.5*control``, ``error_rate>0.01``, ``drift=drift``,
    ``shadow_agreement<0.98``, ``shadow_p95_ms>1.2*serving``."""
    match = _RULE.match(rule)
    if not match or match[1] not in tuple(Metric):
        raise OptionError(
            f"bad abort rule {rule!r}: write METRIC OP VALUE with METRIC one of {', '.join(Metric)}, "
            'e.g. "p95_ms>1.5*control" or "drift=drift"'
        )
    metric, op, raw = Metric(match[1]), Comparison(match[2]), match[3]
    if metric is Metric.DRIFT:
        if op is not Comparison.EQ or raw not in tuple(DriftVerdict):
            raise OptionError(f"bad abort rule {rule!r}: drift rules read drift=warn or drift=drift")
        return AbortRule(rule, metric, op, DriftVerdict(raw))
    relative = _REFERENCE.match(raw)
    try:
        value = float(relative[1] or 1.0) if relative else float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):  # "inf", "nan", "1e999", "1.2.3*control"
        raise OptionError(f"bad abort rule {rule!r}: {raw!r} is not a finite number or N*control")
    reference = relative[2] if relative else None
    if reference == "serving" and metric not in _SERVING_COMPARABLE:
        raise OptionError(
            f"bad abort rule {rule!r}: only shadow latency (shadow_p50_ms, shadow_p95_ms, shadow_p99_ms) "
            "compares with N*serving"
        )
    if reference == "control" and metric.shadow:
        raise OptionError(
            f"bad abort rule {rule!r}: shadow figures have no control cohort; compare latency with N*serving"
        )
    return AbortRule(
        rule, metric, op, value, of_control=reference == "control", of_serving=reference == "serving"
    )


class RolloutSpec(BaseModel):
    """A release to a group in cumulative waves (``5%``, ``25%``, ``100%`` or device counts),
    each baked ``bake_s`` seconds and judged by the ``abort_if`` rules."""

    model_config = ConfigDict(extra="forbid")

    release: Release  # NAME:VERSION, both parts checked names
    group: Name
    fleet: Annotated[str, Field(max_length=128)] | None = None
    waves: Annotated[
        list[Annotated[str, Field(max_length=16)]], Field(min_length=1, max_length=MAX_WAVES)
    ] = ["5%", "25%", "100%"]
    bake_s: Annotated[float, Field(ge=0, le=MAX_DURATION_S, allow_inf_nan=False)] = 600.0
    abort_if: Annotated[
        list[Annotated[str, Field(max_length=MAX_RULE_CHARS)]], Field(max_length=MAX_RULES)
    ] = ["install_failure_rate>0.05"]
    min_devices: Annotated[int, Field(ge=1, le=MAX_DEVICES)] = 1
    device_timeout_s: Annotated[float, Field(gt=0, le=MAX_DURATION_S, allow_inf_nan=False)] = 1800.0
    # each wave runs the release in shadow first, for this long or this many compared requests
    shadow_s: Annotated[float, Field(gt=0, le=MAX_SHADOW_S, allow_inf_nan=False)] | None = None
    shadow_requests: Annotated[int, Field(ge=1, le=MAX_SHADOW_REQUESTS)] | None = None
    shadow_sample: Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)] = 0.1

    @model_validator(mode="after")
    def _shadow_rules_need_a_shadow(self) -> RolloutSpec:
        shadow_rules = [rule for rule in self.abort_if if parse_rule(rule).metric.shadow]
        if shadow_rules and self.shadow is None:
            raise ValueError(
                f"abort rule {shadow_rules[0]!r} judges a shadow run: give the rollout one "
                "(--shadow 10m or --shadow-requests 500)"
            )
        return self

    @property
    def shadow(self) -> ShadowRequest | None:
        """What each wave's devices are asked to run in shadow, or None for no shadow phase."""
        if self.shadow_s is None and self.shadow_requests is None:
            return None
        return ShadowRequest(
            duration_s=self.shadow_s, requests=self.shadow_requests, sample=self.shadow_sample
        )

    @field_validator("abort_if")
    @classmethod
    def _rules(cls, rules: list[str]) -> list[str]:
        for rule in rules:
            try:
                parse_rule(rule)
            except OptionError as e:
                raise ValueError(str(e)) from e
        return rules

    @field_validator("waves")
    @classmethod
    def _waves(cls, waves: list[str]) -> list[str]:
        for wave in waves:
            if not _WAVE.fullmatch(wave):
                raise ValueError(f"wave {wave!r} is neither a percentage (25%) nor a device count (10)")
            if wave.endswith("%") and float(wave[:-1]) > 100:
                raise ValueError(f"wave {wave!r} is over 100%")
            if not wave.endswith("%") and int(wave) > MAX_DEVICES:
                raise ValueError(f"wave {wave!r} is over {MAX_DEVICES:,} devices")
        return waves

    def rules(self) -> list[AbortRule]:
        """The abort rules, parsed (each was checked when the spec was made)."""
        return [parse_rule(rule) for rule in self.abort_if]

    def wave_sizes(self, devices: int) -> list[int]:
        """Cumulative device counts per wave, the last one covering every device."""
        sizes: list[int] = []
        for wave in self.waves:
            n = math.ceil(float(wave[:-1]) / 100 * devices) if wave.endswith("%") else int(wave)
            n = min(max(n, self.min_devices, sizes[-1] if sizes else 0), devices)
            sizes.append(n)
        sizes[-1] = devices
        return sizes
