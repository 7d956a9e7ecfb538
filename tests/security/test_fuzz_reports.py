"""Property-based fuzzing of the server's report ingestion.

Generated topics and payloads (random bytes, deep and huge JSON, state, telemetry and event
documents of the right shape with hostile values and extra fields) are handed to the
server's MQTT message callback exactly as paho hands it a message, on an ``OtaServer`` with a
real registry (not connected to a broker: the callback is the whole ingestion path). The
property: the callback never raises, every report is either kept or dropped and counted
under a known reason (never "failed"), what is kept is bounded and strict JSON, the registry
stays readable, and a valid report afterwards still lands.

The example budget comes from tests/security/conftest.py (``ci`` in make test, 10,000 in
``make fuzz``).
"""

from __future__ import annotations

import json
import time
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from hypothesis import given
from hypothesis import strategies as st
from sqlalchemy import text

from ota_server.ingest import ReportLimits
from ota_server.repository import ImageRepository
from ota_server.server import OtaServer, ServerConfig
from tests.security.test_image_repository import PASS

LIMITS = ReportLimits()
KNOWN_REASONS = {"bad topic", "too large", "not JSON", "invalid", "rate limited", "unknown device"}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fuzz-reports")
    ImageRepository.init(tmp / "repo", PASS, {}, keys=tmp / "keys")
    (tmp / "mqtt.secret").write_text("unused\n")
    config = ServerConfig.model_validate(
        {
            "repo": tmp / "repo",
            "db": f"sqlite:///{tmp / 'fleet.db'}",
            "mqtt": {"password_file": tmp / "mqtt.secret"},
        }
    )
    server = OtaServer(config)  # never started: no broker, no HTTP; the callback is what we test
    server.registry.add_device("dev-a", "lab", "g", "x86-64-cpu")
    server.registry.add_device("dev-b", "lab", "g", "raspberry-pi-4")
    yield server
    server.registry.engine.dispose()


class _NoBroker:
    """The receiving connection: reports are acknowledged once written (or dropped)."""

    def ack(self, mid: int, qos: int) -> None:
        pass


def _message(topic: str, payload: bytes) -> mqtt.MQTTMessage:
    message = mqtt.MQTTMessage(topic=topic.encode())
    message.payload = payload
    return message


# -- topics and payloads --------------------------------------------------------------------
@st.composite
def _pick(draw: st.DrawFn, valid: st.SearchStrategy[Any], hostile: st.SearchStrategy[Any]) -> Any:
    return draw(valid if draw(st.integers(min_value=0, max_value=7)) else hostile)


def _mostly(valid: st.SearchStrategy[Any], hostile: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """``valid`` seven times in eight: documents that get past one check meet the next."""
    return _pick(valid, hostile)


_TEXT = st.text(max_size=20)
_VALID_TOPIC = st.builds(
    "edgec/v1/lab/devices/{}/{}".format,
    st.sampled_from(["dev-a", "dev-b"]),
    st.sampled_from(["state", "telemetry", "events"]),
)
_TOPIC = _mostly(
    _VALID_TOPIC,
    st.one_of(
        st.builds(
            "edgec/v1/{}/devices/{}/{}".format,
            st.sampled_from(["lab", "other", ""]) | _TEXT,
            st.sampled_from(["dev-a", "dev-z", "+", "#", ""]) | _TEXT,
            st.sampled_from(["state", "telemetry", "events", "desired", "request"]) | _TEXT,
        ),
        st.builds("edgec/v1/lab/devices/dev-a/{}/{}".format, _TEXT, _TEXT),
        _TEXT,
    ),
)
_SCALAR = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**80), max_value=2**80)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=40)
)
_JSON = st.recursive(
    _SCALAR,
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5)
    ),
    max_leaves=20,
)
_HOSTILE = _JSON | st.integers(min_value=0, max_value=70_000).map(lambda n: "x" * n)
_FLOAT = _mostly(
    st.floats(min_value=0, max_value=1e6), st.floats(allow_nan=True, allow_infinity=True) | _HOSTILE
)
_COUNT = _mostly(
    st.integers(min_value=0, max_value=10**6), st.integers(min_value=-5, max_value=2**70) | _HOSTILE
)
_EXTRAS = _mostly(
    st.dictionaries(st.text(max_size=10), _SCALAR, max_size=4),
    st.dictionaries(
        st.text(max_size=10) | st.integers(min_value=60, max_value=200).map(lambda n: "k" * n),
        _HOSTILE,
        max_size=40,
    ),
)
_STATE = st.fixed_dictionaries(
    {"status": _mostly(st.sampled_from(["serving", "error"]), _HOSTILE)},
    optional={"installed": _mostly(st.just("model:1.0.0"), _HOSTILE), "detail": _HOSTILE},
)
_TELEMETRY = st.builds(
    lambda fields, extras: {**extras, **fields},
    st.fixed_dictionaries(
        {"window_s": _FLOAT, "requests": _COUNT},
        optional={
            "errors": _COUNT,
            "p95_ms": _FLOAT,
            "seq": _COUNT,
            "ended_at": _mostly(st.text(max_size=30), _HOSTILE),
            "model": _mostly(st.just("model:1.0.0"), _HOSTILE),
            "psi": _mostly(st.dictionaries(st.text(max_size=30), st.floats(0, 10), max_size=5), _HOSTILE),
            "drift": _mostly(st.sampled_from(["ok", "warn", "drift"]), _HOSTILE),
        },
    ),
    _EXTRAS,
)
_EVENT = st.builds(
    lambda fields, extras: {**extras, **fields},
    st.fixed_dictionaries(
        {"event": _mostly(st.sampled_from(["committed", "refused", "error"]), _HOSTILE)},
        optional={
            "release": _mostly(st.just("model:1.0.0"), _HOSTILE),
            "detail": _mostly(st.text(max_size=100), _HOSTILE),
            "step": _mostly(st.just("probation"), _HOSTILE),
            "at": _HOSTILE,
        },
    ),
    _EXTRAS,
)


def _encode(value: Any) -> bytes:
    return json.dumps(value, allow_nan=True).encode()  # NaN and Infinity tokens, on purpose


_PAYLOAD = st.one_of(
    st.binary(max_size=300),
    st.integers(min_value=1, max_value=70_000).map(lambda n: b"[" * n),
    st.integers(min_value=1, max_value=20_000).map(lambda n: b'{"a":' * n),
    _JSON.map(_encode),
    _STATE.map(_encode),
    _TELEMETRY.map(_encode),
    _TELEMETRY.map(_encode),
    _EVENT.map(_encode),
)


def _strict(text: str) -> Any:
    def refuse(name: str) -> Any:
        raise AssertionError(f"{name} stored")

    return json.loads(text, parse_constant=refuse)


def test_report_ingestion_keeps_or_counts_every_report(server):
    @given(topic=_TOPIC, payload=_PAYLOAD)
    def fuzz(topic: str, payload: bytes) -> None:
        before = server.dropped
        server._on_report(_NoBroker(), None, _message(topic, payload))
        server.writer.drain()  # the writer thread's work, here
        assert server.dropped - before in (0, 1)
        assert set(server.drops) <= KNOWN_REASONS, server.drops

    started = time.monotonic()
    fuzz()
    elapsed = time.monotonic() - started
    # what was kept is bounded, strict JSON; the registry reads
    with server.registry.engine.connect() as conn:
        rows = conn.execute(text("SELECT device_id, figures FROM telemetry_windows")).all()
    assert {device for device, _ in rows} <= {"dev-a", "dev-b"}
    for _, figures in rows:
        assert len(figures) <= LIMITS.max_telemetry_bytes
        _strict(figures)
    for device in server.registry.devices():
        _strict(json.dumps(device.as_dict()))
        assert len(device.status) <= 64
    for device in ("dev-a", "dev-b"):  # at most the token bucket's worth per device
        kept = sum(1 for d, _ in rows if d == device)
        assert kept <= LIMITS.window_burst + LIMITS.windows_per_s * elapsed + 1
    # still ingesting
    server._on_report(
        _NoBroker(), None, _message("edgec/v1/lab/devices/dev-b/state", b'{"status": "still-here"}')
    )
    server.writer.drain()
    assert server.registry.get("dev-b").status == "still-here"
