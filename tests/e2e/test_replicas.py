"""Three server replicas on one PostgreSQL and one Mosquitto (shared subscriptions), a rollout
to 200 simulated devices, and the replica holding the scheduler's lease killed with ``kill -9``
in the middle of wave 2 and never restarted.

What must hold: another replica takes the lease within its bound and the rollout completes;
no report the broker carried is lost (every telemetry window the monitor saw is in the
registry, every device's last state is the one it sent, every install is settled by its
event); and no device is sent two different director documents with the same version."""

from __future__ import annotations

import json
import time
from collections import defaultdict

import pytest
from sqlalchemy import text

from ota_server.registry import Registry
from tests._fleet import FLEET, PASS, Fleet, down, simulate, up
from tests._services import needs_mosquitto, postgres_url, wait_for

pytestmark = [pytest.mark.slow, needs_mosquitto]

DEVICES = 200
LEASE_S = 3.0
RELEASE = "digits:1.0.0"
BEHAVIOURS = {"*": {"latency_ms": 4.0, "infer_sleeps": False}}


@pytest.fixture
def database():
    yield from postgres_url()


@pytest.fixture
def replicated(tmp_path, database):
    fleet = Fleet.create(tmp_path, fleet=FLEET, database=database, replicas=3, lease_s=LEASE_S)
    assert isinstance(fleet, Fleet)
    fleet.init_keys(PASS)
    yield fleet
    down(fleet)


def _holder(registry: Registry) -> str | None:
    with registry.engine.connect() as conn:
        row = conn.execute(text("SELECT holder, expires_at FROM leases WHERE name = 'rollouts'")).one()
    return row.holder if row.expires_at > time.time() else None


def _replica_number(name: str) -> int:
    return 1 if name == "edgec-server" else int(name.rsplit("-", 1)[1])


def test_rollout_completes_when_the_scheduler_replica_is_killed_mid_wave_two(replicated: Fleet, releases):
    fleet = replicated
    configs = fleet.add_sim_devices(DEVICES, "field")
    up(fleet)
    fleet.publish(releases["1.0.0"])
    registry = Registry.open(fleet.db)
    sim = simulate(fleet, configs, BEHAVIOURS)
    try:
        assert wait_for(lambda: _holder(registry) is not None, 10)
        rollout_id = fleet.rollout(RELEASE, "--group", "field", "--waves", "5%,30%,100%", "--bake", "2s")

        # the middle of wave 2: its documents are out, not every member has installed yet
        def in_wave_two() -> bool:
            status = fleet.rollout_status(rollout_id)
            wave = status["waves"][1]
            return status["wave"] == 2 and wave.get("installed", 0) < wave["devices"]

        assert wait_for(in_wave_two, 120, step_s=0.05), fleet.rollout_status(rollout_id)
        holder = _holder(registry)
        assert holder is not None
        victim = _replica_number(holder)
        fleet.kill9_replica(victim)
        killed_at = time.monotonic()

        # another replica takes the lease within lease_s plus one heartbeat (lease_s / 3)
        assert wait_for(lambda: _holder(registry) not in (None, holder), 2 * LEASE_S, step_s=0.1)
        took_over_s = time.monotonic() - killed_at
        assert took_over_s <= LEASE_S + LEASE_S / 3 + 1.0, took_over_s
        print(f"killed replica {victim} ({holder}); the lease moved in {took_over_s:.1f} s")
        survivor = _replica_number(_holder(registry) or "")
        api = fleet.replica_ports[survivor]
        fleet.http_port = api  # the operator's commands now go to a live replica

        # what an operator sees: the dead replica (once its heartbeat is stale) and the new scheduler
        def listed() -> dict[str, tuple[bool, bool]]:
            shown = fleet.edgec("server", "replicas", "--json", *fleet.api_args(), show=False).json()
            return {r["name"]: (r["alive"], r["holds_scheduler"]) for r in shown}

        assert wait_for(lambda: listed().get(holder) == (False, False), 2 * LEASE_S), listed()
        assert sum(held for _, held in listed().values()) == 1
        assert len(listed()) == 3

        assert wait_for(lambda: fleet.rollout_status(rollout_id)["state"] == "completed", 180, step_s=0.5), (
            fleet.rollout_status(rollout_id)
        )
        status = fleet.rollout_status(rollout_id)
        assert [w["devices"] for w in status["waves"]] == [10, 50, 140]
        # each member settled as installed (by its committed event or state), none timed out
        assert all(d["state"] == "installed" for d in status["devices"]), [
            d for d in status["devices"] if d["state"] != "installed"
        ][:5]
        assert sim.wait_for_release(RELEASE, DEVICES, 60)
        # the dead replica's session was drained by the new holder (it never came back)
        log = fleet.server_log(survivor).read_text()
        assert f"took over the broker session of dead replica login {holder}" in log
    finally:
        sim.stop()

    assert fleet.monitor is not None
    time.sleep(1.0)  # the last windows the simulator sent on its way out
    carried = fleet.monitor.messages[:]

    # no report lost: every telemetry window the broker carried is in the registry
    sent = {
        (topic.split("/")[4], json.loads(payload)["ended_at"])
        for topic, payload in carried
        if topic.endswith("/telemetry") and payload
    }
    assert len(sent) > DEVICES * 5  # windows kept flowing through the whole rollout

    def stored() -> set[tuple[str, str]]:
        with registry.engine.connect() as conn:
            return {tuple(r) for r in conn.execute(text("SELECT device_id, ended_at FROM telemetry_windows"))}

    assert wait_for(lambda: sent <= stored(), 30), sorted(sent - stored())[:5]
    # ... and each device's last state is the one it sent last
    last_state: dict[str, dict] = {}
    for topic, payload in carried:
        if topic.endswith("/state") and payload:
            last_state[topic.split("/")[4]] = json.loads(payload)

    def stale_states() -> list[tuple[str, str, str]]:
        devices = {d.id: d for d in registry.devices(group="field")}
        return [
            (d, devices[d].status, s["status"])
            for d, s in last_state.items()
            if devices[d].status != s["status"]
        ]

    assert wait_for(lambda: not stale_states(), 30), stale_states()[:5]
    assert all(d.installed_release == RELEASE for d in registry.devices(group="field"))

    # no device got two different director documents with the same version
    documents: dict[tuple[str, int], set[bytes]] = defaultdict(set)
    for topic, payload in carried:
        if topic.endswith("/desired") and payload:
            signed = json.loads(payload)["signed"]
            documents[(signed["device"], signed["version"])].add(payload)
    assert len({device for device, _ in documents}) == DEVICES
    assert all(len(payloads) == 1 for payloads in documents.values()), [
        key for key, payloads in documents.items() if len(payloads) > 1
    ]
    registry.engine.dispose()
