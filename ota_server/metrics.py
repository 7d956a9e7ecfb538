"""The OTA server's Prometheus metrics, on its own ``CollectorRegistry`` (never the global one).

Counted as things happen (cheap: one labelled child each, cached):

- ``edgec_server_fetch_bytes_total{transport}`` and ``edgec_server_fetch_chunks_total{transport}``:
  what devices downloaded over MQTT (fetch chunks) and HTTP (repository GETs, Range included);
- ``edgec_server_reports_total{kind}`` and ``edgec_server_reports_dropped_total{reason}``:
  device reports taken in and refused; ``edgec_server_report_lag_seconds``: from a telemetry
  window's end on the device to the server storing it;
- ``edgec_server_device_events_total{event,step}``: what the devices' install pipelines
  reported (``installed``, ``refused`` at ``fetch``, ``rolled_back`` …);
- ``edgec_server_mqtt_connects_total``: connections to the broker (more than one: reconnects).

Read from the registry at each scrape (a few indexed queries): ``edgec_server_devices{status}``
and ``edgec_server_rollouts{state}`` plus ``edgec_server_rollout_wave{rollout,release}`` for
the rollouts that run.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

__all__ = ["CONTENT_TYPE", "ServerMetrics"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
MAX_LABEL_CHARS = 64  # a device-reported label (event kind, step) is clipped to this
MAX_LABEL_VALUES = 64  # distinct values kept per device-reported label; the rest are "other"


class _State(Collector):
    """Devices by status and rollouts by state, read when Prometheus scrapes."""

    def __init__(
        self,
        devices: Callable[[], Iterable[Mapping[str, Any]]],
        rollouts: Callable[[], Iterable[Mapping[str, Any]]],
    ) -> None:
        self.devices = devices
        self.rollouts = rollouts

    def collect(self) -> Iterable[GaugeMetricFamily]:
        by_status: dict[str, int] = {}
        for device in self.devices():
            status = str(device.get("status") or "unknown")[:MAX_LABEL_CHARS]
            by_status[status] = by_status.get(status, 0) + 1
        devices = GaugeMetricFamily("edgec_server_devices", "Registered devices by status", labels=["status"])
        for status, count in sorted(by_status.items()):
            devices.add_metric([status], count)
        yield devices
        rollouts = list(self.rollouts())
        states = GaugeMetricFamily("edgec_server_rollouts", "Rollouts by state", labels=["state"])
        by_state: dict[str, int] = {}
        for rollout in rollouts:
            by_state[str(rollout.get("state"))] = by_state.get(str(rollout.get("state")), 0) + 1
        for state, count in sorted(by_state.items()):
            states.add_metric([state], count)
        yield states
        waves = GaugeMetricFamily(
            "edgec_server_rollout_wave",
            "The wave a running or paused rollout is in",
            labels=["rollout", "release"],
        )
        for rollout in rollouts:
            if rollout.get("state") in ("running", "paused"):
                wave = str(rollout.get("wave", "0")).split("/")[0]
                waves.add_metric([str(rollout["id"]), str(rollout.get("release"))], float(wave or 0))
        yield waves


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.fetch_bytes = Counter(
            "edgec_server_fetch_bytes",
            "Bytes of target files sent to devices",
            ["transport"],
            registry=self.registry,
        )
        self.fetch_chunks = Counter(
            "edgec_server_fetch_chunks",
            "Chunks (MQTT) or responses (HTTP) of target files sent",
            ["transport"],
            registry=self.registry,
        )
        self.reports = Counter(
            "edgec_server_reports", "Device reports taken in", ["kind"], registry=self.registry
        )
        self.dropped = Counter(
            "edgec_server_reports_dropped", "Device reports refused", ["reason"], registry=self.registry
        )
        self.report_lag = Histogram(
            "edgec_server_report_lag_seconds",
            "From a telemetry window's end on the device to the server storing it",
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
            registry=self.registry,
        )
        self.events = Counter(
            "edgec_server_device_events", "Install events devices reported", ["event", "step"],
            registry=self.registry,
        )  # fmt: skip
        self.connects = Counter(
            "edgec_server_mqtt_connects", "Connections to the MQTT broker (more than one: reconnects)",
            registry=self.registry,
        )  # fmt: skip
        self._children: dict[tuple[str, str], Any] = {}
        self._seen: dict[str, set[str]] = {}
        self._lock = threading.Lock()

    def watch(
        self,
        devices: Callable[[], Iterable[Mapping[str, Any]]],
        rollouts: Callable[[], Iterable[Mapping[str, Any]]],
    ) -> None:
        """Read device statuses and rollouts from these at each scrape."""
        self.registry.register(_State(devices, rollouts))

    def render(self) -> bytes:
        """The text exposition format (``CONTENT_TYPE``)."""
        return generate_latest(self.registry)

    # -- counting -------------------------------------------------------------------------------
    def _label(self, name: str, value: object) -> str:
        """A device-reported label value, clipped, and bounded in number (a device cannot
        make the server keep a series per string it sends)."""
        text = str(value if value is not None else "")[:MAX_LABEL_CHARS] or "none"
        with self._lock:
            seen = self._seen.setdefault(name, set())
            if text not in seen:
                if len(seen) >= MAX_LABEL_VALUES:
                    return "other"
                seen.add(text)
        return text

    def fetched(self, transport: str, nbytes: int) -> None:
        self.fetch_bytes.labels(transport).inc(nbytes)
        self.fetch_chunks.labels(transport).inc()

    def report(self, kind: str) -> None:
        self.reports.labels(kind).inc()

    def drop(self, reason: str) -> None:
        self.dropped.labels(self._label("reason", reason)).inc()

    def lag(self, seconds: float) -> None:
        if seconds >= 0:
            self.report_lag.observe(seconds)

    def event(self, event: object, step: object) -> None:
        self.events.labels(self._label("event", event), self._label("step", step)).inc()

    def connected(self) -> None:
        self.connects.inc()
