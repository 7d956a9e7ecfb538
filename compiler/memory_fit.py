"""Memory fit at build time: each artifact's peak memory in its runtime, against the profile's
budget for one model.

The chosen artifact is loaded and run at its batch in a child process by
``bundle_runtime.peak`` (the runtime the device serves it with); the figure goes in the
manifest (``memory``), the report and the build's table. A peak over the profile's
``model_memory_budget_bytes`` is a gate failure like any other: the target fails with the
figures and no bundle is written (unless ``--ignore-gates``). An artifact whose runtime is not
on this host (CoreML off macOS, TensorRT) gets no figure, and the report says why.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from bundle_runtime.peak import MemoryNotMeasuredError, measure_peak
from compiler.backends import Artifact
from compiler.limits import format_size
from device_profiles import DeviceProfile
from edgec.manifest import MemoryPeak

__all__ = ["MEMORY_FAILURE", "measure", "memory_failure", "memory_refusal"]

logger = logging.getLogger(__name__)

MEMORY_FAILURE = "peak memory "  # how a gate failure for memory begins
_FIX = (
    "build a smaller artifact (--precision int8 or fp16) or a smaller batch (--input-shape), or give "
    "models more memory with model_memory_budget_bytes in a profile file of your own"
)


def describe(peak: MemoryPeak) -> str:
    """``12.3 MiB (VmHWM over a runtime baseline of 68.7 MiB, batch 1)``."""
    return (
        f"{format_size(peak.peak_bytes)} ({peak.method} over a runtime baseline of "
        f"{format_size(peak.baseline_bytes)}, batch {peak.batch})"
    )


def measure(artifact: Artifact, progress: Callable[[str], None]) -> tuple[MemoryPeak | None, str | None]:
    """The artifact's peak memory, or None and why it was not measured."""
    try:
        peak = measure_peak(
            artifact.path, artifact.format, artifact.inputs, artifact.outputs, artifact.runtime_config
        )
    except MemoryNotMeasuredError as e:
        progress(f"  peak memory {e}")
        logger.info("peak memory of %s %s", artifact.path.name, e)
        return None, str(e)
    progress(f"  peak memory {describe(peak)}")
    return peak, None


def memory_failure(profile: DeviceProfile, peak: MemoryPeak | None) -> str | None:
    """The gate failure when ``peak`` is over the profile's budget for one model."""
    budget = profile.model_memory_budget_bytes
    if peak is None or budget is None or peak.peak_bytes <= budget:
        return None
    return (
        f"{MEMORY_FAILURE}{format_size(peak.peak_bytes)} over the profile's model budget of "
        f"{format_size(budget)} ({peak.peak_bytes} > {budget} bytes)"
    )


def memory_refusal(label: str, peak: MemoryPeak | None, failures: list[str]) -> str | None:
    """The target's one-line error when its peak memory is among its gate failures:
    ``raspberry-pi-4 tflite int8: peak memory 812.0 MiB over the profile's model budget of
    512.0 MiB (...); measured ...; how to fix``; None when memory is not what failed."""
    over = next((f for f in failures if f.startswith(MEMORY_FAILURE)), None)
    if over is None or peak is None:
        return None
    others = [f for f in failures if f is not over]
    also = f"; it also missed: {'; '.join(others)}" if others else ""
    return (
        f"{label}: {over}; measured {peak.method} over a runtime baseline of "
        f"{format_size(peak.baseline_bytes)} at batch {peak.batch}{also}; {_FIX}"
    )
