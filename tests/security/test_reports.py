"""Device reports into a real ``edgec server run`` process through a real Mosquitto: a device
with its own credentials tries to fill the registry, the log, or the operator's screens."""

from __future__ import annotations

import json
import sqlite3
import time

import pytest

from edgec.topics import device_topics
from ota_server.ingest import ReportLimits
from tests.ota_server.test_broker_acl import Client, broker  # noqa: F401  (fixture)
from tests.ota_server.test_server_process import _device_row, _start, _stop, _wait
from tests.ota_server.test_server_process import server_config as server_config  # noqa: PLC0414

LIMITS = ReportLimits()


@pytest.fixture
def fleet(broker, server_config):  # noqa: F811
    """The server, and dev-a and dev-b connected with their own credentials."""
    proc = _start(server_config)
    devices = {d: Client(d, broker["passwords"][d], broker["port"]) for d in ("dev-a", "dev-b")}
    assert all(device.ok() for device in devices.values())
    yield {"config": server_config, "devices": devices, "proc": proc}
    for device in devices.values():
        device.close()
    _stop(proc)
    assert "Traceback" not in _log(server_config)


def _send(fleet, device: str, kind: str, payload: bytes | str) -> None:
    topic = device_topics("lab", device)[kind]
    fleet["devices"][device].client.publish(topic, payload, qos=1).wait_for_publish(10)


def _barrier(fleet) -> None:
    """Everything dev-a sent before is handled once this state of dev-a lands."""
    status = f"barrier-{time.monotonic_ns()}"
    _send(fleet, "dev-a", "state", json.dumps({"status": status}))
    assert _wait(lambda: _device_row(fleet["config"]).status == status, 30)


def _windows(fleet, device: str = "dev-a") -> list[dict]:
    db = sqlite3.connect(fleet["config"]["db"].removeprefix("sqlite:///"))
    try:
        rows = db.execute("SELECT figures FROM telemetry_windows WHERE device_id = ?", (device,)).fetchall()
    finally:
        db.close()
    return [json.loads(r[0]) for r in rows]


def _log(config) -> str:
    return (config["config"].parent / "server.log").read_text(errors="replace")


def _window(n: int, **extra) -> dict:
    return {
        "window_s": 60,
        "requests": 10,
        "seq": n,
        "ended_at": f"2026-01-01T00:00:{n % 60:02d}.{n:06d}",
        **extra,
    }


def test_telemetry_with_huge_extra_fields_is_dropped(fleet):
    _send(fleet, "dev-a", "telemetry", json.dumps(_window(1, junk="x" * 60_000)))  # under the old 64 KiB
    _send(fleet, "dev-a", "telemetry", json.dumps(_window(2, **{f"f{i}": i for i in range(100)})))
    _send(fleet, "dev-a", "telemetry", json.dumps(_window(3, **{"k" * 5000: 1})))
    _send(fleet, "dev-a", "telemetry", json.dumps(_window(4, nested={"a": {"b": [1, 2]}})))
    _send(fleet, "dev-a", "telemetry", json.dumps(_window(5, queue_depth=3, gpu="orin")))  # a few kept
    _barrier(fleet)
    assert [(w["seq"], w.get("queue_depth")) for w in _windows(fleet)] == [(5, 3)]
    assert _device_row(fleet["config"]).telemetry["gpu"] == "orin"


def test_telemetry_with_non_finite_figures_is_dropped(fleet):
    for figure in ("NaN", "Infinity", "1e999", "-1"):
        payload = json.dumps(_window(1)).replace('"requests": 10', f'"requests": 10, "p95_ms": {figure}')
        _send(fleet, "dev-a", "telemetry", payload)
    _barrier(fleet)
    assert _windows(fleet) == []
    assert _device_row(fleet["config"]).telemetry is None


@pytest.mark.slow
def test_telemetry_flood_is_rate_limited_per_device(fleet):
    """1,000 windows as fast as the broker takes them: the registry keeps the burst and the
    sustained rate, not the flood; another device is not held back."""
    started = time.monotonic()
    client = fleet["devices"]["dev-a"].client
    topic = device_topics("lab", "dev-a")["telemetry"]
    sent = [client.publish(topic, json.dumps(_window(n, note="y" * 200)), qos=1) for n in range(1000)]
    sent[-1].wait_for_publish(60)
    _barrier(fleet)
    elapsed = time.monotonic() - started
    kept = len(_windows(fleet))
    allowed = LIMITS.window_burst + LIMITS.windows_per_s * elapsed + 1
    assert LIMITS.window_burst <= kept <= allowed, (kept, elapsed)
    assert "rate limited" in _log(fleet["config"])
    _send(fleet, "dev-b", "telemetry", json.dumps(_window(1)))
    assert _wait(lambda: len(_windows(fleet, "dev-b")) == 1, 20)


def test_event_over_size_is_dropped(fleet):
    marker = "Z" * 30_000  # under the old 64 KiB cap, logged in full and handed to the rollouts
    _send(fleet, "dev-a", "events", json.dumps({"event": "error", "release": None, "detail": marker}))
    _send(fleet, "dev-b", "state", json.dumps({"status": "after"}))  # dev-a sent first
    assert _wait(lambda: "dropped a report" in _log(fleet["config"]), 20)
    time.sleep(0.5)
    assert _device_row(fleet["config"]).last_seen is None  # dev-a's event counted for nothing
    assert marker[:1000] not in _log(fleet["config"])
    assert "events report of 30,0" in _log(fleet["config"])


def test_event_with_an_untyped_shape_is_dropped(fleet):
    for event in (
        {"event": ["committed"], "release": "model:1.0.0"},
        {"event": "committed", "release": {"name": "model"}},
        {"release": "model:1.0.0"},
        {"event": "error", "detail": "x", **{f"figure{i}": i for i in range(50)}},
        {"event": "error", "step": "s" * 500},
    ):
        _send(fleet, "dev-a", "events", json.dumps(event))
    time.sleep(1.0)
    _send(fleet, "dev-b", "state", json.dumps({"status": "after"}))
    time.sleep(1.0)
    assert _device_row(fleet["config"]).last_seen is None
    # a well-formed event with a long detail is kept, its detail clipped
    _send(fleet, "dev-a", "events", json.dumps({"event": "error", "release": None, "detail": "d" * 3000}))
    assert _wait(lambda: _device_row(fleet["config"]).last_seen is not None, 20)


def test_state_with_an_overlong_status_is_dropped(fleet):
    _send(fleet, "dev-a", "state", json.dumps({"status": "serving", "installed": "model:1.0.0"}))
    assert _wait(lambda: _device_row(fleet["config"]).status == "serving", 20)
    _send(fleet, "dev-a", "state", json.dumps({"status": "s" * 3000, "installed": "model:1.0.0"}))
    _send(fleet, "dev-a", "state", json.dumps({"status": "ok", "installed": "i" * 3000}))
    _send(fleet, "dev-b", "state", json.dumps({"status": "after"}))
    time.sleep(1.5)
    row = _device_row(fleet["config"])
    assert (row.status, row.installed_release) == ("serving", "model:1.0.0")


def test_a_flood_of_bad_reports_logs_a_few_lines_not_one_each(fleet):
    client = fleet["devices"]["dev-a"].client
    topics = device_topics("lab", "dev-a")
    for n in range(2000):
        client.publish(topics["telemetry"] if n % 2 else topics["events"], b"[" * (n % 50 + 10), qos=0)
    _barrier(fleet)
    lines = _log(fleet["config"]).count("dropped a report")
    assert 1 <= lines <= 4, lines
