"""``edgec server run``: the OTA server process, one replica or several.

Connects to the broker with a persistent session (so device reports sent while the server was
down are delivered when it returns), answers fetch requests, serves HTTP, and records device
state and telemetry in the registry, in batches, acknowledging each report to the broker once
it is committed. Malformed reports are logged and dropped.

Several replicas share one PostgreSQL registry (``ota_server.cluster``): each takes its share
of the devices' messages through MQTT shared subscriptions, the rollout scheduler runs on the
holder of a lease, and the holder drains the broker session of a replica that died.
"""

from __future__ import annotations

import datetime as dt
import logging
import socket
import threading
import time
from collections import Counter
from functools import partial
from pathlib import Path
from typing import Annotated, Any, Literal

import paho.mqtt.client as mqtt
from pydantic import BaseModel, ConfigDict, Field, field_validator

from edgec._service import run_until_signalled
from edgec._time import utc_moment
from edgec.director import Action, ShadowRequest, SignedDirectorDocument
from edgec.errors import ProtocolError, UserInputError
from edgec.reports import DeviceState, EventKind, Telemetry
from edgec.topics import PREFIX, device_topics, parse_topic
from ota_server._adopted import AdoptedSessions
from ota_server._report_writer import Received, ReportWriter
from ota_server.audit import AuditLog
from ota_server.auth import Authenticator, NamedToken, token_grants
from ota_server.cluster import Cluster
from ota_server.director import DirectorIssuer, import_versions_file, release_files
from ota_server.fetch import REQUEST_FILTER, FetchServer
from ota_server.http_api import ApiLimits, HttpApi
from ota_server.ingest import KINDS as REPORT_KINDS
from ota_server.ingest import ReportLimits, ReportRefused, WindowRateLimiter, parse_report
from ota_server.jwt_auth import JwtSettings, JwtVerifier
from ota_server.metrics import ServerMetrics
from ota_server.registry import Registry
from ota_server.repository import ImageRepository
from ota_server.rollouts import Rollouts

__all__ = ["OtaServer", "ServerConfig"]

logger = logging.getLogger(__name__)
REPORTS = f"{PREFIX}/+/devices/+/+"
DROP_LOG_EVERY_S = 60.0  # a flood of bad reports logs one line a minute per reason, and counts
PUBLISH_WAIT_S = 5.0  # how long an assign waits for the broker to take a director document


def _seconds_between(earlier: str | None, later: str) -> float:
    """Seconds from ``earlier`` (a device's clock, ISO 8601; naive is taken as UTC) to ``later``
    (ours); -1 when ``earlier`` is missing or unreadable (not counted)."""
    start = utc_moment(earlier)
    if start is None:
        return -1.0
    return (dt.datetime.fromisoformat(later) - start).total_seconds()


def _no_delay(_client: Any, _userdata: Any, sock: Any) -> None:
    """TCP_NODELAY on the server's broker connection: an assign waits for the broker to take its
    director document, and with Nagle's algorithm that took a delayed ACK (about 40 ms) each
    time the broker also sent the document back (the server subscribes to device topics)."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class MqttSettings(_Model):
    host: str = "127.0.0.1"
    port: int = 1883
    # each replica its own login: edgec-server, edgec-server-2, ... (edgec broker config
    # --server-replicas N writes them, sharing one secret)
    username: str = "edgec-server"
    password_file: Path
    # a broker that binds client ids to usernames (the config ``edgec broker config`` writes)
    # replaces it with the username: the persistent session is then the username's
    client_id: str = "edgec-server-1"
    ca_file: Path | None = None


class ClusterSettings(_Model):
    name: str | None = None  # this replica's name among those sharing the registry (default: mqtt.username)
    # the rollout scheduler's lease: a dead holder is replaced within this (plus one heartbeat)
    lease_s: Annotated[float, Field(ge=1, le=600)] = 10.0
    # $share/GROUP/... subscriptions: each device message reaches one replica. false only for
    # a broker without shared subscriptions, and then with one replica
    shared_subscriptions: bool = True
    group: Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")] = "edgec"


_TokenEntry = Literal["viewer", "operator", "admin"] | NamedToken  # the old form's role, or a named one


class HttpSettings(_Model):
    host: str = "127.0.0.1"
    port: int = 8080
    # "<sha256 hex of a token>" = "role" (named by the digest's first 12), or a named table
    # [http.tokens.NAME] with sha256 and role (ota_server.auth.token_grants)
    tokens: Annotated[dict[str, _TokenEntry], Field(max_length=1000)] = {}
    jwt: JwtSettings | None = None  # sign-in with an identity provider's JWTs (ota_server.jwt_auth)
    # a client must send a request's head within this (also the keep-alive idle time)
    head_timeout_s: Annotated[float, Field(gt=0, le=3600)] = ApiLimits.head_timeout_s
    max_connections: Annotated[int, Field(ge=1, le=10_000)] = ApiLimits.max_connections  # then 503
    dashboard: bool = True  # the web dashboard under /ui (sign-in with the same tokens or JWTs)
    # HTTPS in front (a proxy): the dashboard's session cookie is sent over HTTPS only
    behind_https: bool = False

    @field_validator("tokens")
    @classmethod
    def _tokens_fit_one_form(cls, tokens: dict[str, _TokenEntry]) -> dict[str, _TokenEntry]:
        token_grants(tokens)  # a key that fits neither form, a digest or a name twice: refused
        return tokens


class ServerConfig(_Model):
    repo: Path  # the served folder: metadata/ and targets/, nothing secret
    # the online keys (snapshot, timestamp, director), outside repo; default: <repo>-online-keys
    online_keys: Path | None = None
    db: str
    # the passphrase of the repository's online keys (the director's signs device documents);
    # without it the server serves and records but cannot assign releases
    passphrase_file: Path | None = None
    rollout_tick_s: float = 1.0  # how often the rollout scheduler looks at the devices
    mqtt: MqttSettings
    http: HttpSettings = HttpSettings()
    cluster: ClusterSettings = ClusterSettings()


class OtaServer:
    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.registry = Registry.open(config.db)
        self.repository = ImageRepository(config.repo, online_keys=config.online_keys)
        self.repository.check_server_side()  # no private key served, no offline key held
        self.dropped = 0
        self.drops: Counter[str] = Counter()  # dropped reports by reason
        self._drop_logged: dict[str, float] = {}
        self.report_limits = ReportLimits()
        self._window_limiter = WindowRateLimiter(
            self.report_limits.windows_per_s,
            self.report_limits.window_burst,
            self.report_limits.max_tracked_devices,
        )
        self._password = config.mqtt.password_file.read_text(encoding="utf-8").strip()
        self.client = self._mqtt_client(config.mqtt.username, config.mqtt.client_id)
        self.client.on_connect = self._on_connect
        self.metrics = ServerMetrics()
        cluster = config.cluster
        self.shared_group = cluster.group if cluster.shared_subscriptions else None
        self.reports = f"$share/{self.shared_group}/{REPORTS}" if self.shared_group else REPORTS
        self.fetch = FetchServer(
            config.repo,
            self.client,
            on_sent=lambda n: self.metrics.fetched("mqtt", n),
            shared_group=self.shared_group,
        )
        self.cluster = Cluster(
            self.registry, cluster.name or config.mqtt.username, config.mqtt.username, cluster.lease_s
        )
        self.adopted = AdoptedSessions(self._adopter, config.mqtt.host, config.mqtt.port)
        self.writer = ReportWriter(self.registry, self._on_events, self._drop)
        import_versions_file(self.registry, config.repo)  # an older server's counters, once
        self.issuer: DirectorIssuer | None = None
        if config.passphrase_file is not None:
            passphrase = config.passphrase_file.read_bytes().rstrip(b"\r\n")
            signer = self.repository.director_signer(passphrase)
            self.issuer = DirectorIssuer(self.registry, signer)
        jwt = JwtVerifier(config.http.jwt) if config.http.jwt is not None else None
        authenticator = Authenticator(static=token_grants(config.http.tokens), jwt=jwt)
        self.rollouts = Rollouts(self.registry, self.assign, self._bundle_profiles)
        self.metrics.watch(lambda: (d.as_dict() for d in self.registry.devices()), self.rollouts.list)
        self.http = HttpApi(
            self.repository,
            self.registry,
            {},
            authenticator=authenticator,
            assign=self.assign,
            rollouts=self.rollouts,
            limits=ApiLimits(
                head_timeout_s=config.http.head_timeout_s, max_connections=config.http.max_connections
            ),
            metrics=self.metrics,
            audit=AuditLog(self.registry),
            dashboard=config.http.dashboard,
            secure_cookie=config.http.behind_https,
            replicas=lambda: [r.as_dict() for r in self.cluster.replicas()],
        )
        self._targets_cache: tuple[int, dict[str, Any]] | None = None
        self._stopping = threading.Event()
        self._scheduler = threading.Thread(target=self._schedule, name="rollouts", daemon=True)
        self._heart = threading.Thread(target=self._beat, name="heartbeat", daemon=True)

    def _mqtt_client(self, username: str, client_id: str) -> mqtt.Client:
        """A broker connection with a persistent session whose reports are acknowledged only
        once they are in the registry (manual acks)."""
        client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=client_id,
            clean_session=False,
            protocol=mqtt.MQTTv311,
            manual_ack=True,
        )
        client.username_pw_set(username, self._password)
        if self.config.mqtt.ca_file:
            client.tls_set(ca_certs=str(self.config.mqtt.ca_file))
        client.on_socket_open = _no_delay
        client.message_callback_add(REPORTS, self._on_report)
        return client

    def _adopter(self, login: str) -> mqtt.Client:
        """A client for a dead replica's session: its reports and fetch requests are ours now."""
        client = self._mqtt_client(login, login)
        client.message_callback_add(REQUEST_FILTER, self.fetch.on_request)
        return client

    def _beat(self) -> None:
        """Heartbeat, the scheduler's lease, and the sessions of dead replicas, every lease_s/3."""
        every = self.cluster.lease_s / 3
        while True:
            try:
                self.cluster.beat()
                held = self.cluster.hold_lease()
                dead = self.cluster.dead_logins() if held and self.shared_group else []
                self.adopted.update(dead)
            except Exception:  # the database is away: try again next beat (the lease runs out)
                logger.exception("heartbeat failed")
            if self._stopping.wait(every):
                return

    def _signed_targets(self) -> dict[str, Any]:
        """The newest targets metadata's targets, read again only when the metadata folder
        changed (publishing renames a new file into it): a wave of thousands of assignments
        parses it once."""
        changed = (self.repository.metadata_dir).stat().st_mtime_ns
        if self._targets_cache is None or self._targets_cache[0] != changed:
            self._targets_cache = (changed, self.repository.load("targets").signed.targets)
        return self._targets_cache[1]

    def _bundle_profiles(self, release: str) -> set[str]:
        name, _, version = release.partition(":")
        return {r.profile for r in self.repository.releases() if (r.name, r.version) == (name, version)}

    def _schedule(self) -> None:
        pruned = 0.0
        while not self._stopping.wait(self.config.rollout_tick_s):
            if not self.cluster.holds():  # another replica schedules
                continue
            if self.issuer is not None:
                self.rollouts.tick()
            if time.monotonic() - pruned > 600:  # telemetry history: a day is plenty to judge on
                day_ago = dt.datetime.now(dt.UTC) - dt.timedelta(days=1)
                self.registry.prune_windows(day_ago.isoformat(timespec="milliseconds"))
                pruned = time.monotonic()
        self.http_port = 0

    def assign(
        self,
        device_id: str,
        release: str,
        action: Action = Action.INSTALL,
        rollout: str = "manual",
        shadow: ShadowRequest | None = None,
    ) -> SignedDirectorDocument:
        """Sign a director document telling ``device_id`` to run ``release`` ("NAME:VERSION")
        (or, with ``shadow``, to run it in shadow) and publish it, retained, on the device's
        desired topic."""
        if self.issuer is None:
            raise UserInputError("the server has no director key passphrase (passphrase_file in server.toml)")
        device = self.registry.get(device_id)
        files = release_files(self._signed_targets(), release, device.profile)
        document = self.issuer.issue(
            fleet=device.fleet,
            device=device.id,
            profile=device.profile,
            rollout=rollout,
            action=action,
            release=release,
            files=files,
            shadow=shadow,
            deliver=self._publish_desired,
        )
        # one line per device is a thousand lines a wave: -vv shows them
        logger.debug("assigned %s to %s (director document %d)", release, device.id, document.signed.version)
        return document

    def _publish_desired(self, document: SignedDirectorDocument) -> None:
        """Publish a director document, retained, on its device's desired topic. Called with the
        device's issuing lock held: waiting for the broker's acknowledgement (bounded) keeps
        server replicas' documents for one device in version order at the broker."""
        signed = document.signed
        topic = device_topics(signed.fleet, signed.device)["desired"]
        sent = self.client.publish(topic, document.model_dump_json(), qos=1, retain=True)
        try:
            if sent.rc == mqtt.MQTT_ERR_NO_CONN:
                raise RuntimeError("not connected to the broker")
            sent.wait_for_publish(PUBLISH_WAIT_S)
        except (RuntimeError, ValueError) as e:  # paho sends it, in order, once connected again
            logger.warning("director document %d for %s queued: %s", signed.version, signed.device, e)

    def _on_connect(self, _c: Any, _u: Any, _flags: Any, reason: Any, _props: Any = None) -> None:
        if reason.is_failure:
            logger.error("broker refused the server: %s", reason)
            return
        if self.shared_group:  # an unshared subscription an older server left in the session
            self.client.unsubscribe(REPORTS)
        self.client.subscribe(self.reports, qos=1)
        self.fetch.start()
        self.metrics.connected()
        logger.info("connected to the broker")

    def _drop(self, topic: str, why: str, reason: str = "malformed") -> bool:
        """Count a dropped report; log the first of each reason, then one line a minute."""
        self.dropped += 1
        self.drops[reason] += 1
        self.metrics.drop(reason)
        now = time.monotonic()
        if now - self._drop_logged.get(reason, -DROP_LOG_EVERY_S) < DROP_LOG_EVERY_S:
            return False
        self._drop_logged[reason] = now
        shown = topic[:200]
        logger.warning("dropped a report on %s: %s (%d %s so far)", shown, why, self.drops[reason], reason)
        return True

    def _on_report(self, client: mqtt.Client, _u: Any, message: mqtt.MQTTMessage) -> None:
        """Validate a report on the network thread and hand it to the writer, which acknowledges
        it once it is committed; a report that is dropped is acknowledged at once."""
        try:
            topic = parse_topic(message.topic)
        except ProtocolError as e:
            self._drop(message.topic, str(e), "bad topic")
            client.ack(message.mid, message.qos)
            return
        if topic.kind not in REPORT_KINDS:
            client.ack(message.mid, message.qos)
            return  # desired documents are ours
        try:
            report = parse_report(topic.kind, message.payload, self.report_limits)
            self.metrics.report(topic.kind)
            now = dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")
            if isinstance(report, Telemetry):
                self._limit_windows(topic.device)
                self.metrics.lag(_seconds_between(report.ended_at, now))
            elif not isinstance(report, DeviceState):
                release, detail = report.release or "", (report.detail or "")[:200]
                level = logging.INFO if report.event == EventKind.REFUSED else logging.DEBUG
                logger.log(level, "event from %s: %s %s %s", topic.device, report.event, release, detail)
                self.metrics.event(report.event, report.step)
        except ReportRefused as e:
            self._drop(message.topic, str(e), e.reason)
            client.ack(message.mid, message.qos)
            return
        except Exception:  # never let one report kill the MQTT loop
            if self._drop(message.topic, "unexpected failure (traceback follows)", "failed"):
                logger.exception("unexpected failure handling a report on %s", message.topic[:200])
            client.ack(message.mid, message.qos)
            return
        self.writer.put(
            Received(message.topic, topic.device, report, now, partial(client.ack, message.mid, message.qos))
        )

    def _limit_windows(self, device: str) -> None:
        """Telemetry windows are kept within the device's rate limit (per replica)."""
        if not self._window_limiter.allow(device, time.monotonic()):
            limits = self.report_limits
            message = f"over {limits.windows_per_s:g} windows/s (burst {limits.window_burst})"
            raise ReportRefused(message, "rate limited")

    def _on_events(self, events: list[tuple[str, dict[str, Any]]]) -> None:
        """A committed batch's install events, for the rollouts to settle their members."""
        self.rollouts.on_events(events)

    def start(self) -> None:
        self.cluster.beat()  # alive before connecting: a peer draining our session lets it go
        self.cluster.hold_lease()
        self.writer.start()
        self.client.connect(self.config.mqtt.host, self.config.mqtt.port)
        self.client.loop_start()
        self.http_port = self.http.serve(self.config.http.host, self.config.http.port)
        logger.info("serving HTTP on %s:%d", self.config.http.host, self.http_port)
        self._heart.start()
        self._scheduler.start()

    def stop(self) -> None:
        """A clean stop: with other replicas alive, leave the shared subscriptions first (the
        broker stops routing to this session); alone, keep them (reports wait for the restart)."""
        self._stopping.set()
        self.http.close()
        self.fetch.stop()
        if self.shared_group and self._others_alive():
            self.client.unsubscribe([self.reports, self.fetch.subscription])
        self.adopted.close()
        self.writer.stop()  # writes and acknowledges what it has taken
        self.client.disconnect()
        self.client.loop_stop()
        try:
            self.cluster.release()
            self.cluster.leave()
        except Exception as e:  # the database is away: the lease runs out by itself
            logger.warning("could not leave the cluster cleanly: %s", e)

    def _others_alive(self) -> bool:
        try:
            return self.cluster.others_alive()
        except Exception:
            return False

    def run_forever(self) -> None:
        run_until_signalled(self.start, self.stop)
