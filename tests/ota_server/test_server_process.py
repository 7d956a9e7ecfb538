"""``edgec server run`` as a real process against a real Mosquitto: reports land in the
registry, reports sent while the server is down arrive after it returns, garbage is dropped."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import subprocess
import sys
import time
import urllib.request

import pytest

from agent.director import DirectorState
from edgec.director import SignedDirectorDocument
from edgec.topics import device_topics
from ota_server.registry import Registry
from ota_server.repository import ImageRepository
from tests._services import MOSQUITTO
from tests._services import free_port as _free_port
from tests.conftest import ROOT, run_edgec
from tests.ota_server.test_broker_acl import Client, broker  # noqa: F401  (fixture)
from tests.security.test_image_repository import PASS
from tests.security.test_image_repository import bundle as bundle  # noqa: PLC0414  (fixture)

pytestmark = pytest.mark.skipif(MOSQUITTO is None, reason="the mosquitto binary is not installed")


def _wait(predicate, seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False


@pytest.fixture
def server_config(tmp_path, broker):  # noqa: F811
    ImageRepository.init(tmp_path / "repo", PASS, {}, keys=tmp_path / "keys")
    db = tmp_path / "fleet.db"  # the registry the broker fixture made (dev-a, dev-b)
    http_port = _free_port()
    config = tmp_path / "server.toml"
    secret = broker["files"].config.parent / "server.secret"
    passphrase = tmp_path / "passphrase"
    passphrase.write_bytes(PASS + b"\n")
    token = "operator-token-for-tests"
    digest = hashlib.sha256(token.encode()).hexdigest()
    config.write_text(
        f'repo = "{tmp_path / "repo"}"\ndb = "sqlite:///{db}"\npassphrase_file = "{passphrase}"\n\n'
        f'[mqtt]\nport = {broker["port"]}\npassword_file = "{secret}"\nclient_id = "edgec-server-test"\n\n'
        f'[http]\nport = {http_port}\n\n[http.tokens]\n"{digest}" = "operator"\n'
    )
    return {
        "config": config,
        "db": f"sqlite:///{db}",
        "http": http_port,
        "repo": tmp_path / "repo",
        "token": token,
    }


def _start(config) -> subprocess.Popen[bytes]:
    log = (config["config"].parent / "server.log").open("ab")  # never a pipe nobody reads
    proc = subprocess.Popen(
        [sys.executable, "-m", "edgec", "server", "run", "--config", str(config["config"])],
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
    )

    def http_up() -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{config['http']}/openapi.json", timeout=1):
                return True
        except OSError:
            return False

    assert _wait(http_up, 30), (config["config"].parent / "server.log").read_text()
    time.sleep(0.5)  # the MQTT subscription
    return proc


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    proc.wait(timeout=20)


def _device_row(config):
    registry = Registry.open(config["db"])
    try:
        return registry.get("dev-a")
    finally:
        registry.engine.dispose()


def test_reports_land_and_survive_a_server_restart(broker, server_config):  # noqa: F811
    topics = device_topics("lab", "dev-a")
    server = _start(server_config)
    device = Client("dev-a", broker["passwords"]["dev-a"], broker["port"])
    assert device.ok()
    device.client.publish(
        topics["state"], json.dumps({"status": "serving", "installed": "digits/1.0.0"}), qos=1, retain=True
    ).wait_for_publish(5)
    assert _wait(lambda: _device_row(server_config).status == "serving")
    assert _device_row(server_config).installed_release == "digits/1.0.0"
    _stop(server)
    # the server is down: the device reports anyway (QoS 1); the broker keeps it for the
    # server's persistent session
    window = {"window_s": 60, "requests": 1200, "errors": 0, "p95_ms": 4.2, "drift": "ok"}
    device.client.publish(topics["telemetry"], json.dumps(window), qos=1).wait_for_publish(5)
    time.sleep(0.5)
    server = _start(server_config)
    assert _wait(lambda: _device_row(server_config).telemetry is not None)
    assert _device_row(server_config).telemetry["p95_ms"] == 4.2
    device.close()
    _stop(server)


def test_malformed_reports_are_dropped_and_the_server_keeps_serving(broker, server_config):  # noqa: F811
    topics = device_topics("lab", "dev-a")
    server = _start(server_config)
    device = Client("dev-a", broker["passwords"]["dev-a"], broker["port"])
    assert device.ok()
    garbage = [b"\x00\xff", b"{}", b'{"status": 5}', b"[" * 3000, b'{"window_s": "x"}', b"9" * 70000]
    for n in range(2000):
        payload = garbage[n % len(garbage)]
        topic = topics["telemetry"] if n % 2 else topics["state"]
        device.client.publish(topic, payload, qos=0)
    time.sleep(2)
    device.client.publish(topics["state"], json.dumps({"status": "still-here"}), qos=1).wait_for_publish(5)
    assert _wait(lambda: _device_row(server_config).status == "still-here", 20)
    assert server.poll() is None  # still running
    assert "dropped a report" in (server_config["config"].parent / "server.log").read_text()
    device.close()
    _stop(server)


def test_operator_assigns_a_release_and_the_device_gets_a_signed_retained_document(
    broker,  # noqa: F811
    server_config,
    bundle,
):
    repo = ImageRepository(server_config["repo"], keys=server_config["repo"].parent / "keys")
    repo.publish([bundle], PASS)
    server = _start(server_config)
    api = ("--server", f"http://127.0.0.1:{server_config['http']}", "--token", server_config["token"])
    result = run_edgec("fleet", "assign", "dev-b", "model:1.0.0", *api)
    assert result.returncode == 0, result.stderr
    assert "director document 1" in result.stdout
    # the device connects afterwards and still gets it: the document is retained
    device = Client("dev-b", broker["passwords"]["dev-b"], broker["port"])
    assert device.ok()
    desired = device_topics("lab", "dev-b")["desired"]
    device.client.subscribe(desired, qos=1)
    assert _wait(lambda: any(topic == desired for topic, _ in device.messages))
    envelope = SignedDirectorDocument.model_validate_json(device.messages[0][1])
    state = DirectorState(key=repo.director_key(), device="dev-b", profile="x86-64-cpu")
    _, document = state.accept(envelope, dt.datetime.now(dt.UTC))
    signed = {path: info for path, info in repo.load("targets").signed.targets.items()}
    assert {f.path for f in document.files} == set(signed)
    assert all(signed[f.path].hashes["sha256"] == f.sha256 for f in document.files)
    listed = run_edgec("fleet", "ls", "--json", *api)
    assert listed.returncode == 0, listed.stderr
    assert {d["id"]: d["desired_release"] for d in listed.json()}["dev-b"] == "model:1.0.0"
    # a device of another profile: refused with the reason, nothing published
    refused = run_edgec("fleet", "assign", "dev-a", "model:1.0.0", *api)
    assert refused.returncode == 4
    assert "no bundle for profile raspberry-pi-4" in refused.stderr
    unknown = run_edgec("fleet", "assign", "dev-z", "model:1.0.0", *api)
    assert unknown.returncode == 4
    assert "404" in unknown.stderr
    wrong_token = run_edgec("fleet", "assign", "dev-b", "model:1.0.0", api[0], api[1], "--token", "nope")
    assert wrong_token.returncode == 4
    assert "401" in wrong_token.stderr
    device.close()
    _stop(server)


def test_a_window_sent_twice_or_late_does_not_replace_a_newer_one(broker, server_config):  # noqa: F811
    topics = device_topics("lab", "dev-a")
    server = _start(server_config)
    device = Client("dev-a", broker["passwords"]["dev-a"], broker["port"])
    assert device.ok()

    def send(seq: int, p95: float, ended: str) -> None:
        window = {"window_s": 60, "requests": 10, "p95_ms": p95, "seq": seq, "ended_at": ended}
        device.client.publish(topics["telemetry"], json.dumps(window), qos=1).wait_for_publish(5)

    send(7, 4.2, "2026-11-29T10:07:00+00:00")
    assert _wait(lambda: (_device_row(server_config).telemetry or {}).get("seq") == 7)
    send(6, 9.9, "2026-11-29T10:06:00+00:00")  # late
    send(7, 9.9, "2026-11-29T10:07:00+00:00")  # again
    # a report after them on the same connection arrives after them: once it is in, they are
    barrier = device.client.publish(topics["state"], json.dumps({"status": "barrier"}), qos=1)
    barrier.wait_for_publish(5)
    assert _wait(lambda: _device_row(server_config).status == "barrier")
    assert _device_row(server_config).telemetry["p95_ms"] == 4.2
    send(0, 1.5, "2026-11-29T10:09:00+00:00")  # the device's counter restarted: newer, lower seq
    assert _wait(lambda: (_device_row(server_config).telemetry or {}).get("seq") == 0)
    assert _device_row(server_config).telemetry["p95_ms"] == 1.5
    device.close()
    _stop(server)
