"""The agent's Prometheus metrics, served as ``GET /metrics`` on the v2 port (``agent.serving``).

``AgentMetrics`` owns a ``CollectorRegistry`` of its own (never prometheus_client's global
one: two agents in one process, or a test, each count their own) holding::

    edgec_agent_requests_total{model,version,status}    counter  infer requests by HTTP status
    edgec_agent_request_duration_seconds{model}          histogram  infer handling time, 0.1 ms-1 s
    edgec_agent_model_info{model,version,format,precision,profile}  1 for the model being served
    edgec_agent_model_load_seconds{model,version}        gauge  how long loading that model took
    edgec_agent_drift_psi{model,version,tensor}          gauge  the latest window's PSI per tensor
    edgec_agent_install_step{edgec_agent_install_step}   enum   where the current install is
    edgec_agent_installs_total{outcome}                  counter  committed/refused/rolled_back/failed
    edgec_agent_install_events_total{event}              counter  every install event, by kind
    edgec_agent_fetched_bytes_total                      counter  bundle bytes downloaded
    process_resident_memory_bytes, process_cpu_seconds_total, ...  (ProcessCollector)

The request path costs two calls: ``RequestSeries.observe`` (one counter and one histogram
child, found through dictionaries keyed by the model and the status, filled once). Only
infer requests count, each once with the status it was answered; ``model``/``version`` are
the served model's, or empty for a request that named no model this agent serves (404) or
came before any model was installed (503), so no label value is ever taken from what a client
sent. The series of at most ``MAX_VERSIONS`` model versions are kept: an older version's
series are removed when a newer one first appears, so a device that installs for years
exposes a bounded number of series.

The rest is fed by the agent (``agent.daemon``):

- ``observe_event(kind, release, figures)``: an install event as ``agent.install`` reports it
  (``accepted``, ``fetched``, ``retrying``, ``swapped``, ``committed``, ``refused`` with its
  ``step``, ``error``, ``started``, ``load-failed``); ``reporting(reporter)`` wraps a
  ``Reporter`` so that every event it sends is observed too;
- ``observe_window(window)``: a closed telemetry window (``WindowRecorder.close_window``):
  its PSI per tensor replaces the gauge's values;
- ``timed_load(load)``: wraps a bundle loader so each load's duration is recorded;
- ``watch(slot)``: the served model's info, read from the slot at each scrape
  (``InferenceServer`` calls it).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Enum, Gauge, Histogram, ProcessCollector
from prometheus_client.exposition import generate_latest
from prometheus_client.metrics_core import InfoMetricFamily, Metric
from prometheus_client.registry import Collector

from agent._install_parts import Reporter
from agent.slot import LoadedModel, ModelSlot
from edgec.manifest import Manifest
from edgec.reports import DeviceStatus, EventKind, InstallStep, Telemetry

__all__ = [
    "CONTENT_TYPE",
    "DURATION_BUCKETS_S",
    "INSTALL_STEPS",
    "MAX_VERSIONS",
    "AgentMetrics",
    "RequestSeries",
]

logger = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"  # the text exposition format 0.0.4
# infer handling time on a device: a small model answers in 0.1-1 ms, a large one in 100s of ms
DURATION_BUCKETS_S = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
MAX_VERSIONS = 4  # model versions whose series are kept
MAX_TENSORS = 64  # PSI gauges per window (the window's report is bounded; this bounds the series)
MAX_LABEL_CHARS = 128
INSTALL_STEPS = ("idle", "accepted", "retrying", "fetching", "fetched", "probation")
OUTCOMES = ("committed", "refused", "rolled_back", "failed")
EVENTS = tuple(kind.value for kind in EventKind)  # counted by kind; any other kind as "other"
_STEP_AFTER: dict[str, str] = {
    EventKind.ACCEPTED: "accepted",
    EventKind.RETRYING: "retrying",
    EventKind.SWAPPED: "probation",
}
_DONE = (EventKind.COMMITTED, EventKind.REFUSED, EventKind.ERROR)


def _label(value: str) -> str:
    return value if len(value) <= MAX_LABEL_CHARS else value[: MAX_LABEL_CHARS - 3] + "..."


class RequestSeries:
    """The request counters and latency histogram of one model version: what the request
    path touches, found once (labelled children are looked up by string only the first time
    a status is seen)."""

    __slots__ = ("_by_status", "_duration", "_requests", "labels")

    def __init__(
        self,
        requests: Counter,
        duration: Histogram,
        model: str,
        version: str,
        statuses: Iterable[int] = (200,),
    ) -> None:
        self.labels = (model, version)
        self._requests = requests
        self._duration = duration.labels(model)
        self._by_status: dict[int, Any] = {s: requests.labels(model, version, str(s)) for s in statuses}

    def observe(self, status: int, seconds: float) -> None:
        """One infer request answered ``status`` after ``seconds``."""
        counter = self._by_status.get(status)
        if counter is None:
            counter = self._by_status[status] = self._requests.labels(*self.labels, str(status))
        counter.inc()
        self._duration.observe(seconds)

    @property
    def statuses(self) -> list[int]:
        """The statuses counted so far."""
        return list(self._by_status)


class _SlotInfo(Collector):
    """``edgec_agent_model_info`` of the model in a slot, read at each scrape."""

    def __init__(self, slot: ModelSlot) -> None:
        self.slot = slot

    def collect(self) -> Iterable[Metric]:
        family = InfoMetricFamily(
            "edgec_agent_model",
            "The model being served (1): name, version, bundle format, precision, device profile.",
            labels=("model", "version", "format", "precision", "profile"),
        )
        model = self.slot.model
        if model is not None:
            m = model.manifest
            values = (m.name, m.version, m.format.value, m.precision.value, m.profile.id)
            family.add_metric([_label(v) for v in values], {})
        yield family


class _EventTee:
    """A ``Reporter`` that hands every event to the metrics, then to the reporter it wraps."""

    def __init__(self, metrics: AgentMetrics, reporter: Reporter) -> None:
        self._metrics = metrics
        self._reporter = reporter

    def event(self, kind: EventKind, release: str | None, detail: str | None = None, **figures: Any) -> None:
        self._metrics.observe_event(kind, release, figures)
        self._reporter.event(kind, release, detail, **figures)

    def state(self, status: DeviceStatus, installed: str | None, detail: str | None = None) -> None:
        self._reporter.state(status, installed, detail)


class AgentMetrics:
    """The agent's metrics, in a registry of their own (see the module docstring)."""

    def __init__(self, *, process: bool = True) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "edgec_agent_requests",
            "Infer requests answered, by model, version and HTTP status.",
            ("model", "version", "status"),
            registry=r,
        )
        self.request_duration = Histogram(
            "edgec_agent_request_duration_seconds",
            "Time from an infer request's dispatch to its answer, in seconds.",
            ("model",),
            buckets=DURATION_BUCKETS_S,
            registry=r,
        )
        self.model_load = Gauge(
            "edgec_agent_model_load_seconds",
            "How long loading the model took (checking its files and opening its runtime session).",
            ("model", "version"),
            registry=r,
        )
        self.drift_psi = Gauge(
            "edgec_agent_drift_psi",
            "Population Stability Index of the latest telemetry window, per input and output tensor.",
            ("model", "version", "tensor"),
            registry=r,
        )
        self.install_step = Enum(
            "edgec_agent_install_step",
            "Where the current install is (idle: none running).",
            states=list(INSTALL_STEPS),
            registry=r,
        )
        self.installs = Counter(
            "edgec_agent_installs", "Installs finished, by outcome.", ("outcome",), registry=r
        )
        self.install_events = Counter(
            "edgec_agent_install_events", "Install events reported, by kind.", ("event",), registry=r
        )
        self.fetched_bytes = Counter(
            "edgec_agent_fetched_bytes",
            "Bundle bytes downloaded (resumed parts not counted twice).",
            registry=r,
        )
        for outcome in OUTCOMES:
            self.installs.labels(outcome)
        for kind in (*EVENTS, "other"):
            self.install_events.labels(kind)
        if process:
            ProcessCollector(registry=r)
        self._lock = threading.Lock()
        self._series: dict[tuple[str, str], RequestSeries] = {}
        self._versions: list[tuple[str, str]] = []  # oldest first, at most MAX_VERSIONS
        self._drift_model: tuple[str, str] | None = None
        self._slots: list[ModelSlot] = []
        # requests that named no model served here, or came before any: never a 200
        self.unserved = RequestSeries(self.requests, self.request_duration, "", "", statuses=())

    # -- the request path --------------------------------------------------------------------
    def series(self, manifest: Manifest) -> RequestSeries:
        """The request series of ``manifest``'s model version (made the first time)."""
        found = self._series.get((manifest.name, manifest.version))
        if found is not None:
            return found
        key = (_label(manifest.name), _label(manifest.version))
        with self._lock:
            found = self._series.get(key)
            if found is None:
                self._keep_version(key)
                found = self._series[key] = RequestSeries(self.requests, self.request_duration, *key)
            self._series[(manifest.name, manifest.version)] = found
            return found

    def _keep_version(self, key: tuple[str, str]) -> None:
        """Count ``key`` among the versions kept; forget the oldest past ``MAX_VERSIONS``.
        Called with the lock held."""
        if key in self._versions:
            return
        self._versions.append(key)
        while len(self._versions) > MAX_VERSIONS:
            old = self._versions.pop(0)
            for cache_key, series in list(self._series.items()):
                if series.labels == old:
                    del self._series[cache_key]
                    for status in series.statuses:
                        self.requests.remove(*old, str(status))
            self.model_load.remove(*old)
            if self._drift_model == old:
                self.drift_psi.clear()
                self._drift_model = None
            if not any(name == old[0] for name, _ in self._versions):
                self.request_duration.remove(old[0])

    # -- fed by the agent --------------------------------------------------------------------
    def watch(self, slot: ModelSlot) -> None:
        """Expose the model in ``slot`` as ``edgec_agent_model_info`` (once per slot)."""
        with self._lock:
            if any(s is slot for s in self._slots):
                return
            self._slots.append(slot)
        self.registry.register(_SlotInfo(slot))

    def observe_load(self, manifest: Manifest, seconds: float) -> None:
        key = (_label(manifest.name), _label(manifest.version))
        with self._lock:
            self._keep_version(key)
            self.model_load.labels(*key).set(seconds)

    def timed_load(self, load: Callable[[Path], LoadedModel]) -> Callable[[Path], LoadedModel]:
        """``load``, recording how long each successful load took."""

        def timed(folder: Path) -> LoadedModel:
            started = time.perf_counter()
            model = load(folder)
            self.observe_load(model.manifest, time.perf_counter() - started)
            return model

        return timed

    def observe_event(self, kind: str, release: str | None, figures: Mapping[str, Any]) -> None:
        """An install event (``agent.install``'s ``Reporter.event``): the step, the outcome,
        the bytes fetched. Never raises: metrics must not break an install."""
        try:
            self._observe_event(kind, release, figures)
        except Exception:  # figures of an unexpected shape
            logger.exception("metrics could not count install event %s", kind)

    def _observe_event(self, kind: str, release: str | None, figures: Mapping[str, Any]) -> None:
        self.install_events.labels(kind if kind in EVENTS else "other").inc()
        if kind == EventKind.FETCHED:
            size, resumed = figures.get("bytes"), figures.get("resumed_at") or 0
            fetched = figures.get("fetched_bytes")  # a delta download copies the rest from disk
            if isinstance(fetched, int) and fetched >= 0:
                self.fetched_bytes.inc(fetched)
            elif isinstance(size, int) and isinstance(resumed, int) and size >= resumed >= 0:
                self.fetched_bytes.inc(size - resumed)
            file, of = figures.get("file"), figures.get("of")
            self.install_step.state("fetched" if file is not None and file == of else "fetching")
        elif kind in _STEP_AFTER:
            self.install_step.state(_STEP_AFTER[kind])
        elif kind in _DONE and (kind != EventKind.ERROR or release is not None):
            self.install_step.state("idle")
            if kind == EventKind.COMMITTED:
                outcome = "committed"
            elif kind == EventKind.REFUSED:
                outcome = "rolled_back" if figures.get("step") == InstallStep.PROBATION else "refused"
            else:
                outcome = "failed"
            self.installs.labels(outcome).inc()

    def reporting(self, reporter: Reporter) -> Reporter:
        """``reporter``, with every event it is given observed here first."""
        return _EventTee(self, reporter)

    def observe_window(self, window: Telemetry) -> None:
        """A closed telemetry window: its PSI per tensor becomes the drift gauge (the gauges
        of another model are dropped; a window with no PSI leaves the last values)."""
        if not window.psi or not window.model:
            return
        name, _, version = window.model.rpartition(":")
        key = (_label(name or window.model), _label(version if name else ""))
        with self._lock:
            if key != self._drift_model:
                self.drift_psi.clear()
                self._drift_model = key
            for tensor, psi in list(window.psi.items())[:MAX_TENSORS]:
                self.drift_psi.labels(*key, _label(tensor)).set(psi)

    # -- the scrape --------------------------------------------------------------------------
    def exposition(self) -> bytes:
        """Every metric in the text exposition format 0.0.4 (``CONTENT_TYPE``)."""
        return generate_latest(self.registry)
