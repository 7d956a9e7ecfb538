"""A simulated device: a real MQTT client and the agent's device core (``agent.device``),
with the stand-in runtime (``sim.runtime``) and synthetic telemetry windows."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import numpy as np
import paho.mqtt.client as mqtt
from pydantic import BaseModel, ConfigDict, Field
from securesystemslib.signer import Key

from agent.config import InstallSettings
from agent.device import DeviceCore, DeviceIdentity
from agent.mqtt_fetch import ChunkClient, MqttFetcher
from agent.report import MqttReporter, offline_state
from agent.telemetry import DriftConfig
from edgec._atomic import atomic_write
from edgec.reports import DeviceStatus, EventKind, Telemetry
from edgec.topics import device_topics
from sim._network import BufferedClient
from sim.behaviour import SimBehaviours
from sim.runtime import sim_runtime

if TYPE_CHECKING:
    from sim._tally import Tally

__all__ = ["SimDeviceConfig", "SimSettings", "SimulatedDevice"]

logger = logging.getLogger(__name__)
_DRIFT = DriftConfig()  # the real agent's drift defaults (min samples, verdict thresholds)


@dataclass(frozen=True)
class SimDeviceConfig:
    device: str  # also its MQTT user name
    password: str
    state_dir: Path
    fleet: str
    profile: str


class SimSettings(BaseModel):
    """What every device of a simulated fleet shares."""

    model_config = ConfigDict(extra="forbid")

    host: str = "127.0.0.1"
    port: int = 1883
    keepalive_s: Annotated[int, Field(ge=5)] = 30
    reconnect_max_s: Annotated[float, Field(gt=0)] = 30.0
    connects_per_s: Annotated[float, Field(gt=0)] = 500.0
    window_s: Annotated[float, Field(gt=0)] = 5.0
    install_workers: Annotated[int, Field(ge=1)] = 64  # installs at once (each holds one through probation)
    install: InstallSettings = InstallSettings(probation_s=1.0, probation_min_requests=5, warmup_runs=1)
    seed: int | None = None  # telemetry noise


class _SimReporter(MqttReporter):
    """The real agent's reports, and the fleet's tally of them."""

    def __init__(self, device: SimulatedDevice) -> None:
        super().__init__(device.client, device.topics, max_waiting=100)
        self.device = device

    def event(self, kind: EventKind, release: str | None, detail: str | None = None, **figures: Any) -> None:
        self.device.tally.event(self.device, kind)
        super().event(kind, release, detail, **figures)

    def state(self, status: DeviceStatus, installed: str | None, detail: str | None = None) -> None:
        self.device.tally.state(self.device, status, installed)
        super().state(status, installed, detail)


def _percentiles(sample: np.ndarray, qs: tuple[float, ...]) -> tuple[float, ...]:
    """``np.percentile(sample, qs)`` (its default, linear interpolation) for a small sample,
    at a fraction of its cost: one sort, then the two neighbours of each rank."""
    ordered = np.sort(sample).tolist()
    last = len(ordered) - 1
    values = []
    for q in qs:
        rank = q / 100 * last
        low = int(rank)
        high = min(low + 1, last)
        values.append(ordered[low] + (ordered[high] - ordered[low]) * (rank - low))
    return tuple(values)


def _iso(seconds: float) -> str:
    return dt.datetime.fromtimestamp(seconds, dt.UTC).isoformat(timespec="milliseconds")


class SimulatedDevice:
    """One device: a real MQTT client and the agent's device core, a stand-in runtime."""

    def __init__(
        self,
        config: SimDeviceConfig,
        *,
        settings: SimSettings,
        trust_root: str,
        director_key: Key,
        behaviours: SimBehaviours,
        submit: Callable[[SimulatedDevice], None],
        tally: Tally,
        index: int = 0,
    ) -> None:
        self.config = config
        self.id = config.device
        self.index = index
        self.settings = settings
        self.behaviours = behaviours
        self.tally = tally
        self._submit = submit
        self.topics = device_topics(config.fleet, config.device)
        self.client = self._mqtt_client()
        self.reporter = _SimReporter(self)
        self.chunk_client = ChunkClient(
            self.client, config.fleet, config.device, timeout_s=settings.install.chunk_timeout_s
        )
        self.core = DeviceCore(
            config.state_dir,
            DeviceIdentity(config.device, config.profile, trust_root, director_key),
            settings=settings.install,
            fetcher=MqttFetcher(self.chunk_client),
            chunks=self.chunk_client,
            reporter=self.reporter,
            runtime=sim_runtime(behaviours),
            on_work=self._schedule,
        )
        self.store = self.core.store
        self.slot = self.core.slot
        self.installer = self.core.installer
        self._queued = False  # guarded by core.work
        self._resume = self.store.journal() is not None
        self._seq_path = config.state_dir / "sim-telemetry.json"
        self._seq = self._read_seq()
        self._window_started = time.time()

    @property
    def startup_problem(self) -> str | None:
        return self.core.startup_problem

    # -- MQTT ---------------------------------------------------------------------------------
    def _mqtt_client(self) -> mqtt.Client:
        client = BufferedClient(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=f"edgec-sim-{self.id}",
            clean_session=True,
            protocol=mqtt.MQTTv311,
        )
        client.username_pw_set(self.id, self.config.password)
        client.will_set(self.topics["state"], offline_state(), qos=1, retain=True)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.message_callback_add(self.topics["desired"], self._on_desired)
        client.connect_async(self.settings.host, self.settings.port, self.settings.keepalive_s)
        return client

    def _on_connect(self, _c: Any, _u: Any, _flags: Any, reason: Any, _props: Any = None) -> None:
        if reason.is_failure:
            logger.debug("the broker refused %s: %s", self.id, reason)
            self.tally.refused(self, str(reason))
            return
        self.client.subscribe(self.topics["desired"], qos=1)
        self.chunk_client.subscribe()
        self.reporter.connected()
        self.tally.connected(self, True)

    def _on_disconnect(self, _c: Any, _u: Any, _flags: Any, reason: Any, _props: Any = None) -> None:
        self.tally.connected(self, False)

    def _on_desired(self, _c: Any, _u: Any, message: mqtt.MQTTMessage) -> None:
        self.core.on_desired(message.payload)

    # -- installs (on the fleet's worker pool) ---------------------------------------------------
    def _schedule(self) -> None:
        """Under ``core.work``: queue this device for a worker unless it is queued already."""
        if not self._queued:
            self._queued = True
            self._submit(self)

    def start(self) -> None:
        """Serve the committed model (the manifest's stand-in); queue an interrupted install."""
        self.core.start()
        if self._resume:
            with self.core.work:
                self._schedule()

    def install_turn(self) -> None:
        """Run on a worker: resume an interrupted install, then the newest document, until none."""
        if self._resume:
            self._resume = False
            self.core.resume()
        while True:
            with self.core.work:
                envelope = self.core.take_desired()
                if envelope is None:
                    self._queued = False
                    return
            self.core.install(envelope)

    # -- telemetry --------------------------------------------------------------------------------
    def close_window(self, rng: np.random.Generator, now: float | None = None) -> Telemetry | None:
        """A synthetic window since the last one, for the model serving now (None: no model)."""
        now = time.time() if now is None else now
        started, self._window_started = self._window_started, now
        model = self.slot.model
        if model is None:
            return None
        m = model.manifest
        b = self.behaviours.for_version(m.version)
        elapsed = max(now - started, 1e-3)
        requests = int(rng.poisson(b.requests_per_s * elapsed))
        errors = int(rng.binomial(requests, b.error_rate)) if requests else 0
        ok = requests - errors
        p50 = p95 = p99 = None
        if ok:
            p50, p95, p99 = _percentiles(b.latencies_ms(rng, min(ok, 4096)), (50, 95, 99))
        drift_config = _DRIFT
        psi: dict[str, float] = {}
        verdict = None
        if ok >= drift_config.min_samples:  # as the real agent: no verdict from a handful of requests
            expected = b.expected_psi()
            psi = {t.name: round(expected * float(rng.lognormal(0, 0.05)), 5) for t in m.inputs}
            verdict = drift_config.verdict(max(psi.values(), default=0.0)).value
        window = Telemetry(
            seq=self._seq,
            model=f"{m.name}:{m.version}",
            started_at=_iso(started),
            ended_at=_iso(now),
            window_s=round(elapsed, 3),
            requests=requests,
            errors=errors,
            p50_ms=None if p50 is None else round(p50, 3),
            p95_ms=None if p95 is None else round(p95, 3),
            p99_ms=None if p99 is None else round(p99, 3),
            drift=verdict,
            psi=psi,
        )
        self._seq += 1
        return window

    def send_window(self, rng: np.random.Generator) -> bool:
        """Close a window and publish it (dropped while the broker is away)."""
        window = self.close_window(rng)
        if window is None or not self.client.is_connected():
            return False
        payload = window.model_dump_json(exclude_none=True)  # the same JSON, compact, 10x cheaper
        return self.client.publish(self.topics["telemetry"], payload, qos=1).rc == mqtt.MQTT_ERR_SUCCESS

    def _read_seq(self) -> int:
        try:
            return int(json.loads(self._seq_path.read_text(encoding="utf-8"))["next_seq"])
        except (OSError, ValueError, KeyError, TypeError):
            return 0

    def save_seq(self) -> None:
        """Keep window numbers increasing across runs (written once, at stop)."""
        with contextlib.suppress(OSError):
            atomic_write(self._seq_path, json.dumps({"next_seq": self._seq}).encode())
