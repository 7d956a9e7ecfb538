"""``edgec agent run``: the on-device daemon.

One MQTT connection (reconnecting with backoff) carries everything: the retained director
document arrives on the desired topic, fetches go over the fetch topics, and the agent
publishes its retained state, install events and telemetry windows. Threads:

- paho's network loop (callbacks only hand work over);
- the installer: takes the newest desired document and runs the install pipeline;
- telemetry: closes a window every ``window_s``, buffers it on disk, publishes the buffer
  oldest first whenever the broker is there;
- the local inference API (``agent.serving``), which hands every answered request to the
  shadow tap (``agent.shadow``): a candidate in shadow runs its share in a thread of its own.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
from tuf.ngclient import FetcherInterface

from agent._shadow_api import ShadowControl
from agent.config import AgentConfig
from agent.device import DeviceCore, DeviceIdentity, Runtime, parse_director_key
from agent.metrics import AgentMetrics
from agent.mqtt_fetch import SCHEME, ChunkClient, ChunkSource, HttpChunks, MqttFetcher, Throttled
from agent.report import MqttReporter, offline_state
from agent.runtime import golden_samples, load_bundle, self_test
from agent.serving import InferenceServer
from agent.slot import LoadedModel
from agent.telemetry import TelemetryBuffer, WindowRecorder
from edgec._service import run_until_signalled
from edgec.topics import device_topics

__all__ = ["Agent", "real_runtime"]

logger = logging.getLogger(__name__)


def real_runtime(threads: int, metrics: AgentMetrics | None = None) -> Runtime:
    """The runtime a device runs: the bundle's own runtime, its self-test on golden.npz (and
    each load timed into ``metrics``)."""

    def load(folder: Path) -> LoadedModel:
        return load_bundle(folder, threads=threads)

    return Runtime(
        load=load if metrics is None else metrics.timed_load(load),
        self_test=self_test,
        golden_inputs=lambda model, path: golden_samples(model, path)[0],
    )


class Agent:
    def __init__(self, config: AgentConfig) -> None:
        assert config.trust is not None  # load_config insists
        self.config = config
        self.topics = device_topics(config.fleet, config.device)
        self.client = self._mqtt_client()
        self.reporter = MqttReporter(self.client, self.topics)
        self.metrics = AgentMetrics() if config.metrics.enabled else None  # /metrics on the v2 port
        chunks: ChunkSource
        fetcher: FetcherInterface
        url_prefix = SCHEME
        if config.install.transport == "http":
            from tuf.ngclient import Urllib3Fetcher

            assert config.install.http_url is not None
            chunks = HttpChunks(config.install.http_url, timeout_s=config.install.chunk_timeout_s)
            fetcher = Urllib3Fetcher()
            url_prefix = config.install.http_url.rstrip("/") + "/"
        else:
            self.chunk_client = ChunkClient(
                self.client, config.fleet, config.device, timeout_s=config.install.chunk_timeout_s
            )
            chunks = self.chunk_client
            fetcher = MqttFetcher(self.chunk_client)
        if config.install.max_fetch_bytes_per_s:
            chunks = Throttled(chunks, config.install.max_fetch_bytes_per_s)
        self.core = DeviceCore(
            config.state_dir,
            DeviceIdentity(
                config.device,
                config.profile,
                config.trust.root,
                parse_director_key(config.trust.director_key),
            ),
            settings=config.install,
            fetcher=fetcher,
            chunks=chunks,
            reporter=self.metrics.reporting(self.reporter) if self.metrics else self.reporter,
            runtime=real_runtime(config.threads, self.metrics),
            url_prefix=url_prefix,
        )
        self.store = self.core.store
        self.slot = self.core.slot
        self.probation = self.core.probation
        self.installer = self.core.installer
        self.buffer = TelemetryBuffer(self.store.telemetry, config.telemetry.buffer_max_windows)
        self.recorder = WindowRecorder(window_s=config.telemetry.window_s, first_seq=self.buffer.next_seq)
        self.shadow = self.core.shadow  # a candidate in shadow takes its share of the served requests
        self.server = InferenceServer(
            self.slot,
            config.http.host,
            config.http.port,
            on_request=self._on_request,
            on_infer=self.shadow.offer,
            limits=config.http.limits,
            metrics=self.metrics,
            shadow=ShadowControl(  # POST /v2/shadow: a field test by hand
                self.shadow,
                self.slot,
                config.http.shadow_root or config.state_dir / "field-tests",
                cpu_budget=config.install.shadow_cpu_budget,
                window_s=config.install.shadow_window_s,
                queue=config.install.shadow_queue,
                memory=config.install,
            ),
        )
        self.http_port = 0
        self._stopping = threading.Event()
        self._flush = threading.Event()
        self._reference_lock = threading.Lock()
        self._releases: dict[str, str] = {}  # model version -> NAME:VERSION
        self._threads: list[threading.Thread] = []

    # -- MQTT -------------------------------------------------------------------------------
    def _mqtt_client(self) -> mqtt.Client:
        settings = self.config.mqtt
        client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=f"edgec-agent-{self.config.device}",
            clean_session=True,
            protocol=mqtt.MQTTv311,
        )
        client.username_pw_set(settings.username, settings.password)
        if settings.ca_file is not None:
            client.tls_set(ca_certs=str(settings.ca_file))
        client.will_set(self.topics["state"], offline_state(), qos=1, retain=True)
        client.reconnect_delay_set(1, int(settings.reconnect_max_s))
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.message_callback_add(self.topics["desired"], self._on_desired)
        return client

    def _on_connect(self, _c: Any, _u: Any, _flags: Any, reason: Any, _props: Any = None) -> None:
        if reason.is_failure:
            logger.error("the broker refused the agent: %s", reason)
            return
        logger.info("connected to the broker")
        self.client.subscribe(self.topics["desired"], qos=1)
        if hasattr(self, "chunk_client"):
            self.chunk_client.subscribe()
        self.reporter.connected()
        self._flush.set()

    def _on_disconnect(self, _c: Any, _u: Any, _flags: Any, reason: Any, _props: Any = None) -> None:
        if not self._stopping.is_set():
            logger.warning("disconnected from the broker (%s); reconnecting", reason)

    def _on_desired(self, _c: Any, _u: Any, message: mqtt.MQTTMessage) -> None:
        self.core.on_desired(message.payload)

    # -- threads ----------------------------------------------------------------------------
    def _install_loop(self) -> None:
        core = self.core
        core.resume()
        while not self._stopping.is_set():
            with core.work:
                while (envelope := core.take_desired()) is None and not self._stopping.is_set():
                    core.work.wait(1.0)
            if envelope is not None:
                core.install(envelope)

    def _telemetry_loop(self) -> None:
        while not self._stopping.is_set():
            self._flush.wait(timeout=min(1.0, self.config.telemetry.window_s))
            self._flush.clear()
            self._buffer_due_windows()
            self._publish_buffer()

    def _buffer_due_windows(self) -> None:
        try:
            while self.recorder.due():
                window = self.recorder.close_window()
                if self.metrics is not None:
                    self.metrics.observe_window(window)
                self.buffer.append(window.model_dump(mode="json", exclude_none=True))
        except OSError as e:  # disk full: the window is lost, serving goes on
            logger.error("cannot buffer telemetry: %s", e)

    def _publish_buffer(self) -> None:
        """Oldest first; each window is acked (deleted) once the broker has it, and the first
        one that does not go through stops the round, so order is kept across outages."""
        for seq, window in self.buffer.pending():
            if not self.client.is_connected() or self._stopping.is_set():
                return
            info = self.client.publish(self.topics["telemetry"], json.dumps(window), qos=1)
            if info.rc != mqtt.MQTT_ERR_SUCCESS:
                return
            try:
                info.wait_for_publish(timeout=2)
            except (RuntimeError, ValueError):
                return
            if not info.is_published():
                return  # the rest waits for the next connection
            self.buffer.ack(seq)
            self._buffer_due_windows()  # a long backlog must not hold up closing new windows

    # -- serving ----------------------------------------------------------------------------
    def _on_request(
        self,
        version: str,
        latency_s: float,
        ok: bool,
        inputs: Mapping[str, np.ndarray] | None,
        outputs: Mapping[str, np.ndarray] | None,
    ) -> None:
        self.probation.record(version, latency_s, ok)
        release = self._releases.get(version) or self._learn_release(version)
        self.recorder.record(release, latency_s, ok, inputs, outputs)

    def _learn_release(self, version: str) -> str:
        """Windows name the model as NAME:VERSION; the first request of a newly swapped-in
        model also gives the recorder that model's reference statistics for drift."""
        with self._reference_lock:
            model = self.slot.model
            if model is None or model.manifest.version != version:
                return version  # answered by a model already swapped out, and unseen: rare
            release = f"{model.manifest.name}:{version}"
            self.recorder.set_reference(release, model.manifest.reference_stats)
            self._releases[version] = release
            return release

    # -- life cycle -------------------------------------------------------------------------
    def start(self) -> None:
        self.core.start()
        self.http_port = self.server.start()
        logger.info("local inference API on http://%s:%d/v2", self.config.http.host, self.http_port)
        self.client.connect_async(self.config.mqtt.host, self.config.mqtt.port, self.config.mqtt.keepalive_s)
        self.client.loop_start()
        for target, name in ((self._install_loop, "installer"), (self._telemetry_loop, "telemetry")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            self._threads.append(thread)
            thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._flush.set()
        self.core.stop()
        self.server.stop()
        for thread in self._threads:
            thread.join(timeout=10)
        self.client.loop_stop()
        self.client.disconnect()

    def run_forever(self) -> None:
        run_until_signalled(self.start, self.stop)
