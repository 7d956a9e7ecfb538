"""Latency on the build host, for ``--precision auto`` with a profile whose objective is latency.

Figures measured here only mean something for the target when the host is that target: an
ONNX artifact that the profile runs on onnxruntime's CPU provider, on a CPU of the profile's
architecture (an x86-64 profile built on an x86-64 machine). The candidates are timed side
by side: they take turns in every round, so a busy machine slows them alike, and each is
opened the way its bundle tells the device to (its ``runtime_config``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from compiler.backends import Artifact
from compiler.runtime import OnnxRuntimeRunner
from device_profiles import CpuArch, DeviceProfile, Runtime
from edgec.errors import ConversionError
from edgec.manifest import Precision, TargetFormat

if TYPE_CHECKING:
    from compiler.search import Context, Trial

__all__ = ["host_cpu", "median_latencies_ms", "not_the_target", "time_candidates"]

logger = logging.getLogger(__name__)
ROUNDS = 5  # each candidate's median is taken over this many interleaved rounds...
ROUND_S = 0.3  # ...of about this long each (at least one run, at most MAX_RUNS)
MAX_RUNS = 20
_ARCHES = {  # platform.machine(), lowercased
    "x86_64": CpuArch.X86_64,
    "amd64": CpuArch.X86_64,
    "aarch64": CpuArch.ARM64,
    "arm64": CpuArch.ARM64,
}


def host_cpu() -> str:
    """This machine's CPU, for the notes: its model name where Linux says it, and its cores."""
    name = platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                name = value.strip()
                break
    return f"{name}, {os.cpu_count()} cores"


def not_the_target(profile: DeviceProfile, fmt: TargetFormat) -> str | None:
    """Why latency measured on this host says nothing about ``profile``'s, or None if it does."""
    if fmt is not TargetFormat.ONNX:
        return f"only ONNX artifacts are timed on the host, not {fmt.value}"
    if list(profile.onnxruntime_providers) != [Runtime.CPU]:
        providers = ", ".join(p.value for p in profile.onnxruntime_providers)
        return f"{profile.id} runs onnxruntime with {providers}, not on this host's CPU alone"
    host = _ARCHES.get(platform.machine().lower())
    if host is not profile.cpu_arch:
        return f"this host is {platform.machine()}, {profile.id} is {profile.cpu_arch.value}"
    return None


def median_latencies_ms(artifacts: Sequence[Artifact], feeds: Mapping[str, np.ndarray]) -> list[float]:
    """Each ONNX artifact's median time for one run on ``feeds``, in milliseconds, measured
    side by side (module docstring)."""
    runners = [OnnxRuntimeRunner(a.path, a.runtime_config) for a in artifacts]
    inputs = dict(feeds)
    warm_s = []
    for runner in runners:
        runner.run(inputs)  # the first run allocates and prepacks
        started = time.perf_counter()
        runner.run(inputs)
        warm_s.append(time.perf_counter() - started)
    runs = [max(1, min(MAX_RUNS, int(ROUND_S / max(s, 1e-6)))) for s in warm_s]
    times: list[list[float]] = [[] for _ in runners]
    for round_index in range(ROUNDS):
        order = list(range(len(runners)))
        order = order[round_index % len(order) :] + order[: round_index % len(order)]
        for i in order:
            runners[i].run(inputs)  # untimed: the previous candidate's threads go idle
            for _ in range(runs[i]):
                started = time.perf_counter()
                runners[i].run(inputs)
                times[i].append((time.perf_counter() - started) * 1e3)
    return [float(np.median(t)) for t in times]


def time_candidates(ctx: Context, trail: list[Trial]) -> None:
    """Time the first passing trial of each precision in ``trail`` on this host and set their
    ``latency_ms`` (``search.best`` then takes the fastest); the figures go in its notes."""
    firsts: dict[Precision, Trial] = {}
    for t in trail:
        if t.passed:
            firsts.setdefault(t.precision, t)
    candidates = list(firsts.values())
    if not candidates:
        return
    ctx.progress("  timing " + ", ".join(t.label() for t in candidates) + " on this host")
    try:
        figures = median_latencies_ms([t.artifact for t in candidates], ctx.verify_set.sample(0))
    except ConversionError as e:  # a session that verified but will not open twice: say so, pick by size
        smallest = min(candidates, key=lambda t: t.size_bytes)
        smallest.artifact.notes.append(f"precision auto, objective latency: not timed ({e}); the smallest")
        return
    for t, ms in zip(candidates, figures, strict=True):
        t.latency_ms = ms
    fastest = min(candidates, key=lambda t: (t.latency_ms or 0.0, t.size_bytes))
    measured = ", ".join(f"{t.label()} {ms:.2f} ms" for t, ms in zip(candidates, figures, strict=True))
    fastest.artifact.notes.append(
        f"precision auto, objective latency: {fastest.label()} is the fastest configuration that met "
        f"the gate (median per run on this host, {host_cpu()}: {measured})"
    )
    logger.info("latency on this host: %s", measured)
