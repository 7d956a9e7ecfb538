"""Simulated devices: the real agent's install pipeline and reports, a stand-in for its runtime.

``SimFleet`` runs many ``SimulatedDevice`` s in one process so a rollout can be rehearsed at
scale on one machine. Each device is what ``agent.daemon.Agent`` is, less the model runtime:

- its own state folder (``StateStore``, TUF metadata provisioned from the repository's root,
  ``DirectorState`` with the director's key) and its own MQTT client, logged in with its own
  user name and password, subscribed to its desired topic;
- the real ``Installer``: director acceptance, TUF verification, resumable chunked fetch over
  MQTT (``ChunkClient``, ``MqttFetcher``), stage, load, self-test, warm-up, swap, probation,
  commit or roll back; its state (retained) and events go out as the real agent's do;
- a stand-in runtime: the loader reads the staged bundle's ``manifest.json`` and never loads
  the model; ``infer`` takes (sleeps) a latency drawn from the version's behaviour and fails
  at its error rate, and probation judges the drawn latencies against the manifest's budget
  (not the host's scheduling of a thousand sleeps); the self-test passes unless the
  behaviour says ``self_test = "fail"``;
- synthetic telemetry windows every ``window_s`` for the version it serves (``Telemetry``:
  requests, errors, p50/p95/p99 drawn from the behaviour, a drift verdict and PSI per input
  once a window has the requests the real agent needs for one, ``seq`` increasing).

``SimFleet.stop`` is a clean disconnect; an install still running then is left to its
journal and resumes at the next ``start``, as after a crash of the real agent.

Behaviour per model version (``SimBehaviour``), keyed by version, ``"*"`` for every version
(a version's entry overrides the fields it names)::

    ["*"]                      # TOML (or the same as JSON: {"*": {...}, "2.0.0": {...}})
    latency_ms = 5.0           # median latency of one request
    latency_spread = 0.2       # sigma of log(latency): p95 = latency_ms * exp(1.645 * spread)
    requests_per_s = 10.0      # the traffic one device serves (telemetry windows)
    ["2.0.0"]
    latency_ms = 8.0
    error_rate = 0.02          # share of requests that fail
    drift = "warn"             # or psi = 0.18, or input_shift_sd = 0.4 (PSI ~ shift squared)
    ["3.0.0"]
    self_test = "fail"         # or load = "fail"; infer_sleeps = false skips the sleeping

On the command line: ``--behaviour 2.0.0:latency_ms=8,error_rate=0.02,drift=ok`` (``parse``).

Scale: paho's own network loop needs a thread and ``select()`` per client, and ``select()``
stops at file descriptor 1024 (about 340 clients). Here one thread drives every client with
epoll (``_NetworkLoop``); installs run on a bounded pool of workers and queue beyond it; one
thread closes every device's telemetry windows. What is left out: TLS to the broker, the
local inference API, the on-disk telemetry buffer (a window due while the broker is away is
dropped), and traffic feeding probation (golden probes do, as on an idle real device).
"""

from __future__ import annotations

import collections
import contextlib
import datetime as dt
import heapq
import json
import logging
import math
import queue
import random
import selectors
import socket
import threading
import time
import tomllib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import paho.mqtt.client as mqtt
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from securesystemslib.signer import Key, SSlibKey

from agent.config import InstallSettings, TrustSettings
from agent.director import DirectorState
from agent.install import Installer, ProbationMonitor
from agent.mqtt_fetch import SCHEME, ChunkClient, MqttFetcher
from agent.report import MqttReporter
from agent.slot import ModelSlot
from agent.store import StateStore
from agent.telemetry import DriftConfig
from agent.trust import TrustedRepository
from edgec._atomic import atomic_write
from edgec.director import SignedDirectorDocument, parse_signed_document
from edgec.errors import EdgecError, NewerSchemaError, OptionError, TrustError
from edgec.manifest import Manifest, read_manifest
from edgec.reports import DriftVerdict, Telemetry
from edgec.topics import device_topics

__all__ = [
    "FleetSummary",
    "SimBehaviour",
    "SimBehaviours",
    "SimDeviceConfig",
    "SimFleet",
    "SimSettings",
    "SimulatedDevice",
    "device_ids",
]

logger = logging.getLogger(__name__)
_Z95, _Z99 = 1.6449, 2.3263  # standard normal quantiles
_TYPICAL_PSI = {DriftVerdict.OK: 0.02, DriftVerdict.WARN: 0.17, DriftVerdict.DRIFT: 0.5}


# --- behaviour -----------------------------------------------------------------------------
class SimBehaviour(BaseModel):
    """How a simulated device's stand-in runtime behaves with one model version."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    latency_ms: Annotated[float, Field(gt=0)] = 5.0  # median
    latency_spread: Annotated[float, Field(ge=0, le=3)] = 0.2  # sigma of log latency; 0: constant
    error_rate: Annotated[float, Field(ge=0, le=1)] = 0.0
    requests_per_s: Annotated[float, Field(ge=0)] = 10.0
    # drift, one of three ways (none: "ok"): a verdict, a PSI, or an input mean shifted by
    # this many standard deviations (PSI of two unit normals that far apart ~ shift squared)
    drift: DriftVerdict | None = None
    psi: Annotated[float, Field(ge=0)] | None = None
    input_shift_sd: float | None = None
    self_test: Literal["pass", "fail"] = "pass"
    load: Literal["ok", "fail"] = "ok"
    infer_sleeps: bool = True  # false: infer returns at once (probation then sees ~0 ms)

    @model_validator(mode="after")
    def _one_drift(self) -> SimBehaviour:
        given = [name for name in ("drift", "psi", "input_shift_sd") if getattr(self, name) is not None]
        if len(given) > 1:
            raise ValueError(f"give one of drift, psi and input_shift_sd, not {' and '.join(given)}")
        return self

    @property
    def p95_ms(self) -> float:
        return self.latency_ms * math.exp(_Z95 * self.latency_spread)

    @property
    def p99_ms(self) -> float:
        return self.latency_ms * math.exp(_Z99 * self.latency_spread)

    def expected_psi(self) -> float:
        if self.psi is not None:
            return self.psi
        if self.input_shift_sd is not None:
            return self.input_shift_sd**2
        return _TYPICAL_PSI[self.drift or DriftVerdict.OK]

    def latencies_ms(self, rng: np.random.Generator, count: int) -> np.ndarray:
        if not self.latency_spread:
            return np.full(count, self.latency_ms)
        return rng.lognormal(math.log(self.latency_ms), self.latency_spread, count)


_DRIFT_FIELDS = frozenset({"drift", "psi", "input_shift_sd"})


class SimBehaviours:
    """Behaviours per model version; ``"*"`` applies to every version, and a version's own
    entry overrides the fields it names (its drift field replaces any drift field of ``"*"``).
    Everything is validated when built: a bad entry raises ``OptionError`` naming it."""

    ANY = "*"

    def __init__(self, table: Mapping[str, Mapping[str, Any]] | None = None) -> None:
        self._raw = {str(version): dict(fields) for version, fields in (table or {}).items()}
        self._resolved: dict[str, SimBehaviour] = {}
        for version in [self.ANY, *self._raw]:
            self.for_version(version)

    @classmethod
    def load(cls, path: Path) -> SimBehaviours:
        """A TOML or JSON file of ``{version: {field: value}}``."""
        try:
            text = path.read_text(encoding="utf-8")
            raw = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
        except OSError as e:
            raise OptionError(f"cannot read the behaviour file {path}: {e.strerror}") from e
        except (ValueError, tomllib.TOMLDecodeError) as e:
            raise OptionError(
                f"{path} is not valid {'JSON' if path.suffix == '.json' else 'TOML'}: {e}"
            ) from e
        if not isinstance(raw, dict) or not all(isinstance(v, dict) for v in raw.values()):
            raise OptionError(f'{path}: expected a table per model version, e.g. ["2.0.0"] latency_ms = 8')
        return cls(raw)

    @classmethod
    def parse(cls, specs: Iterable[str], base: SimBehaviours | None = None) -> SimBehaviours:
        """``VERSION:field=value,field=value`` specs (``*`` for every version), over ``base``."""
        table = {version: dict(fields) for version, fields in (base._raw if base else {}).items()}
        for spec in specs:
            version, sep, assignments = spec.partition(":")
            if not sep or not version or not assignments:
                raise OptionError(
                    f"bad behaviour {spec!r}: expected VERSION:field=value,... "
                    "(e.g. 2.0.0:latency_ms=8,error_rate=0.02)"
                )
            fields = table.setdefault(version, {})
            for assignment in assignments.split(","):
                name, eq, value = (part.strip() for part in assignment.partition("="))
                if not eq or not name or not value:
                    raise OptionError(f"bad behaviour {spec!r}: {assignment!r} is not field=value")
                if name in _DRIFT_FIELDS:  # a later drift setting replaces an earlier one
                    for other in _DRIFT_FIELDS:
                        fields.pop(other, None)
                fields[name] = value
        return cls(table)

    def for_version(self, version: str) -> SimBehaviour:
        cached = self._resolved.get(version)
        if cached is not None:
            return cached
        fields = dict(self._raw.get(self.ANY, {}))
        own = self._raw.get(version, {}) if version != self.ANY else {}
        if _DRIFT_FIELDS & own.keys():
            for name in _DRIFT_FIELDS:
                fields.pop(name, None)
        fields.update(own)
        try:
            behaviour = SimBehaviour.model_validate(fields)
        except ValidationError as e:
            first = e.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "behaviour"
            raise OptionError(f"behaviour for version {version}: {where}: {first['msg']}") from e
        self._resolved[version] = behaviour
        return behaviour

    def describe(self) -> list[str]:
        """One line per configured version, as the fleet will use them."""
        lines = []
        for version in [self.ANY, *(v for v in self._raw if v != self.ANY)]:
            b = self.for_version(version)
            drift = f"psi {b.expected_psi():.3g}" if b.drift is None else f"drift {b.drift.value}"
            lines.append(
                f"{version}: latency {b.latency_ms:g} ms (p95 {b.p95_ms:.3g}), errors {b.error_rate:.2%}, "
                f"{b.requests_per_s:g} req/s, {drift}, self-test {b.self_test}, load {b.load}"
            )
        return lines


# --- the runtime stand-in --------------------------------------------------------------------
class SimulatedFailure(EdgecError, RuntimeError):
    """A failure the behaviour asked for (a request's error, a load that fails)."""


class SimModel:
    """A ``LoadedModel`` that never loads the model: latency and errors from the behaviour."""

    __slots__ = ("behaviour", "last_latency_s", "manifest")

    def __init__(self, manifest: Manifest, behaviour: SimBehaviour) -> None:
        self.manifest = manifest
        self.behaviour = behaviour
        self.last_latency_s: float | None = None  # what the latest request drew

    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        b = self.behaviour
        latency_s = random.lognormvariate(math.log(b.latency_ms), b.latency_spread) / 1e3
        self.last_latency_s = latency_s
        if b.infer_sleeps:
            time.sleep(latency_s)
        if b.error_rate and random.random() < b.error_rate:
            raise SimulatedFailure(f"simulated error ({b.error_rate:.1%} of requests)")
        return {}

    def close(self) -> None:
        pass


class _SimProbation(ProbationMonitor):
    """Probation judges the latency the stand-in drew, not the wall time around the call: with
    a thousand devices on two cores a 5 ms sleep can take 60 ms to come back, which is the
    host's load, not the model's (the error rate and the budget are judged as on a device)."""

    def __init__(self, slot: ModelSlot) -> None:
        super().__init__()
        self._slot = slot

    def record(self, version: str, latency_s: float, ok: bool) -> None:
        model = self._slot.model
        if isinstance(model, SimModel) and model.manifest.version == version and model.last_latency_s:
            latency_s = model.last_latency_s
        super().record(version, latency_s, ok)


@dataclass(frozen=True)
class SimSelfTest:
    passed: bool
    reason: str | None = None


def _sim_self_test(model: SimModel, _golden: Path) -> SimSelfTest:
    if model.behaviour.self_test == "fail":
        version = model.manifest.version
        return SimSelfTest(False, f"simulated self-test failure (behaviour self_test=fail for {version})")
    return SimSelfTest(True)


def _sim_golden_inputs(_model: SimModel, _golden: Path) -> list[dict[str, np.ndarray]]:
    return [{}]


# --- one thread drives every MQTT client -----------------------------------------------------
@dataclass(eq=False)
class _Link:
    client: mqtt.Client
    name: str
    delay_s: float = 1.0  # the next reconnect's backoff
    waiting: bool = False  # in the connect queue


class _NetworkLoop:
    """paho clients driven from one thread with epoll, through paho's external-loop API
    (``loop_read``, ``loop_write``, ``loop_misc``, the socket callbacks). Other threads only
    publish: paho queues the packet and calls back for write interest, which this loop
    applies. Connections open at most ``connects_per_s``, and reopen with backoff."""

    SWEEP_S = 0.5  # keepalive pings, write interest, lost connections

    def __init__(self, connects_per_s: float, reconnect_max_s: float) -> None:
        self.connects_per_s = connects_per_s
        self.reconnect_max_s = reconnect_max_s
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._selector_lock = threading.Lock()
        self._links: list[_Link] = []
        self._by_client: dict[mqtt.Client, _Link] = {}
        self._due: list[tuple[float, int, _Link]] = []  # (when, tie-break, link): connects to make
        self._dirty: set[mqtt.Client] = set()
        self._dirty_lock = threading.Lock()
        self._closing = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._counter = 0

    def add(self, client: mqtt.Client, name: str) -> None:
        """Before ``start``; the client has had ``connect_async``."""
        client.on_socket_close = self._on_socket_close
        client.on_socket_register_write = self._on_write_interest
        client.on_socket_unregister_write = self._on_write_interest
        link = _Link(client, name)
        self._links.append(link)
        self._by_client[client] = link
        self._queue_connect(link, time.monotonic())

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="sim-mqtt", daemon=True)
        self._thread.start()

    def close(self, timeout_s: float = 5.0) -> None:
        """Disconnect every client (their DISCONNECTs go out), then stop."""
        self._closing = True
        for link in self._links:
            if link.client.socket() is not None:
                link.client.disconnect()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and any(link.client.socket() for link in self._links):
            time.sleep(0.05)
        self._stop.set()
        self._wake()
        if self._thread is not None:
            self._thread.join(timeout=5)
        for link in self._links:  # the ones that did not finish in time
            sock = link.client.socket()
            if sock is not None:
                self._forget(sock)
                with contextlib.suppress(OSError):
                    sock.close()
        self._selector.close()
        self._wake_r.close()
        self._wake_w.close()

    # -- paho's callbacks (any thread) ---------------------------------------------------------
    def _on_write_interest(self, client: mqtt.Client, _userdata: Any, _sock: Any) -> None:
        with self._dirty_lock:
            self._dirty.add(client)
        if threading.current_thread() is not self._thread:
            self._wake()

    def _on_socket_close(self, _client: mqtt.Client, _userdata: Any, sock: Any) -> None:
        self._forget(sock)

    def _wake(self) -> None:
        with contextlib.suppress(OSError):  # full: a wake-up is pending anyway
            self._wake_w.send(b"\0")

    def _forget(self, sock: Any) -> None:
        with self._selector_lock, contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(sock)

    # -- the loop -------------------------------------------------------------------------------
    def _run(self) -> None:
        next_sweep = time.monotonic()
        tokens, last = 0.0, time.monotonic()
        while not self._stop.is_set():
            now = time.monotonic()
            tokens = min(tokens + (now - last) * self.connects_per_s, max(self.connects_per_s / 10, 1.0))
            last = now
            while self._due and self._due[0][0] <= now and tokens >= 1 and not self._closing:
                _, _, link = heapq.heappop(self._due)
                link.waiting = False
                tokens -= 1
                self._connect(link, now)
            if now >= next_sweep:
                self._sweep(now)
                next_sweep = now + self.SWEEP_S
            timeout = next_sweep - now
            if self._due and not self._closing:
                timeout = min(timeout, max(self._due[0][0] - now, 1 / self.connects_per_s))
            for key, mask in self._selector.select(max(timeout, 0.0)):
                link = key.data
                if link is None:
                    with contextlib.suppress(OSError):
                        self._wake_r.recv(4096)
                    continue
                client = link.client
                try:
                    if mask & selectors.EVENT_READ:
                        client.loop_read()
                    if mask & selectors.EVENT_WRITE and client.socket() is not None:
                        client.loop_write()
                except Exception:  # one client's trouble must not stop the others
                    logger.exception("the MQTT client of %s failed", link.name)
            with self._dirty_lock:
                dirty, self._dirty = self._dirty, set()
            for client in dirty:
                self._watch(client)

    def _sweep(self, now: float) -> None:
        for link in self._links:
            client = link.client
            if client.socket() is None:
                if not link.waiting and not self._closing:
                    self._queue_connect(link, now + link.delay_s * random.uniform(0.5, 1.0))
                    link.delay_s = min(link.delay_s * 2, self.reconnect_max_s)
                continue
            if client.is_connected():
                link.delay_s = 1.0
            client.loop_misc()
            self._watch(client)

    def _queue_connect(self, link: _Link, when: float) -> None:
        self._counter += 1
        link.waiting = True
        heapq.heappush(self._due, (when, self._counter, link))

    def _connect(self, link: _Link, now: float) -> None:
        try:
            link.client.reconnect()  # a socket; the CONNECT packet is queued
        except OSError as e:
            logger.debug("cannot connect %s: %s", link.name, e)
            self._queue_connect(link, now + link.delay_s * random.uniform(0.5, 1.0))
            link.delay_s = min(link.delay_s * 2, self.reconnect_max_s)
            return
        self._watch(link.client)

    def _watch(self, client: mqtt.Client) -> None:
        """Select the client's socket for reading, and for writing while it has bytes to send."""
        sock = client.socket()
        if sock is None:
            return
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if client.want_write() else 0)
        with self._selector_lock:
            try:
                key = self._selector.get_key(sock)
            except KeyError:
                self._selector.register(sock, events, self._by_client[client])
                return
            if key.events != events:
                self._selector.modify(sock, events, key.data)


# --- a simulated device ----------------------------------------------------------------------
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
    install_workers: Annotated[int, Field(ge=1)] = 16  # installs at once; the rest queue
    install: InstallSettings = InstallSettings(probation_s=1.0, probation_min_requests=5, warmup_runs=1)
    seed: int | None = None  # telemetry noise


class _SimReporter(MqttReporter):
    """The real agent's reports, and the fleet's tally of them."""

    def __init__(self, device: SimulatedDevice) -> None:
        super().__init__(device.client, device.topics, max_waiting=100)
        self.device = device

    def event(self, kind: str, release: str | None, detail: str | None = None, **figures: Any) -> None:
        self.device.tally.event(self.device, kind)
        super().event(kind, release, detail, **figures)

    def state(self, status: str, installed: str | None, detail: str | None = None) -> None:
        self.device.tally.state(self.device, status, installed)
        super().state(status, installed, detail)


def _iso(seconds: float) -> str:
    return dt.datetime.fromtimestamp(seconds, dt.UTC).isoformat(timespec="milliseconds")


class SimulatedDevice:
    """One device: a real MQTT client and the real install pipeline, a stand-in runtime."""

    def __init__(
        self,
        config: SimDeviceConfig,
        *,
        settings: SimSettings,
        trust_root: str,
        director_key: Key,
        behaviours: SimBehaviours,
        submit: Callable[[SimulatedDevice], None],
        tally: _Tally,
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
        self.store = StateStore(config.state_dir)
        if not (config.state_dir / "metadata" / "root.json").exists():
            TrustedRepository.provision(config.state_dir, trust_root.encode())
        self.client = self._mqtt_client()
        self.reporter = _SimReporter(self)
        self.chunk_client = ChunkClient(
            self.client, config.fleet, config.device, timeout_s=settings.install.chunk_timeout_s
        )
        repository = TrustedRepository(
            config.state_dir, MqttFetcher(self.chunk_client), settings.install.max_target_bytes, SCHEME
        )
        self.startup_problem: str | None = None
        director: DirectorState | None = None
        try:
            director = DirectorState.load(
                config.state_dir / "director.json", director_key, config.device, config.profile
            )
        except TrustError as e:
            self.startup_problem = str(e)
        self.slot = ModelSlot()
        self.installer = Installer(
            settings=settings.install,
            store=self.store,
            slot=self.slot,
            director=director,
            repository=repository,
            chunks=self.chunk_client,
            reporter=self.reporter,
            loader=self._load,
            self_test=_sim_self_test,
            golden_inputs=_sim_golden_inputs,
            probation=_SimProbation(self.slot),
        )
        self._lock = threading.Lock()
        self._desired: SignedDirectorDocument | None = None
        self._queued = False
        self._resume = self.store.journal() is not None
        self._seq_path = config.state_dir / "sim-telemetry.json"
        self._seq = self._read_seq()
        self._window_started = time.time()

    # -- MQTT ---------------------------------------------------------------------------------
    def _mqtt_client(self) -> mqtt.Client:
        client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=f"edgec-sim-{self.id}",
            clean_session=True,
            protocol=mqtt.MQTTv311,
        )
        client.username_pw_set(self.id, self.config.password)
        offline = json.dumps({"status": "offline", "installed": None})
        client.will_set(self.topics["state"], offline, qos=1, retain=True)
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
        if not message.payload:
            return
        try:
            envelope = parse_signed_document(message.payload)  # bounded, every name checked
        except TrustError as e:
            release = e.release if isinstance(e, NewerSchemaError) else None  # settles its rollout
            self.reporter.event("refused", release, str(e), step="accept")
            return
        with self._lock:
            self._desired = envelope  # the newest wins
            self.installer.interrupted.set()
            self._schedule()

    # -- installs (on the fleet's worker pool) ---------------------------------------------------
    def _schedule(self) -> None:
        """With the lock held: queue this device for a worker unless it is queued already."""
        if not self._queued:
            self._queued = True
            self._submit(self)

    def start(self) -> None:
        """Serve the committed model (the manifest's stand-in); queue an interrupted install."""
        self.installer.start_serving()
        if self.startup_problem:
            self.reporter.event("error", None, self.startup_problem)
        if self._resume:
            with self._lock:
                self._schedule()

    def install_turn(self) -> None:
        """Run on a worker: resume an interrupted install, then the newest document, until none."""
        if self._resume:
            self._resume = False
            try:
                self.installer.resume()
            except Exception:
                logger.exception("%s: resuming the interrupted install failed", self.id)
        while True:
            with self._lock:
                envelope, self._desired = self._desired, None
                if envelope is None:
                    self._queued = False
                    return
            try:
                self.installer.handle(envelope)
            except Exception as e:  # disk full, permissions: report, keep serving
                logger.exception("%s: install failed", self.id)
                self.reporter.event("error", envelope.signed.release, f"{type(e).__name__}: {e}")

    def _load(self, folder: Path) -> SimModel:
        manifest = read_manifest(folder)
        behaviour = self.behaviours.for_version(manifest.version)
        if behaviour.load == "fail":
            raise SimulatedFailure(f"simulated load failure (behaviour load=fail for {manifest.version})")
        return SimModel(manifest, behaviour)

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
            p50, p95, p99 = (
                float(v) for v in np.percentile(b.latencies_ms(rng, min(ok, 4096)), [50, 95, 99])
            )
        drift_config = DriftConfig()
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
        payload = json.dumps(window.model_dump(mode="json", exclude_none=True))
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


# --- the fleet ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class FleetSummary:
    devices: int
    connected: int
    installed: dict[str, int]  # committed release NAME:VERSION ("-": none yet) -> devices
    statuses: dict[str, int]  # last reported status -> devices
    events: dict[str, int]  # events since start, by kind (committed, refused, retrying, ...)
    failed: int  # devices whose latest install ended refused (or with an error)
    installs_waiting: int  # devices queued for, or in, an install
    broker_refusals: int  # connections the broker refused (credentials it does not know?)

    def line(self) -> str:
        installed = ", ".join(f"{release} {n}" for release, n in sorted(self.installed.items())) or "-"
        events = " ".join(
            f"{kind} {self.events.get(kind, 0)}" for kind in ("committed", "refused", "retrying")
        )
        text = (
            f"connected {self.connected}/{self.devices} | installed: {installed} | "
            f"installing {self.installs_waiting} | {events} | failed {self.failed}"
        )
        if self.broker_refusals:
            text += f" | broker refused {self.broker_refusals} logins"
        return text


class _Tally:
    """What the devices report, counted as it happens (summaries and waits cost nothing)."""

    def __init__(self, count: int) -> None:
        self._changed = threading.Condition()
        self.devices = count
        self._connected = [False] * count
        self._installed: list[str | None] = [None] * count
        self._status: list[str] = ["new"] * count
        self._failed = [False] * count
        self.installed = collections.Counter({"-": count})
        self.events: collections.Counter[str] = collections.Counter()
        self.connected_count = 0
        self.broker_refusals = 0
        self.last_refusal: str | None = None

    def connected(self, device: SimulatedDevice, up: bool) -> None:
        with self._changed:
            if self._connected[device.index] != up:
                self._connected[device.index] = up
                self.connected_count += 1 if up else -1
                self._changed.notify_all()

    def refused(self, _device: SimulatedDevice, reason: str) -> None:
        with self._changed:
            self.broker_refusals += 1
            self.last_refusal = reason

    def state(self, device: SimulatedDevice, status: str, installed: str | None) -> None:
        with self._changed:
            old = self._installed[device.index]
            if old != installed:
                self.installed[old or "-"] -= 1
                self.installed[installed or "-"] += 1
                self._installed[device.index] = installed
            self._status[device.index] = status
            self._changed.notify_all()

    def event(self, device: SimulatedDevice, kind: str) -> None:
        with self._changed:
            self.events[kind] += 1
            if kind == "committed":
                self._failed[device.index] = False
            elif kind in ("refused", "error"):
                self._failed[device.index] = True
            self._changed.notify_all()

    def wait(self, predicate: Callable[[], bool], timeout_s: float) -> bool:
        with self._changed:
            return self._changed.wait_for(predicate, timeout_s)

    def summary(self, installs_waiting: int) -> FleetSummary:
        with self._changed:
            return FleetSummary(
                devices=self.devices,
                connected=self.connected_count,
                installed={k: v for k, v in self.installed.items() if v},
                statuses=dict(collections.Counter(self._status)),
                events=dict(self.events),
                failed=sum(self._failed),
                installs_waiting=installs_waiting,
                broker_refusals=self.broker_refusals,
            )


class SimFleet:
    """Many simulated devices in one process: one network thread, a bounded install pool, one
    telemetry thread. ``start``, then ``summary`` or the ``wait_*`` methods, then ``stop``."""

    def __init__(
        self,
        devices: Sequence[SimDeviceConfig],
        *,
        trust: TrustSettings,
        behaviours: SimBehaviours | None = None,
        settings: SimSettings | None = None,
    ) -> None:
        self.settings = settings or SimSettings()
        self.behaviours = behaviours or SimBehaviours()
        key_data = json.loads(trust.director_key)
        director_key = SSlibKey.from_dict(key_data.pop("keyid"), key_data)  # one, shared by all
        self._tally = _Tally(len(devices))
        self._work: queue.SimpleQueue[SimulatedDevice | None] = queue.SimpleQueue()
        self._waiting = 0
        self._waiting_lock = threading.Lock()
        self.devices = [
            SimulatedDevice(
                config,
                settings=self.settings,
                trust_root=trust.root,
                director_key=director_key,
                behaviours=self.behaviours,
                submit=self._submit,
                tally=self._tally,
                index=index,
            )
            for index, config in enumerate(devices)
        ]
        self._network = _NetworkLoop(self.settings.connects_per_s, self.settings.reconnect_max_s)
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._started = False

    def __enter__(self) -> SimFleet:
        self.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    def start(self) -> None:
        if self._started:
            return
        self._started = True
        for _ in range(self.settings.install_workers):
            self._spawn(self._install_worker, "sim-install")
        for device in self.devices:
            device.start()
            self._network.add(device.client, device.id)
        self._network.start()
        self._spawn(self._telemetry_loop, "sim-telemetry")

    def stop(self, timeout_s: float = 10.0) -> None:
        """Like pulling the plug, politely: installs not done within ``timeout_s`` are left to
        their journal (the next ``start`` resumes them) rather than refused; the devices then
        disconnect cleanly (their retained state stays as last reported)."""
        if not self._started or self._stopping.is_set():
            return
        self._stopping.set()
        for _ in self._threads:
            self._work.put(None)
        deadline = time.monotonic() + timeout_s
        for thread in self._threads:
            thread.join(timeout=max(deadline - time.monotonic(), 0.0))
        self._network.close()
        for device in self.devices:
            device.save_seq()

    def summary(self) -> FleetSummary:
        return self._tally.summary(self._waiting)

    def wait_connected(self, count: int | None = None, timeout_s: float = 60.0) -> bool:
        want = len(self.devices) if count is None else count
        return self._tally.wait(lambda: self._tally.connected_count >= want, timeout_s)

    def wait_for_release(self, release: str, count: int | None = None, timeout_s: float = 60.0) -> bool:
        """Until ``count`` devices (default: all) report ``release`` (NAME:VERSION) installed."""
        want = len(self.devices) if count is None else count
        return self._tally.wait(lambda: self._tally.installed[release] >= want, timeout_s)

    def wait_for_events(self, kind: str, count: int, timeout_s: float = 60.0) -> bool:
        """Until ``count`` events of ``kind`` have been reported since start."""
        return self._tally.wait(lambda: self._tally.events[kind] >= count, timeout_s)

    def wait_until(self, predicate: Callable[[FleetSummary], bool], timeout_s: float = 60.0) -> bool:
        """Until ``predicate(summary)`` holds (checked on every report; for tests and tools)."""
        return self._tally.wait(lambda: predicate(self.summary()), timeout_s)

    # -- threads --------------------------------------------------------------------------------
    def _spawn(self, target: Callable[[], None], name: str) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        self._threads.append(thread)
        thread.start()

    def _submit(self, device: SimulatedDevice) -> None:
        with self._waiting_lock:
            self._waiting += 1
        self._work.put(device)

    def _install_worker(self) -> None:
        while (device := self._work.get()) is not None:
            try:
                if not self._stopping.is_set():
                    device.install_turn()
            finally:
                with self._waiting_lock:
                    self._waiting -= 1

    def _telemetry_loop(self) -> None:
        """Every device closes a window every ``window_s``, their phases spread over it."""
        rng = np.random.default_rng(self.settings.seed)
        window_s = self.settings.window_s
        start = time.monotonic()
        count = len(self.devices)
        due = [(start + window_s * (1 + i / count), i) for i in range(count)]  # phases spread out
        while due and not self._stopping.is_set():
            when, index = due[0]
            wait = when - time.monotonic()
            if wait > 0:
                self._stopping.wait(min(wait, 1.0))
                continue
            heapq.heapreplace(due, (when + window_s, index))
            try:
                self.devices[index].send_window(rng)
            except Exception:  # a window lost, the loop goes on
                logger.exception("telemetry of %s failed", self.devices[index].id)


def device_ids(prefix: str, count: int) -> list[str]:
    """``prefix0001`` .. : the ids ``edgec sim fleet`` gives its devices."""
    width = max(4, len(str(count)))
    return [f"{prefix}{n:0{width}d}" for n in range(1, count + 1)]
