"""What the install pipeline (``agent.install``) is handed, and the small checks its steps use.

``Reporter`` and ``InstallSettingsView`` are the protocols the ``Installer`` is given (the
MQTT reporter and ``agent.config.InstallSettings`` fit them); ``ProbationMonitor`` counts the
requests a model on probation answers, fed by the serving callback, and ``watch_probation``
judges it (``Refused`` where it fails); ``check_names`` checks a director document's release
and paths before any path is made of them.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from agent.slot import LoadedModel
from edgec.director import DirectorDocument
from edgec.errors import EdgecError
from edgec.names import check_relative_path, parse_release
from edgec.reports import DeviceStatus, EventKind, InstallStep

__all__ = ["InstallSettingsView", "ProbationMonitor", "Refused", "Reporter", "check_names", "watch_probation"]

logger = logging.getLogger(__name__)


class Reporter(Protocol):
    """Where the pipeline's events and state go; kinds and statuses are the contract's enums
    (a refusal's ``step``, an ``InstallStep``, and the figures ride in ``figures``)."""

    def event(
        self, kind: EventKind, release: str | None, detail: str | None = None, **figures: Any
    ) -> None: ...

    def state(self, status: DeviceStatus, installed: str | None, detail: str | None = None) -> None: ...


class InstallSettingsView(Protocol):
    """The parts of ``agent.config.InstallSettings`` the pipeline reads."""

    max_target_bytes: int
    probation_s: float
    probation_min_requests: int
    max_error_rate: float
    warmup_runs: int
    max_attempts: int
    meminfo_path: Path  # memory fit (agent.memory)
    cgroup_root: Path
    memory_headroom_bytes: int
    shadow_cpu_budget: float
    shadow_window_s: float
    shadow_queue: int


@dataclass
class ProbationMonitor:
    """Counts the requests a model on probation answers (fed by the serving callback)."""

    _lock: threading.Lock = field(default_factory=threading.Lock)
    _version: str | None = None
    _latencies_s: list[float] = field(default_factory=list)
    _errors: int = 0

    def watch(self, version: str | None) -> None:
        with self._lock:
            self._version, self._latencies_s, self._errors = version, [], 0

    def record(self, version: str, latency_s: float, ok: bool) -> None:
        if version != self._version:
            return
        with self._lock:
            if version == self._version and len(self._latencies_s) < 100_000:
                self._latencies_s.append(latency_s)
                self._errors += not ok

    def figures(self) -> tuple[int, int, float | None]:
        """``(requests, errors, p95 ms)``."""
        with self._lock:
            n = len(self._latencies_s)
            p95 = float(np.percentile(self._latencies_s, 95)) * 1e3 if n else None
            return n, self._errors, p95


class Refused(EdgecError):
    """The install of this document ends here (reported; the current model keeps serving).
    Whose fault it was is in ``__cause__`` (a ``TrustError``, a ``BundleError``...) or the
    step that refused it (a self-test, a probation)."""

    def __init__(self, step: InstallStep, reason: str) -> None:
        super().__init__(f"{step}: {reason}")
        self.step = step
        self.reason = reason


def watch_probation(
    model: LoadedModel,
    samples: list[dict[str, np.ndarray]],
    settings: InstallSettingsView,
    monitor: ProbationMonitor,
    sleep: Callable[[float], None] = time.sleep,
) -> dict[str, Any]:
    """Watch the new model serve for ``probation_s``; golden probes fill in when traffic is
    low. Error rate and p95 latency against the budget decide: the figures, or ``Refused``."""
    start = time.monotonic()
    probes = 0
    while True:
        elapsed = time.monotonic() - start
        count, _, _ = monitor.figures()
        if elapsed >= settings.probation_s and count >= settings.probation_min_requests:
            break
        expected = settings.probation_min_requests * min(elapsed / max(settings.probation_s, 1e-9), 1.0)
        if count < expected or elapsed >= settings.probation_s:
            _probe(model, samples[probes % len(samples)], monitor)
            probes += 1
        else:
            sleep(0.05)
    count, errors, p95_ms = monitor.figures()
    budget = model.manifest.max_latency_ms
    figures = {"requests": count, "errors": errors, "p95_ms": p95_ms, "budget_ms": budget, "probes": probes}
    if errors / count > settings.max_error_rate:
        raise Refused(
            InstallStep.PROBATION, f"error rate {errors}/{count} over {settings.max_error_rate:.1%}"
        )
    if p95_ms is not None and p95_ms > budget:
        raise Refused(
            InstallStep.PROBATION, f"p95 latency {p95_ms:.1f} ms over the budget of {budget:.1f} ms"
        )
    return figures


def _probe(model: LoadedModel, sample: dict[str, np.ndarray], monitor: ProbationMonitor) -> None:
    started = time.perf_counter()
    try:
        model.infer(sample)
        ok = True
    except Exception:
        logger.exception("probation probe failed")
        ok = False
    monitor.record(model.manifest.version, time.perf_counter() - started, ok)


def check_names(doc: DirectorDocument) -> None:
    """The release and file paths the install makes paths of, checked before any path is made.

    ``DirectorDocument`` checks them when a document is parsed; this keeps a document built
    any other way from getting further. Raises ``InvalidNameError``."""
    parse_release(doc.release, "director document release")
    for file in doc.files:
        check_relative_path(file.path, "director document file path")
