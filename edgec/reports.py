"""What devices report: retained state and telemetry windows (the agent fills them in)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict

__all__ = ["DeviceState", "Telemetry"]


class DeviceState(BaseModel):
    model_config = ConfigDict(extra="forbid")

    status: str  # serving, installing, rolled-back, error, ...
    installed: str | None = None  # name/version of the committed model
    detail: str | None = None


class Telemetry(BaseModel):
    model_config = ConfigDict(extra="allow")  # windows grow new figures over time

    window_s: float
    requests: int
    errors: int = 0
    p50_ms: float | None = None
    p95_ms: float | None = None
    p99_ms: float | None = None
    drift: str | None = None

    def figures(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=True)
