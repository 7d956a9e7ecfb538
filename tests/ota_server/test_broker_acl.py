"""The generated Mosquitto configuration on a real broker: ACLs, passwords, TLS."""

from __future__ import annotations

import os
import pwd
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from edgec.topics import device_topics
from ota_server.broker import SERVER_USER, write_broker_config
from ota_server.registry import Registry
from tests._services import free_port, needs_mosquitto, start_mosquitto, stop

pytestmark = needs_mosquitto
_free_port = free_port


@pytest.fixture
def broker(tmp_path):
    registry = Registry.open(f"sqlite:///{tmp_path / 'fleet.db'}")
    _, pw_a = registry.add_device("dev-a", "lab", "g", "raspberry-pi-4")
    _, pw_b = registry.add_device("dev-b", "lab", "g", "x86-64-cpu")
    port, tls_port = _free_port(), _free_port()
    user = pwd.getpwuid(os.getuid()).pw_name  # the broker runs as the test's own user
    files = write_broker_config(registry, tmp_path / "broker", port=port, tls_port=tls_port, run_as=user)
    proc = start_mosquitto(files.config, port)
    yield {"port": port, "tls_port": tls_port, "files": files, "passwords": {"dev-a": pw_a, "dev-b": pw_b}}
    stop(proc)


class Client:
    """A paho client that records what it receives and how its requests went."""

    def __init__(self, user: str | None, password: str | None, port: int, ca: Path | None = None) -> None:
        self.messages: list[tuple[str, bytes]] = []
        self.connected = threading.Event()
        self.reason: object = None
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
        if user is not None:
            self.client.username_pw_set(user, password)
        if ca is not None:
            self.client.tls_set(ca_certs=str(ca))
        self.client.on_connect = self._on_connect
        self.client.on_message = lambda _c, _u, msg: self.messages.append((msg.topic, msg.payload))
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def _on_connect(self, _c, _u, _flags, reason, _props=None) -> None:
        self.reason = reason
        self.connected.set()

    def ok(self) -> bool:
        self.connected.wait(5)
        return bool(self.connected.is_set() and not self.reason.is_failure)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def _server(broker) -> Client:
    return Client(SERVER_USER, broker["files"].server_password, broker["port"])


def test_device_reads_only_its_own_desired_topic(broker):
    server = _server(broker)
    assert server.ok()
    a_topics, b_topics = device_topics("lab", "dev-a"), device_topics("lab", "dev-b")
    server.client.publish(a_topics["desired"], b"for a", qos=1, retain=True).wait_for_publish(5)
    server.client.publish(b_topics["desired"], b"for b", qos=1, retain=True).wait_for_publish(5)
    a = Client("dev-a", broker["passwords"]["dev-a"], broker["port"])
    assert a.ok()
    a.client.subscribe(a_topics["desired"], qos=1)
    a.client.subscribe(b_topics["desired"], qos=1)
    a.client.subscribe("edgec/v1/#", qos=1)
    time.sleep(1.0)
    topics = {topic for topic, _ in a.messages}
    assert a_topics["desired"] in topics
    assert b_topics["desired"] not in topics
    for client in (a, server):
        client.close()


def test_device_cannot_publish_a_desired_document_or_as_another_device(broker):
    server = _server(broker)
    assert server.ok()
    server.client.subscribe("edgec/v1/#", qos=1)
    a = Client("dev-a", broker["passwords"]["dev-a"], broker["port"])
    assert a.ok()
    time.sleep(0.3)
    a_topics, b_topics = device_topics("lab", "dev-a"), device_topics("lab", "dev-b")
    a.client.publish(a_topics["desired"], b"install evil", qos=1).wait_for_publish(5)
    a.client.publish(b_topics["state"], b"i am b", qos=1).wait_for_publish(5)
    a.client.publish(a_topics["state"], b"i am a", qos=1).wait_for_publish(5)
    time.sleep(1.0)
    received = {topic for topic, _ in server.messages}
    assert a_topics["state"] in received  # its own report arrives
    assert a_topics["desired"] not in received
    assert b_topics["state"] not in received
    for client in (a, server):
        client.close()


@pytest.mark.parametrize(("user", "password"), [(None, None), ("dev-a", "wrong"), ("nobody", "x")])
def test_anonymous_and_wrong_passwords_are_refused(broker, user, password):
    client = Client(user, password, broker["port"])
    assert not client.ok()
    client.close()


def test_tls_listener_with_the_generated_ca(broker):
    client = Client("dev-a", broker["passwords"]["dev-a"], broker["tls_port"], ca=broker["files"].ca_cert)
    assert client.ok()
    client.close()


def test_secrets_are_0600(broker):
    folder = broker["files"].config.parent
    for name in ("passwords", "acl", "server.key", "ca.key", "server.secret"):
        assert (folder / name).stat().st_mode & 0o777 == 0o600
