"""Identity attacks on the broker, on a real Mosquitto with the generated config: a device's
login connecting under another device's or the server's client id.

MQTT lets a new connection with a client id that is already connected replace the old one, and
with a clean session discard the old persistent session and everything queued for it. The
generated config binds every client id to its username, so each login's connection and session
are its own; the ACL (on usernames) keeps each device on its own topics whatever id it claims.
"""

from __future__ import annotations

import datetime as dt
import itertools
import json
import threading
import time

import paho.mqtt.client as mqtt
import pytest
from sqlalchemy import text

from edgec.errors import UserInputError
from edgec.topics import device_topics
from ota_server.broker import SERVER_USER, write_broker_config
from ota_server.registry import Registry
from tests._services import needs_mosquitto, wait_for
from tests.ota_server.test_broker_acl import Client, broker  # noqa: F401  (fixture)
from tests.ota_server.test_server_process import _start, _stop, server_config  # noqa: F401  (fixture)

pytestmark = needs_mosquitto

SERVER_CLIENT_ID = "edgec-server-test"  # what server_config gives the server process


class Session:
    """A paho client with a chosen client id that counts its connects and disconnects."""

    def __init__(
        self, user: str, password: str, port: int, client_id: str, clean: bool = True, ca=None
    ) -> None:
        self.connects = 0
        self.disconnects = 0
        self.messages: list[tuple[str, bytes]] = []
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=clean, protocol=mqtt.MQTTv311
        )
        self.client.username_pw_set(user, password)
        if ca is not None:
            self.client.tls_set(ca_certs=str(ca))
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = lambda _c, _u, m: self.messages.append((m.topic, bytes(m.payload)))
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        assert wait_for(lambda: self.connects, 10), f"{user} could not connect"

    def _on_connect(self, _c, _u, _flags, reason, _props=None) -> None:
        if not reason.is_failure:
            self.connects += 1

    def _on_disconnect(self, *_args) -> None:
        self.disconnects += 1

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _take_over(setup, client_id: str, hold_s: float = 0.5, port: int | None = None, ca=None) -> None:
    """dev-a's login connects under ``client_id`` with a clean session, stays a moment, leaves."""
    attacker = Session(
        "dev-a", setup["passwords"]["dev-a"], port or setup["port"], client_id, clean=True, ca=ca
    )
    time.sleep(hold_s)
    attacker.close()


def _windows(config, device: str) -> int:
    registry = Registry.open(config["db"])
    try:
        with registry.engine.connect() as conn:
            query = text("SELECT COUNT(*) FROM telemetry_windows WHERE device_id = :d")
            return int(conn.execute(query, {"d": device}).scalar() or 0)
    finally:
        registry.engine.dispose()


def _window(seq: int) -> bytes:
    ended = dt.datetime(2026, 11, 29, 10, 0, tzinfo=dt.UTC) + dt.timedelta(seconds=seq)
    window = {
        "window_s": 1,
        "requests": 10,
        "errors": 0,
        "p95_ms": 1.5,
        "seq": seq,
        "ended_at": ended.isoformat(),
    }
    return json.dumps(window).encode()


def test_device_cannot_take_over_another_devices_client_id(broker):  # noqa: F811
    victim = Session("dev-b", broker["passwords"]["dev-b"], broker["port"], "edgec-agent-dev-b")
    victim.client.subscribe(device_topics("lab", "dev-b")["desired"], qos=1)
    for claimed in ("edgec-agent-dev-b", "dev-b"):  # the id the agent uses, and its username
        _take_over(broker, claimed)
    server = Client(SERVER_USER, broker["files"].server_password, broker["port"])
    assert server.ok()
    server.client.publish(device_topics("lab", "dev-b")["desired"], b"still yours", qos=1).wait_for_publish(5)
    assert wait_for(lambda: victim.messages, 5)  # its subscription is intact
    assert (victim.connects, victim.disconnects) == (1, 0)  # never kicked off
    for client in (victim, server):
        client.close()


def test_device_cannot_take_over_the_servers_connection(broker):  # noqa: F811
    server = Session(
        SERVER_USER, broker["files"].server_password, broker["port"], "edgec-server-1", clean=False
    )
    for claimed in ("edgec-server-1", SERVER_USER):  # the configured id, and the one it is bound to
        _take_over(broker, claimed)
    time.sleep(0.5)
    assert (server.connects, server.disconnects) == (1, 0)
    server.close()


def test_device_cannot_take_over_a_connection_on_the_tls_listener(broker):  # noqa: F811
    ca = broker["files"].ca_cert
    victim = Session("dev-b", broker["passwords"]["dev-b"], broker["tls_port"], "edgec-agent-dev-b", ca=ca)
    _take_over(broker, "edgec-agent-dev-b", port=broker["tls_port"], ca=ca)
    _take_over(broker, "edgec-agent-dev-b")  # from the other listener
    time.sleep(0.5)
    assert (victim.connects, victim.disconnects) == (1, 0)
    victim.close()


def test_device_cannot_publish_on_another_devices_report_topics_under_its_client_id(broker):  # noqa: F811
    server = Client(SERVER_USER, broker["files"].server_password, broker["port"])
    assert server.ok()
    server.client.subscribe("edgec/v1/#", qos=1)
    time.sleep(0.3)
    b_topics = device_topics("lab", "dev-b")
    attacker = Session("dev-a", broker["passwords"]["dev-a"], broker["port"], "edgec-agent-dev-b")
    for kind in ("state", "telemetry", "events"):
        attacker.client.publish(b_topics[kind], b'{"forged": true}', qos=1).wait_for_publish(5)
    own = device_topics("lab", "dev-a")["state"]
    attacker.client.publish(own, b'{"status": "serving"}', qos=1).wait_for_publish(5)
    assert wait_for(lambda: any(topic == own for topic, _ in server.messages), 5)  # its own arrives
    assert not [topic for topic, _ in server.messages if "/dev-b/" in topic]
    for client in (attacker, server):
        client.close()


def test_device_cannot_discard_the_servers_persistent_session(broker, server_config):  # noqa: F811
    """The server is down; a device's report waits in the server's session at the broker. A
    device that connects under the server's client id with a clean session used to discard it."""
    server = _start(server_config)
    _stop(server)
    device = Session("dev-b", broker["passwords"]["dev-b"], broker["port"], "edgec-agent-dev-b")
    device.client.publish(device_topics("lab", "dev-b")["telemetry"], _window(1), qos=1).wait_for_publish(5)
    for claimed in (SERVER_CLIENT_ID, SERVER_USER):
        _take_over(broker, claimed, hold_s=0.2)
    server = _start(server_config)
    try:
        assert wait_for(lambda: _windows(server_config, "dev-b") == 1, 20)
    finally:
        device.close()
        _stop(server)


@pytest.mark.slow
def test_no_telemetry_lost_during_takeover_attempts(broker, server_config):  # noqa: F811
    """A device keeps reporting while another device's login keeps connecting under the server's
    client ids and the reporting device's: every window reaches the registry."""
    server = _start(server_config)
    device = Session("dev-b", broker["passwords"]["dev-b"], broker["port"], "edgec-agent-dev-b")
    sent = 24
    done = threading.Event()

    def attack() -> None:
        for claimed in itertools.cycle((SERVER_CLIENT_ID, SERVER_USER, "edgec-agent-dev-b")):
            if done.is_set():
                return
            _take_over(broker, claimed, hold_s=0.3)

    attacker = threading.Thread(target=attack)
    attacker.start()
    try:
        topic = device_topics("lab", "dev-b")["telemetry"]
        for seq in range(1, sent + 1):  # as an agent does: QoS 1, sent again after a reconnect
            device.client.publish(topic, _window(seq), qos=1)
            time.sleep(0.25)
    finally:
        done.set()
        attacker.join(30)
    try:
        assert wait_for(lambda: _windows(server_config, "dev-b") == sent, 30), _windows(
            server_config, "dev-b"
        )
        assert device.disconnects == 0
    finally:
        device.close()
        _stop(server)


def test_device_cannot_be_registered_under_the_servers_login(tmp_path):
    registry = Registry.open(f"sqlite:///{tmp_path / 'fleet.db'}")
    registry.add_device("dev-a", "lab", "g", "x86-64-cpu")
    try:
        registry.add_device(SERVER_USER, "lab", "g", "x86-64-cpu")
    except UserInputError:
        return  # refused at registration: better still
    with pytest.raises(UserInputError, match="server's login"):
        write_broker_config(registry, tmp_path / "broker", port=1, tls_port=2, run_as="nobody")
    assert not (tmp_path / "broker" / "passwords").exists()
