"""Reports written in batches (``ota_server._report_writer``) on SQLite and a real PostgreSQL:
each message is acknowledged only once what it says is in the registry, an older state taken
later does not overwrite a newer one, a window sent twice is kept once."""

from __future__ import annotations

import json
import threading

import pytest

from edgec.reports import DeviceState, Event, Telemetry
from ota_server._report_writer import Received, ReportWriter
from ota_server.registry import Registry

AT = "2026-12-02T10:00:00.000+00:00"


@pytest.fixture
def registry(db_url):
    registry = Registry.open(db_url)
    for device in ("dev-a", "dev-b"):
        registry.add_device(device, "lab", "g", "x86-64-cpu")
    yield registry
    registry.engine.dispose()


class Acks:
    """Acknowledgements, each checking what the registry holds at that moment."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self.seen: list[tuple[str, object]] = []

    def ack_for(self, device: str, check=None):
        def ack() -> None:
            self.seen.append((device, check(self.registry.get(device)) if check else None))

        return ack


def _state(status: str, installed: str | None = None, at: str | None = None) -> DeviceState:
    return DeviceState.model_validate({"status": status, "installed": installed, "at": at})


def _window(seq: int, ended_at: str) -> Telemetry:
    return Telemetry.model_validate(
        {"seq": seq, "model": "digits:1.0.0", "ended_at": ended_at, "window_s": 1.0, "requests": 10}
    )


def _writer(registry: Registry, events: list | None = None, drops: list | None = None) -> ReportWriter:
    return ReportWriter(
        registry,
        on_events=(events if events is not None else []).extend,
        drop=lambda topic, why, reason: (drops if drops is not None else []).append(reason),
    )


def test_a_report_is_acknowledged_only_once_it_is_in_the_registry(registry):
    acks, events = Acks(registry), []
    writer = _writer(registry, events)
    installed = _state("serving", "digits:1.0.0", AT)
    writer.put(Received("t", "dev-a", installed, AT, acks.ack_for("dev-a", lambda d: d.installed_release)))
    window = _window(1, AT)
    writer.put(
        Received("t", "dev-b", window, AT, acks.ack_for("dev-b", lambda d: (d.telemetry or {}).get("seq")))
    )
    event = Event.model_validate({"event": "committed", "release": "digits:1.0.0", "at": AT})
    writer.put(Received("t", "dev-a", event, AT, acks.ack_for("dev-a")))
    writer.drain()
    assert acks.seen == [("dev-a", "digits:1.0.0"), ("dev-b", 1), ("dev-a", None)]
    assert [(device, e["event"]) for device, e in events] == [("dev-a", "committed")]
    assert registry.get("dev-a").last_seen == AT
    assert registry.windows(["dev-b"], "0")["dev-b"][0]["seq"] == 1


def test_an_older_state_taken_later_does_not_overwrite_a_newer_one(registry):
    writer = _writer(registry)
    acks = Acks(registry)
    newer = _state("serving", "digits:2.0.0", "2026-12-02T10:00:02.000+00:00")
    older = _state("installing", "digits:1.0.0", "2026-12-02T10:00:01.000+00:00")
    writer.put(Received("t", "dev-a", newer, AT, acks.ack_for("dev-a")))
    writer.drain()
    writer.put(Received("t", "dev-a", older, AT, acks.ack_for("dev-a")))  # another replica's, late
    writer.drain()
    device = registry.get("dev-a")
    assert (device.status, device.installed_release) == ("serving", "digits:2.0.0")
    # in one batch, in the wrong order: the newer wins too
    writer.put(Received("t", "dev-b", newer, AT, acks.ack_for("dev-b")))
    writer.put(Received("t", "dev-b", older, AT, acks.ack_for("dev-b")))
    writer.drain()
    assert registry.get("dev-b").status == "serving"
    # the broker's will carries no time: offline always applies, and the next state after it
    writer.put(Received("t", "dev-a", _state("offline"), AT, acks.ack_for("dev-a")))
    writer.drain()
    assert registry.get("dev-a").status == "offline"
    writer.put(Received("t", "dev-a", newer, AT, acks.ack_for("dev-a")))  # sent again on reconnecting
    writer.drain()
    assert registry.get("dev-a").status == "serving"
    assert len(acks.seen) == 6  # every one acknowledged, written or not


def test_a_window_delivered_twice_is_kept_once_and_an_old_one_is_not_the_latest(registry):
    writer = _writer(registry)
    acks = Acks(registry)
    for seq, ended in ((2, "2026-12-02T10:00:02.000+00:00"), (2, "2026-12-02T10:00:02.000+00:00")):
        writer.put(Received("t", "dev-a", _window(seq, ended), AT, acks.ack_for("dev-a")))
    writer.put(Received("t", "dev-a", _window(1, "2026-12-02T10:00:01.000+00:00"), AT, acks.ack_for("dev-a")))
    writer.drain()
    kept = registry.windows(["dev-a"], "0")["dev-a"]
    assert sorted(w["seq"] for w in kept) == [1, 2]
    assert registry.get("dev-a").telemetry["seq"] == 2
    assert len(acks.seen) == 3


def test_an_unknown_devices_report_is_dropped_and_the_rest_written(registry):
    drops: list[str] = []
    writer = _writer(registry, drops=drops)
    acks = Acks(registry)
    writer.put(Received("t", "ghost", _window(1, AT), AT, lambda: acks.seen.append(("ghost", None))))
    writer.put(Received("t", "dev-a", _state("serving", None, AT), AT, acks.ack_for("dev-a")))
    writer.drain()
    assert drops == ["unknown device"]
    assert sorted(device for device, _ in acks.seen) == ["dev-a", "ghost"]  # both acknowledged
    assert registry.get("dev-a").status == "serving"


def test_the_writer_thread_batches_and_writes_everything_before_it_stops(registry):
    writer = _writer(registry)
    acked = threading.Semaphore(0)
    writer.start()
    for seq in range(500):
        ended = f"2026-12-02T10:{seq // 60:02d}:{seq % 60:02d}.000+00:00"
        writer.put(Received("t", "dev-a", _window(seq, ended), AT, acked.release))
    writer.stop()
    assert all(acked.acquire(timeout=0) for _ in range(500))
    assert writer.batches < 500  # many per transaction
    figures = json.dumps(registry.get("dev-a").telemetry)
    assert json.loads(figures)["seq"] == 499
    assert len(registry.windows(["dev-a"], "0")["dev-a"]) == 500


def test_a_device_whose_clock_went_back_is_not_frozen_by_its_own_future_state(registry):
    writer = _writer(registry)
    acks = Acks(registry)
    # a Pi without a real-time clock booted hours ahead, then NTP set it back
    ahead = _state("serving", "digits:1.0.0", "2026-12-02T14:00:00.000+00:00")
    corrected = _state("installing", "digits:1.0.0", "2026-12-02T10:00:00.000+00:00")
    writer.put(Received("t", "dev-a", ahead, AT, acks.ack_for("dev-a")))
    writer.drain()
    writer.put(Received("t", "dev-a", corrected, AT, acks.ack_for("dev-a")))
    writer.drain()
    assert registry.get("dev-a").status == "installing"


def test_state_times_in_other_offsets_compare_as_the_same_moment(registry):
    writer = _writer(registry)
    acks = Acks(registry)
    newer = _state("serving", None, "2026-12-02T11:00:02+01:00")  # 10:00:02 UTC
    older = _state("installing", None, "2026-12-02T10:00:01.000Z")
    writer.put(Received("t", "dev-a", newer, AT, acks.ack_for("dev-a")))
    writer.drain()
    writer.put(Received("t", "dev-a", older, AT, acks.ack_for("dev-a")))
    writer.drain()
    assert registry.get("dev-a").status == "serving"
