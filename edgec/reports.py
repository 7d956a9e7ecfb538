"""What devices report: retained state and telemetry windows (the agent fills them in)."""

from __future__ import annotations

import enum
from typing import Any

from pydantic import BaseModel, ConfigDict

__all__ = ["DeviceState", "DriftVerdict", "Telemetry"]


class DeviceState(BaseModel):
    model_config = ConfigDict(extra="forbid")

    status: str  # serving, installing, rolled-back, error, ...
    installed: str | None = None  # NAME:VERSION of the committed model
    detail: str | None = None


class DriftVerdict(enum.StrEnum):
    """A telemetry window's drift verdict, from the PSI of its tensors (worst one wins)."""

    OK = "ok"  # PSI < 0.1
    WARN = "warn"  # PSI < 0.25
    DRIFT = "drift"


class Telemetry(BaseModel):
    """One telemetry window; every field but the counts is optional, so older agents validate."""

    model_config = ConfigDict(extra="allow")  # windows grow new figures over time

    window_s: float
    requests: int
    errors: int = 0
    p50_ms: float | None = None
    p95_ms: float | None = None
    p99_ms: float | None = None
    drift: str | None = None  # a DriftVerdict value; None when no tensor saw enough values
    seq: int | None = None  # window number, increasing across the agent's restarts
    model: str | None = None  # NAME:VERSION of the model that served every request of the window
    started_at: str | None = None  # ISO 8601, UTC
    ended_at: str | None = None
    psi: dict[str, float] | None = None  # per tensor that saw enough values

    def figures(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=True)
