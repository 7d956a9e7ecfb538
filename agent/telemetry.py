"""Telemetry windows: latency percentiles, drift against the manifest, and an offline buffer.

The HTTP server calls ``WindowRecorder.record`` after every request; every ``window_s`` the
agent closes a window (a ``Telemetry`` report), appends it to a ``TelemetryBuffer`` on disk
and publishes what the buffer holds, oldest first, acking each window the broker took::

    while recorder.due():
        buffer.append(recorder.close_window().model_dump(mode="json", exclude_none=True))
    for seq, window in buffer.pending():
        publish(window)  # QoS 1, then
        buffer.ack(seq)

Latency goes into a ``LatencyHistogram`` (log-spaced buckets, constant memory); drift is the
Population Stability Index (PSI) of live input and output values against the reference
bins in the manifest (``Manifest.reference_stats``), per tensor, with a verdict per window
(``agent.drift``: ``DriftMonitor``, ``DriftConfig``, re-exported here).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from agent.drift import DriftConfig, DriftMonitor, worst_verdict
from edgec._atomic import atomic_write
from edgec.manifest import TensorStats
from edgec.reports import Telemetry

__all__ = [
    "DriftConfig",
    "DriftMonitor",
    "LatencyHistogram",
    "TelemetryBuffer",
    "WindowRecorder",
    "worst_verdict",
]

logger = logging.getLogger(__name__)


# --- latency -------------------------------------------------------------------------------


class LatencyHistogram:
    """Latencies in log-spaced buckets: constant memory, percentiles within one bucket's width.

    Buckets grow by ``growth`` from ``low_s`` to at least ``high_s`` (10 µs to 100 s by 5 %:
    333 counters), plus one below ``low_s`` and one above the top. ``percentile`` finds the
    bucket that holds the sample of that rank and interpolates inside it, so its answer lies
    in the same bucket as the exact one: off by at most ``relative_error`` of it (and by at most
    ``low_s`` below ``low_s``; past the top it answers the largest sample seen).

    Not thread-safe: guard it with a lock where several threads add (``WindowRecorder`` does).
    """

    def __init__(self, low_s: float = 10e-6, high_s: float = 100.0, growth: float = 1.05) -> None:
        if not 0 < low_s < high_s:
            raise ValueError(f"need 0 < low_s < high_s, got {low_s} and {high_s}")
        if not growth > 1:
            raise ValueError(f"growth must be > 1, got {growth}")
        steps = math.ceil(math.log(high_s / low_s) / math.log(growth))
        # bucket 0 is [0, low_s); bucket i is [edges[i - 1], edges[i]); the last is [edges[-1], inf)
        self._edges = [low_s * growth**i for i in range(steps + 1)]
        self._inv_log_growth = 1.0 / math.log(growth)
        self.growth = growth
        self._counts = [0] * (steps + 2)
        self.count = 0
        self.sum_s = 0.0
        self.min_s = math.inf
        self.max_s = -math.inf

    @property
    def relative_error(self) -> float:
        """The most a percentile can be off, relative to the exact one (above ``low_s``)."""
        return self.growth - 1.0

    def _index(self, seconds: float) -> int:
        edges = self._edges
        if seconds < edges[0]:
            return 0
        if seconds >= edges[-1]:
            return len(edges)
        i = int(math.log(seconds / edges[0]) * self._inv_log_growth) + 1
        # the logarithm may round across an edge; settle on the bucket that holds the value
        if seconds < edges[i - 1]:
            return i - 1
        if seconds >= edges[i]:
            return i + 1
        return i

    def _bounds(self, index: int) -> tuple[float, float]:
        lo = 0.0 if index == 0 else self._edges[index - 1]
        hi = self._edges[index] if index < len(self._edges) else self.max_s
        return max(lo, self.min_s), min(hi, self.max_s)

    def add(self, seconds: float) -> None:
        if not seconds >= 0:  # also refuses NaN
            raise ValueError(f"a latency must be >= 0 seconds, got {seconds}")
        self._counts[self._index(seconds)] += 1
        self.count += 1
        self.sum_s += seconds
        self.min_s = min(self.min_s, seconds)
        self.max_s = max(self.max_s, seconds)

    def percentile(self, q: float) -> float | None:
        """The ``q``-th percentile (0 to 100, as numpy takes it) in seconds; None when empty."""
        return self.percentiles([q])[0]

    def percentiles(self, qs: Sequence[float]) -> list[float | None]:
        """Several percentiles in one pass over the buckets."""
        if any(not 0 <= q <= 100 for q in qs):
            raise ValueError(f"percentiles are between 0 and 100, got {list(qs)}")
        if self.count == 0:
            return [None] * len(qs)
        # the rank of the sample that numpy's "inverted_cdf" percentile answers (1-based)
        ranks = [max(1, math.ceil(q / 100.0 * self.count - 1e-9)) for q in qs]
        answers: dict[int, float] = {}
        below = 0
        pending = sorted(set(ranks))
        for index, n in enumerate(self._counts):
            while pending and pending[0] <= below + n:
                rank = pending.pop(0)
                lo, hi = self._bounds(index)
                answers[rank] = lo + (rank - below - 0.5) / n * (hi - lo)
            if not pending:
                break
            below += n
        out: list[float | None] = []
        for q, rank in zip(qs, ranks, strict=True):
            out.append(self.min_s if q == 0 else self.max_s if q == 100 else answers[rank])
        return out

    def merge(self, other: LatencyHistogram) -> None:
        """Add ``other``'s samples to this one (both must have the same buckets)."""
        if other._edges != self._edges:
            raise ValueError("cannot merge histograms with different buckets")
        self._counts = [a + b for a, b in zip(self._counts, other._counts, strict=True)]
        self.count += other.count
        self.sum_s += other.sum_s
        self.min_s = min(self.min_s, other.min_s)
        self.max_s = max(self.max_s, other.max_s)

    def reset(self) -> None:
        self._counts = [0] * len(self._counts)
        self.count = 0
        self.sum_s = 0.0
        self.min_s = math.inf
        self.max_s = -math.inf


# --- windows -------------------------------------------------------------------------------


def _iso(seconds: float) -> str:
    return dt.datetime.fromtimestamp(seconds, dt.UTC).isoformat(timespec="milliseconds")


class WindowRecorder:
    """Counts requests into windows of ``window_s`` seconds, one model per window.

    ``record`` is safe to call from many threads at once and cheap: the drift binning runs
    outside the lock. A window reports the model that served it: when ``record`` or
    ``set_reference`` names another model, the open window is closed early (if it served any
    request) and queued, and a new one starts. ``due`` is true while a closed window waits or
    the open one has run its time; ``close_window`` hands out the oldest queued window first.
    Requests still in flight on an old model after a swap therefore close short windows of
    their own rather than mixing into the new model's.

    ``reference`` is the reference statistics of ``model``; with ``model`` None it belongs to
    whichever model is recorded (or set) first. Window numbers (``seq``) start at ``first_seq``,
    so an agent that passes in its buffer's ``next_seq`` keeps them increasing across restarts.
    Latency percentiles count successful requests only; drift counts the inputs and outputs of
    successful requests.
    """

    _KEEP_REFERENCES = 4  # models whose references are kept (the current one and a few before)

    def __init__(
        self,
        reference: Sequence[TensorStats] = (),
        window_s: float = 60.0,
        *,
        model: str | None = None,
        first_seq: int = 0,
        drift: DriftConfig | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        if not window_s > 0:
            raise ValueError(f"window_s must be > 0, got {window_s}")
        self.window_s = window_s
        self._drift = drift or DriftConfig()
        self._clock = clock
        self._wall = wall
        self._lock = threading.Lock()
        self._monitors: dict[str, DriftMonitor] = {}
        self._unclaimed: DriftMonitor | None = None
        if model is None:
            self._unclaimed = DriftMonitor(reference, self._drift) if reference else None
        else:
            self._monitors[model] = DriftMonitor(reference, self._drift)
        self._model = model
        self._monitor = self._monitors.get(model) if model is not None else None
        self._next_seq = first_seq
        self._closed: deque[Telemetry] = deque()
        self._latency = LatencyHistogram()
        self._requests = 0
        self._errors = 0
        self._start_clock = clock()
        self._start_wall = wall()

    @property
    def model(self) -> str | None:
        """The model the open window is counting."""
        return self._model

    def set_reference(self, model: str, reference: Sequence[TensorStats]) -> None:
        """``model`` now serves, with these reference statistics; closes a window of another."""
        monitor = DriftMonitor(reference, self._drift)
        with self._lock:
            self._monitors.pop(model, None)
            self._monitors[model] = monitor
            while len(self._monitors) > self._KEEP_REFERENCES:
                del self._monitors[next(iter(self._monitors))]
            if model != self._model:
                self._switch(model)
            elif self._monitor is not None and self._monitor.names:
                # the same model with new statistics: its counts start over with them
                logger.info("reference statistics of %s replaced mid-window; drift restarts", model)
            self._monitor = monitor

    def record(
        self,
        model: str,
        latency_s: float,
        ok: bool,
        inputs: Mapping[str, np.ndarray] | None = None,
        outputs: Mapping[str, np.ndarray] | None = None,
    ) -> None:
        """Count one request that ``model`` answered in ``latency_s`` seconds."""
        monitor = self._monitors.get(model) or self._unclaimed
        counts: list[tuple[str, np.ndarray]] = []
        if ok and monitor is not None:
            for tensors in (inputs, outputs):
                for name, array in (tensors or {}).items():
                    binned = monitor.bin_counts(name, array)
                    if binned is not None:
                        counts.append((name, binned))
        with self._lock:
            if model != self._model:
                self._switch(model)
            if ok:
                self._latency.add(latency_s)  # first: a bad latency raises before anything counts
            else:
                self._errors += 1
            self._requests += 1
            if counts and monitor is self._monitor and monitor is not None:
                for name, binned in counts:
                    monitor.add_counts(name, binned)

    def due(self) -> bool:
        """Whether ``close_window`` has a window to give."""
        with self._lock:
            return bool(self._closed) or self._clock() - self._start_clock >= self.window_s

    def close_window(self) -> Telemetry:
        """The oldest window closed early, else the open window, closed now (a new one opens)."""
        with self._lock:
            if self._closed:
                return self._closed.popleft()
            return self._close()

    def _switch(self, model: str) -> None:
        """Start counting ``model``; called with the lock held."""
        if self._requests:
            self._closed.append(self._close())
        if model not in self._monitors and self._unclaimed is not None:
            self._monitors[model] = self._unclaimed
        self._unclaimed = None
        self._model = model
        self._monitor = self._monitors.get(model)
        if self._monitor is not None:
            self._monitor.reset()

    def _close(self) -> Telemetry:
        """The open window as a report; opens the next. Called with the lock held."""
        now_clock, now_wall = self._clock(), self._wall()
        p50, p95, p99 = self._latency.percentiles([50, 95, 99])
        psi = self._monitor.psis() if self._monitor is not None else {}
        verdict = worst_verdict(self._drift.verdict(value) for value in psi.values())
        window = Telemetry(
            seq=self._next_seq,
            model=self._model,
            started_at=_iso(self._start_wall),
            ended_at=_iso(now_wall),
            window_s=round(now_clock - self._start_clock, 3),
            requests=self._requests,
            errors=self._errors,
            p50_ms=None if p50 is None else round(p50 * 1e3, 3),
            p95_ms=None if p95 is None else round(p95 * 1e3, 3),
            p99_ms=None if p99 is None else round(p99 * 1e3, 3),
            drift=None if verdict is None else verdict.value,
            psi={name: round(value, 5) for name, value in psi.items()},
        )
        self._next_seq += 1
        self._requests = self._errors = 0
        self._latency.reset()
        if self._monitor is not None:
            self._monitor.reset()
        self._start_clock, self._start_wall = now_clock, now_wall
        return window


# --- offline buffer ------------------------------------------------------------------------

_WINDOW_FILE = re.compile(r"^(\d{20})\.json$")
_COUNTER = "next_seq"


class TelemetryBuffer:
    """Windows waiting to be sent, on disk, oldest first, at most ``max_windows`` of them.

    Each window is one JSON file named by its sequence number, written atomically; the next
    number is kept on disk too, so it keeps increasing across restarts even when every window
    was acked. A full buffer drops its oldest window (counted in ``dropped`` and logged). A file
    that cannot be read back is logged and deleted, never raised. Thread-safe within one
    process; one process per folder.
    """

    def __init__(self, folder: Path, max_windows: int = 10_000) -> None:
        if max_windows < 1:
            raise ValueError(f"max_windows must be >= 1, got {max_windows}")
        self.folder = folder
        self.max_windows = max_windows
        self.dropped = 0
        self._lock = threading.Lock()
        folder.mkdir(parents=True, exist_ok=True)
        seqs = []
        for path in folder.iterdir():
            match = _WINDOW_FILE.match(path.name)
            if match:
                seqs.append(int(match.group(1)))
            elif path.name.startswith(".") and path.name.endswith(".tmp"):
                path.unlink(missing_ok=True)  # a write that a crash cut short
        self._seqs = deque(sorted(seqs))
        self._next_seq = max(self._read_counter(), self._seqs[-1] + 1 if self._seqs else 0)
        with self._lock:
            while len(self._seqs) > max_windows:
                self._drop_oldest()

    @property
    def next_seq(self) -> int:
        """The sequence number the next appended window gets."""
        return self._next_seq

    def __len__(self) -> int:
        return len(self._seqs)

    def _path(self, seq: int) -> Path:
        return self.folder / f"{seq:020d}.json"

    def _read_counter(self) -> int:
        path = self.folder / _COUNTER
        try:
            return int(path.read_text(encoding="ascii").strip())
        except FileNotFoundError:
            return 0
        except (OSError, ValueError, UnicodeDecodeError) as e:
            logger.warning(
                "telemetry sequence counter %s is unreadable (%s); using the windows on disk", path, e
            )
            return 0

    def _drop_oldest(self) -> None:
        seq = self._seqs.popleft()
        self._path(seq).unlink(missing_ok=True)
        self.dropped += 1
        logger.warning("telemetry buffer full (%d windows): dropped window %d", self.max_windows, seq)

    def append(self, window: Mapping[str, Any]) -> int:
        """Store ``window`` (JSON-serializable) durably; returns its sequence number."""
        data = json.dumps(window, allow_nan=False, separators=(",", ":")).encode()
        with self._lock:
            seq = self._next_seq
            while len(self._seqs) >= self.max_windows:
                self._drop_oldest()
            atomic_write(self._path(seq), data)
            self._seqs.append(seq)
            self._next_seq = seq + 1
            atomic_write(self.folder / _COUNTER, str(self._next_seq).encode())
            return seq

    def pending(self, limit: int | None = None) -> list[tuple[int, dict[str, Any]]]:
        """Up to ``limit`` stored windows with their sequence numbers, oldest first."""
        with self._lock:
            seqs = list(self._seqs)
        out: list[tuple[int, dict[str, Any]]] = []
        for seq in seqs:
            if limit is not None and len(out) >= limit:
                break
            path = self._path(seq)
            try:
                window = json.loads(path.read_bytes())
                problem = None if isinstance(window, dict) else "not a JSON object"
            except FileNotFoundError:
                continue  # acked or dropped meanwhile
            except (OSError, ValueError) as e:
                problem = f"{type(e).__name__}: {e}"
            if problem is not None:
                logger.warning("telemetry window %s is unreadable (%s); deleting it", path, problem)
                self.ack(seq)
                continue
            out.append((seq, window))
        return out

    def ack(self, seq: int) -> None:
        """Forget window ``seq`` (it was delivered); unknown numbers are ignored."""
        with self._lock:
            try:
                self._seqs.remove(seq)
            except ValueError:
                return
            self._path(seq).unlink(missing_ok=True)
