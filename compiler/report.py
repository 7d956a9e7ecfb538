"""What a build returns: one result per target, as JSON and as a readable table."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from edgec.manifest import BundleStatus, MemoryPeak, Metrics, Precision, TargetFormat

__all__ = ["BuildResult", "TargetResult"]


class TargetResult(BaseModel):
    model_config = ConfigDict(extra="forbid")

    profile: str
    format: TargetFormat
    precision: Precision
    path: str | None = None
    size_bytes: int | None = None
    status: BundleStatus
    error: str | None = None
    reason: str | None = None  # why a bundle is unverified, or why its gate was waived
    metrics: Metrics | None = None
    gate: dict[str, float] = {}
    gate_failures: list[str] = []
    notes: list[str] = []
    search: list[dict[str, object]] = []  # every configuration tried, when more than one
    layer_errors: list[dict[str, object]] = []  # int8: the worst quantized tensors, for explain
    cached: bool = False  # the artifact and its figures came from the build cache
    converter_log: str | None = None  # everything a converter printed, when it failed
    memory: MemoryPeak | None = None  # peak memory in its runtime (compiler.memory_fit)
    memory_note: str | None = None  # why the peak was not measured, when it was not
    timings_s: dict[str, float] = {}


class BuildResult(BaseModel):
    model_config = ConfigDict(extra="forbid")

    bundles: list[TargetResult]

    @property
    def failed(self) -> bool:
        """A target failed to build or missed its gate (the command line exits 3)."""
        return any(b.status is BundleStatus.FAILED for b in self.bundles)
