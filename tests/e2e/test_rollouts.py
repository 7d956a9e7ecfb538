"""Rollouts on 50 simulated devices: a real Mosquitto with the generated ACL, the real server
process, and ``sim``'s devices, each a real MQTT client running the agent's install
pipeline (director, TUF, chunked fetch, probation) with a stand-in runtime whose latency is
set per version. Driven through ``edgec rollout`` as an operator would."""

from __future__ import annotations

import time

import pytest

from sim import SimFleet
from tests._fleet import Fleet, simulate, up
from tests._services import needs_mosquitto, wait_for

pytestmark = [pytest.mark.slow, needs_mosquitto]

DEVICES = 50
# 3.0.0 answers right but twice as slowly: p95 doubles against the control cohort. The
# stand-in runtime does not sleep (50 devices' probation probes on 2 cores would measure the
# machine's scheduling, not the model); the telemetry windows carry the latencies set here.
BEHAVIOURS = {
    "*": {"latency_ms": 5.0, "latency_spread": 0.1, "infer_sleeps": False},
    "3.0.0": {"latency_ms": 10.0},
}


@pytest.fixture
def simulated(fleet: Fleet, releases):
    configs = fleet.add_sim_devices(DEVICES, "field")
    up(fleet)
    fleet.publish(*(releases[v] for v in ("1.0.0", "2.0.0", "3.0.0")))
    sim = simulate(fleet, configs, BEHAVIOURS)
    yield sim
    sim.stop()


def _finish(fleet: Fleet, rollout_id: str, timeout_s: float = 120) -> dict:
    assert wait_for(
        lambda: fleet.rollout_status(rollout_id)["state"] in ("completed", "aborted"), timeout_s, step_s=0.5
    ), fleet.rollout_status(rollout_id)
    return fleet.rollout_status(rollout_id)


def _on(fleet: Fleet, release: str) -> int:
    return sum(1 for d in fleet_devices(fleet) if d["installed_release"] == release)


def fleet_devices(fleet: Fleet) -> list[dict]:
    from ota_server.registry import Registry

    registry = Registry.open(fleet.db)
    try:
        return [d.as_dict() for d in registry.devices(group="field")]
    finally:
        registry.engine.dispose()


WAVES = ("--waves", "10%,50%,100%", "--bake", "3s", "--abort-if", "p95_ms>1.5*control")


def test_rollouts_on_fifty_simulated_devices(fleet: Fleet, simulated: SimFleet):
    # the first release, everywhere at once
    first = _finish(
        fleet, fleet.rollout("digits:1.0.0", "--group", "field", "--waves", "100%", "--bake", "1s")
    )
    assert first["state"] == "completed", first
    assert simulated.wait_for_release("digits:1.0.0", DEVICES, 60)

    # a good release goes through every wave
    good = _finish(fleet, fleet.rollout("digits:2.0.0", "--group", "field", *WAVES))
    assert good["state"] == "completed", good["reason"]
    assert [w["devices"] for w in good["waves"]] == [5, 20, 25]
    assert all(w.get("installed") == w["devices"] for w in good["waves"])
    assert simulated.wait_for_release("digits:2.0.0", DEVICES, 60)

    # a release that doubles p95 aborts after the first wave; every canary goes back
    bad = _finish(fleet, fleet.rollout("digits:3.0.0", "--group", "field", *WAVES))
    assert bad["state"] == "aborted"
    assert bad["wave"] == 1
    assert "p95_ms>1.5*control" in bad["reason"]
    rule = next(r for r in bad["rules"] if r["rule"] == "p95_ms>1.5*control")
    assert rule["canary"] > 1.8 * rule["control"]  # the figures behind the verdict
    canaries = [d["device"] for d in bad["devices"] if d["wave"] == 1]
    assert len(canaries) == 5
    assert all(d["state"] == "rolled-back" for d in bad["devices"] if d["wave"] == 1)
    assert all(d["state"] == "waiting" for d in bad["devices"] if d["wave"] != 1)
    assert wait_for(lambda: _on(fleet, "digits:2.0.0") == DEVICES, 60)  # the canaries are back

    # pause holds the next wave; resume carries on
    paused_id = fleet.rollout("digits:1.0.0", "--group", "field", "--waves", "10%,100%", "--bake", "1s")
    fleet.steer(paused_id, "pause")
    time.sleep(5)
    paused = fleet.rollout_status(paused_id)
    assert paused["state"] == "paused"
    assert not any(d["state"] != "waiting" for d in paused["devices"] if d["wave"] == 2)
    fleet.steer(paused_id, "resume")
    assert _finish(fleet, paused_id)["state"] == "completed"
    assert wait_for(lambda: _on(fleet, "digits:1.0.0") == DEVICES, 60)

    # the server restarts in the middle of a rollout: it carries on where it stood
    interrupted_id = fleet.rollout("digits:2.0.0", "--group", "field", *WAVES)
    assert wait_for(lambda: fleet.rollout_status(interrupted_id)["wave"] == 2, 60, step_s=0.2)
    fleet.stop_server()
    fleet.start_server()
    done = _finish(fleet, interrupted_id)
    assert done["state"] == "completed", done["reason"]
    assert all(d["state"] == "installed" for d in done["devices"])
    assert wait_for(lambda: _on(fleet, "digits:2.0.0") == DEVICES, 60)
