"""``edgec server run``: the OTA server process.

Connects to the broker with a persistent session (so device reports sent while the server was
down are delivered when it returns), answers fetch requests, serves HTTP, and records device
state and telemetry in the registry. Malformed reports are logged and dropped.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import threading
import time
from pathlib import Path
from typing import Any, Literal

import paho.mqtt.client as mqtt
from pydantic import BaseModel, ConfigDict, ValidationError

from edgec._service import run_until_signalled
from edgec.director import Action, SignedDirectorDocument
from edgec.errors import UserInputError
from edgec.reports import DeviceState, Telemetry
from edgec.topics import PREFIX, device_topics
from ota_server.director import DirectorIssuer, release_files
from ota_server.fetch import FetchServer
from ota_server.http_api import HttpApi, Role
from ota_server.registry import Registry
from ota_server.repository import ImageRepository
from ota_server.rollouts import Rollouts

__all__ = ["OtaServer", "ServerConfig"]

logger = logging.getLogger(__name__)
REPORTS = f"{PREFIX}/+/devices/+/+"
MAX_REPORT_BYTES = 64 * 1024


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class MqttSettings(_Model):
    host: str = "127.0.0.1"
    port: int = 1883
    username: str = "edgec-server"
    password_file: Path
    client_id: str = "edgec-server-1"
    ca_file: Path | None = None


class HttpSettings(_Model):
    host: str = "127.0.0.1"
    port: int = 8080
    tokens: dict[str, Literal["viewer", "operator", "admin"]] = {}  # sha256 of a token -> its role


class ServerConfig(_Model):
    repo: Path
    db: str
    # the passphrase of the repository's online keys (the director's signs device documents);
    # without it the server serves and records but cannot assign releases
    passphrase_file: Path | None = None
    rollout_tick_s: float = 1.0  # how often the rollout scheduler looks at the devices
    mqtt: MqttSettings
    http: HttpSettings = HttpSettings()


class OtaServer:
    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.registry = Registry.open(config.db)
        self.repository = ImageRepository(config.repo)
        self.dropped = 0
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=config.mqtt.client_id,
            clean_session=False,
            protocol=mqtt.MQTTv311,
        )
        password = config.mqtt.password_file.read_text(encoding="utf-8").strip()
        self.client.username_pw_set(config.mqtt.username, password)
        if config.mqtt.ca_file:
            self.client.tls_set(ca_certs=str(config.mqtt.ca_file))
        self.client.on_connect = self._on_connect
        self.client.message_callback_add(REPORTS, self._on_report)
        self.fetch = FetchServer(config.repo, self.client)
        self.issuer: DirectorIssuer | None = None
        if config.passphrase_file is not None:
            passphrase = config.passphrase_file.read_bytes().rstrip(b"\r\n")
            signer = self.repository.director_signer(passphrase)
            self.issuer = DirectorIssuer(config.repo / "director" / "versions.json", signer)
        digests = {digest: Role[role.upper()] for digest, role in config.http.tokens.items()}
        self.rollouts = Rollouts(self.registry, self.assign, self._bundle_profiles)
        self.http = HttpApi(
            self.repository,
            self.registry,
            {},
            token_digests=digests,
            assign=self.assign,
            rollouts=self.rollouts,
        )
        self._stopping = threading.Event()
        self._scheduler = threading.Thread(target=self._schedule, name="rollouts", daemon=True)

    def _bundle_profiles(self, release: str) -> set[str]:
        name, _, version = release.partition(":")
        return {r.profile for r in self.repository.releases() if (r.name, r.version) == (name, version)}

    def _schedule(self) -> None:
        pruned = 0.0
        while not self._stopping.wait(self.config.rollout_tick_s):
            if self.issuer is not None:
                self.rollouts.tick()
            if time.monotonic() - pruned > 600:  # telemetry history: a day is plenty to judge on
                day_ago = dt.datetime.now(dt.UTC) - dt.timedelta(days=1)
                self.registry.prune_windows(day_ago.isoformat(timespec="milliseconds"))
                pruned = time.monotonic()
        self.http_port = 0

    def assign(
        self, device_id: str, release: str, action: Action = Action.INSTALL, rollout: str = "manual"
    ) -> SignedDirectorDocument:
        """Sign a director document telling ``device_id`` to run ``release`` ("NAME:VERSION")
        and publish it, retained, on the device's desired topic."""
        if self.issuer is None:
            raise UserInputError("the server has no director key passphrase (passphrase_file in server.toml)")
        device = self.registry.get(device_id)
        files = release_files(self.repository.load("targets").signed.targets, release, device.profile)
        document = self.issuer.issue(
            fleet=device.fleet,
            device=device.id,
            profile=device.profile,
            rollout=rollout,
            action=action,
            release=release,
            files=files,
        )
        topic = device_topics(device.fleet, device.id)["desired"]
        self.client.publish(topic, document.model_dump_json(), qos=1, retain=True)
        self.registry.update(device.id, desired_release=release)
        logger.info("assigned %s to %s (director document %d)", release, device.id, document.signed.version)
        return document

    def _on_connect(self, _c: Any, _u: Any, _flags: Any, reason: Any, _props: Any = None) -> None:
        if reason.is_failure:
            logger.error("broker refused the server: %s", reason)
            return
        self.client.subscribe(REPORTS, qos=1)
        self.fetch.start()
        logger.info("connected to the broker")

    def _drop(self, topic: str, why: str) -> None:
        self.dropped += 1
        logger.warning("dropped a report on %s: %s", topic, why)

    def _on_report(self, _c: Any, _u: Any, message: mqtt.MQTTMessage) -> None:
        parts = message.topic.split("/")
        if len(parts) != 6:
            return self._drop(message.topic, "not a device report topic")
        device, kind = parts[4], parts[5]
        if kind not in ("state", "telemetry", "events"):
            return None  # desired documents are ours
        if len(message.payload) > MAX_REPORT_BYTES:
            return self._drop(message.topic, f"{len(message.payload)} bytes")
        try:
            data = json.loads(message.payload)
            now = dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")
            if kind == "state":
                state = DeviceState.model_validate(data)
                self.registry.update(
                    device, last_seen=now, status=state.status, installed_release=state.installed
                )
            elif kind == "telemetry":
                window = Telemetry.model_validate(data)
                self.registry.add_window(device, window.figures(), now)  # the history rollouts judge
                if self._is_newer(device, window):
                    self.registry.update(device, last_seen=now, telemetry=window.figures())
            else:
                if not isinstance(data, dict):
                    raise ValueError("an event is a JSON object")
                logger.info("event from %s: %s", device, data)
                self.registry.update(device, last_seen=now)
                self.rollouts.on_event(device, data)
        except (ValueError, ValidationError, UnicodeDecodeError, RecursionError) as e:
            # RecursionError: json.loads on deeply nested garbage ("[[[[...")
            return self._drop(message.topic, (str(e).splitlines() or [type(e).__name__])[0])
        except Exception:  # never let one report kill the MQTT loop
            logger.exception("unexpected failure handling a report on %s", message.topic)
            self.dropped += 1
        return None

    def _is_newer(self, device: str, window: Telemetry) -> bool:
        """A window sent twice (QoS 1 is at least once) or late must not replace a newer one;
        a device whose counter restarted (a new state folder) has newer windows, not higher seqs."""
        try:
            stored = self.registry.get(device).telemetry or {}
        except UserInputError:
            return True
        if window.seq is None or stored.get("seq") is None:
            return True
        return window.seq > stored["seq"] or (window.ended_at or "") > stored.get("ended_at", "")

    def start(self) -> None:
        self.client.connect(self.config.mqtt.host, self.config.mqtt.port)
        self.client.loop_start()
        self.http_port = self.http.serve(self.config.http.host, self.config.http.port)
        logger.info("serving HTTP on %s:%d", self.config.http.host, self.http_port)
        self._scheduler.start()

    def stop(self) -> None:
        self._stopping.set()
        self.http.close()
        self.fetch.stop()
        self.client.loop_stop()
        self.client.disconnect()

    def run_forever(self) -> None:
        run_until_signalled(self.start, self.stop)
