"""What the install pipeline (``agent.install``) is handed, and the small checks its steps use.

``Reporter`` and ``InstallSettingsView`` are the protocols the ``Installer`` is given (the
MQTT reporter and ``agent.config.InstallSettings`` fit them); ``ProbationMonitor`` counts the
requests a model on probation answers, fed by the serving callback; ``check_names`` checks a
director document's release and paths before any path is made of them.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from edgec.director import DirectorDocument
from edgec.names import check_relative_path, parse_release
from edgec.reports import DeviceStatus, EventKind

__all__ = ["InstallSettingsView", "ProbationMonitor", "Reporter", "check_names"]

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


def check_names(doc: DirectorDocument) -> None:
    """The release and file paths the install makes paths of, checked before any path is made.

    ``DirectorDocument`` checks them when a document is parsed; this keeps a document built
    any other way from getting further. Raises ``InvalidNameError``."""
    parse_release(doc.release, "director document release")
    for file in doc.files:
        check_relative_path(file.path, "director document file path")
