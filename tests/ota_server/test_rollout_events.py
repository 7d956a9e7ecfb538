"""Device events settle a rollout's members by their ``EventKind``, read as the server reads
them (``ota_server.ingest.parse_report``, then ``model_dump``): ``committed`` installs,
``refused`` fails with the step it names; a newer agent's kind is kept by the reader and
ignored by the scheduler, and a newer step is still worded into the failure."""

from __future__ import annotations

import json

import pytest

from edgec.reports import Event, EventKind
from ota_server.ingest import ReportLimits, parse_report
from ota_server.registry import Registry
from ota_server.rollouts import Rollouts
from tests.ota_server.test_rollouts import Clock, Devices, _spec

RELEASE = "digits:2.0.0"


@pytest.fixture
def registry(tmp_path):
    registry = Registry.open(f"sqlite:///{tmp_path / 'fleet.db'}")
    for n in range(3):
        registry.add_device(f"pi-{n:02d}", "lab", "field", "raspberry-pi-4")
        registry.update(f"pi-{n:02d}", installed_release="digits:1.0.0")
    yield registry
    registry.engine.dispose()


def _received(**fields) -> dict:
    """An event as the server hands it to the scheduler."""
    event = parse_report("events", json.dumps(fields).encode(), ReportLimits())
    assert isinstance(event, Event)
    return event.model_dump()


def _members(rollouts: Rollouts, rollout_id: str) -> dict[str, tuple[str, str | None]]:
    return {d["device"]: (d["state"], d["detail"]) for d in rollouts.status(rollout_id)["devices"]}


def test_a_newer_agents_event_kind_is_ignored_and_known_kinds_settle_members(registry):
    clock = Clock()
    devices = Devices(registry, clock, {"1.0.0": 10.0, "2.0.0": 10.0}, silent={"pi-00", "pi-01", "pi-02"})
    rollouts = Rollouts(registry, devices.assign, lambda release: {"raspberry-pi-4"}, clock)
    rollout_id = rollouts.start(_spec(waves=["100%"], abort_if=["install_failure_rate>0.9"]), "op")["id"]
    rollouts.tick()
    assert {state for state, _ in _members(rollouts, rollout_id).values()} == {"assigned"}

    quarantined = _received(event="quarantined", release=RELEASE, detail="tpm says no")
    assert quarantined["event"] == "quarantined"
    assert not isinstance(quarantined["event"], EventKind)
    rollouts.on_event("pi-00", quarantined)
    assert _members(rollouts, rollout_id)["pi-00"][0] == "assigned"  # kept by the reader, ignored here

    rollouts.on_event("pi-00", _received(event="committed", release=RELEASE, requests=5))
    rollouts.on_event(
        "pi-01", _received(event="refused", release=RELEASE, step="self-test", detail="outputs")
    )
    rollouts.on_event("pi-02", _received(event="refused", release=RELEASE, step="attest", detail="no quote"))
    members = _members(rollouts, rollout_id)
    assert members["pi-00"][0] == "installed"
    assert members["pi-01"] == ("failed", "refused at self-test: outputs")
    assert members["pi-02"] == ("failed", "refused at attest: no quote")  # a newer step, worded as sent
