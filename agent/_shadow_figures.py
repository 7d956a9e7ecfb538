"""A shadow run's figures (``agent.shadow``): the totals and windows it reports, the running
counts they are taken from, and the reservoir of latency pairs their percentiles come from."""

from __future__ import annotations

import dataclasses
import datetime as dt
import random
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["MAX_LATENCIES", "Counts", "Reservoir", "ShadowFigures", "iso", "percentiles"]

MAX_LATENCIES = 100_000  # requests whose latencies a run (and each window) keeps


@dataclass(frozen=True)
class ShadowFigures:
    """A shadow run's figures, over the whole run or one window.

    ``offered``: requests the serving model answered in the span; ``sampled``: those picked
    for the candidate, of which ``dropped`` (the queue was full), ``over_budget`` (skipped
    over the CPU budget), ``errors`` (the candidate raised; ``last_error`` says how) and
    ``compared``. ``agreement``: share of compared requests on which every output agrees;
    ``outputs``: that share per output. Latencies in ms, the candidate's inference and the
    serving model's on the same requests; ``None`` where nothing was compared.
    """

    release: str  # the candidate, NAME:VERSION
    serving: str  # the serving model, NAME:VERSION
    started_at: str  # ISO 8601 UTC
    ended_at: str
    offered: int
    sampled: int
    compared: int
    dropped: int
    over_budget: int
    errors: int
    agreement: float | None
    outputs: dict[str, float]
    p50_ms: float | None
    p95_ms: float | None
    p99_ms: float | None
    serving_p50_ms: float | None
    serving_p95_ms: float | None
    serving_p99_ms: float | None
    done: bool
    reason: str | None  # why the run ended: "duration", "requests", "stopped" ("failed": a bug, logged)
    last_error: str | None = None  # the candidate's last failure, one line

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def iso(seconds: float) -> str:
    return dt.datetime.fromtimestamp(seconds, dt.UTC).isoformat(timespec="milliseconds")


def percentiles(values: list[float]) -> tuple[float | None, float | None, float | None]:
    if not values:
        return None, None, None
    p50, p95, p99 = np.percentile(np.asarray(values) * 1000.0, (50, 95, 99))
    return float(p50), float(p95), float(p99)


class Counts:
    """Running totals; a window's figures are the difference of two snapshots."""

    __slots__ = ("agreed", "compared", "dropped", "errors", "offered", "outputs", "over_budget", "sampled")

    def __init__(self, outputs: list[str]) -> None:
        self.offered = self.sampled = self.dropped = 0  # the request path's (under ShadowRun._offer_lock)
        self.compared = self.over_budget = self.errors = self.agreed = 0  # the worker's (under _lock)
        self.outputs = dict.fromkeys(outputs, 0)

    def copy(self) -> Counts:
        other = Counts([])
        for name in self.__slots__:
            value = getattr(self, name)
            setattr(other, name, dict(value) if isinstance(value, dict) else value)
        return other

    def minus(self, earlier: Counts) -> Counts:
        other = self.copy()
        for name in self.__slots__:
            if name != "outputs":
                setattr(other, name, getattr(self, name) - getattr(earlier, name))
        other.outputs = {k: v - earlier.outputs.get(k, 0) for k, v in self.outputs.items()}
        return other


class Reservoir:
    """At most ``MAX_LATENCIES`` (candidate, serving) latency pairs, a uniform sample of all seen."""

    def __init__(self, rng: random.Random) -> None:
        self.pairs: list[tuple[float, float]] = []
        self.seen = 0
        self._rng = rng

    def add(self, pair: tuple[float, float]) -> None:
        self.seen += 1
        if len(self.pairs) < MAX_LATENCIES:
            self.pairs.append(pair)
            return
        slot = self._rng.randrange(self.seen)
        if slot < MAX_LATENCIES:
            self.pairs[slot] = pair
