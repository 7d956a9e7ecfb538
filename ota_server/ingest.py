"""Device reports as they arrive over MQTT: sized, parsed, validated and rate-limited.

No I/O: the server hands each message here and stores what comes back. A report that does
not pass is refused with a one-line reason (``ReportRefused``), counted and dropped; nothing
a device sends makes the server store more than the limits below allow:

- a size cap per kind of report (a real state is about 100 bytes, a window about 500, an
  event about 300);
- JSON at most ``max_json_depth`` deep, numbers finite; the document shapes of
  ``edgec.reports`` with their field bounds (a few short unknown fields are kept);
- telemetry windows stored per device at a sustained ``windows_per_s`` with a burst of
  ``window_burst`` (a token bucket). An agent closes a window every ``window_s`` (60 s by
  default; 1 s is the shortest any of our setups use) plus a short one when its model
  changes, so one window a second is a generous multiple of any real agent.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import Literal

from pydantic import ValidationError

from edgec._bounded_json import JsonInputError, loads
from edgec.errors import NewerSchemaError, ProtocolError
from edgec.reports import DeviceState, Event, Telemetry

__all__ = ["ReportLimits", "ReportRefused", "WindowRateLimiter", "parse_report"]

Kind = Literal["state", "telemetry", "events"]
KINDS: tuple[Kind, ...] = ("state", "telemetry", "events")


@dataclass(frozen=True)
class ReportLimits:
    max_state_bytes: int = 4 * 1024
    max_telemetry_bytes: int = 16 * 1024
    max_event_bytes: int = 8 * 1024
    max_json_depth: int = 8
    windows_per_s: float = 1.0  # stored telemetry windows per device, sustained
    window_burst: int = 300  # and in a burst (a backlog sent after an outage)
    max_tracked_devices: int = 100_000  # rate-limit buckets kept (least recently used go)

    def max_bytes(self, kind: Kind) -> int:
        return {
            "state": self.max_state_bytes,
            "telemetry": self.max_telemetry_bytes,
            "events": self.max_event_bytes,
        }[kind]


class ReportRefused(ProtocolError):
    """A report dropped; ``str()`` is the one-line reason, ``reason`` a short label for counts."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


def parse_report(
    kind: Kind, payload: bytes | bytearray, limits: ReportLimits
) -> DeviceState | Telemetry | Event:
    """The report in ``payload``, validated; raises ``ReportRefused``."""
    models: dict[str, type[DeviceState | Telemetry | Event]] = {
        "state": DeviceState,
        "telemetry": Telemetry,
        "events": Event,
    }
    model = models[kind]
    cap = limits.max_bytes(kind)
    if len(payload) > cap:
        raise ReportRefused(f"{kind} report of {len(payload):,} bytes is over {cap:,}", "too large")
    try:
        data = loads(payload, max_bytes=cap, max_depth=limits.max_json_depth)
        return model.model_validate(data)
    except JsonInputError as e:
        raise ReportRefused(f"{kind} report is {e}", "not JSON") from None
    except NewerSchemaError as e:  # a newer agent's: says to upgrade the server
        raise ReportRefused(str(e)[:300], "newer schema") from None
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or kind
        raise ReportRefused(f"{where}: {first['msg']}"[:300], "invalid") from None


class WindowRateLimiter:
    """A token bucket per device: ``allow(device, now)`` takes a token if there is one.

    Buckets start full; at most ``max_tracked_devices`` are kept, the least recently used go
    first (a device that comes back starts with a full bucket again)."""

    def __init__(self, rate_per_s: float, burst: int, max_tracked: int = 100_000) -> None:
        if rate_per_s <= 0 or burst < 1:
            raise ValueError("a rate limit needs rate_per_s > 0 and burst >= 1")
        self.rate_per_s = rate_per_s
        self.burst = burst
        self.max_tracked = max_tracked
        self._buckets: collections.OrderedDict[str, tuple[float, float]] = collections.OrderedDict()

    def allow(self, device: str, now: float) -> bool:
        tokens, then = self._buckets.pop(device, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + max(now - then, 0.0) * self.rate_per_s)
        allowed = tokens >= 1.0
        self._buckets[device] = (tokens - 1.0 if allowed else tokens, now)
        while len(self._buckets) > self.max_tracked:
            self._buckets.popitem(last=False)
        return allowed
