"""The rollout scheduler at fleet scale and across replicas: a tick's statements do not grow
with the wave, a batch of device events is one query and one transaction, and a scheduler
that dies while sending a wave leaves the rest to the next tick, whichever process runs it
(SQLite and PostgreSQL, a real registry)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from sqlalchemy import event, text

from edgec.director import Action
from edgec.rollout_spec import MemberState, RolloutSpec, RolloutState
from ota_server import rollouts as rollouts_module
from ota_server.registry import Registry
from ota_server.rollout_policy import Step, decide
from ota_server.rollouts import Rollouts
from tests.ota_server.test_rollout_policy import _progress
from tests.ota_server.test_rollouts import START, Clock

OLD, NEW = "digits:1.0.0", "digits:2.0.0"
ROOT = Path(__file__).resolve().parents[2]


def _fleet(url: str, size: int) -> Registry:
    """``size`` devices in group field, all on the old release (inserted in one statement)."""
    registry = Registry.open(url)
    rows = [
        {"id": f"d-{n:05d}", "f": "lab", "g": "field", "p": "raspberry-pi-4", "h": "x", "c": "2026", "r": OLD}
        for n in range(size)
    ]
    with registry.engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO devices (id, fleet, group_name, profile, password_hash, created_at, "
                "installed_release) VALUES (:id, :f, :g, :p, :h, :c, :r)"
            ),
            rows,
        )
    return registry


def _spec(**changes) -> RolloutSpec:
    base = {
        "release": NEW,
        "group": "field",
        "waves": ["50%", "100%"],
        "bake_s": 0,
        "abort_if": ["install_failure_rate>0.5"],
        "device_timeout_s": 3600,
    }
    return RolloutSpec.model_validate({**base, **changes})


class Sent:
    """Records every director document; devices in ``installs`` report the release at once."""

    def __init__(self, registry: Registry, installs: bool = True) -> None:
        self.registry = registry
        self.installs = installs
        self.documents: list[tuple[str, str, Action]] = []

    def __call__(self, device: str, release: str, action: Action, rollout: str) -> None:
        self.documents.append((device, release, action))
        if self.installs:
            self.registry.update(device, installed_release=release)

    def installs_of(self, release: str) -> list[str]:
        return [d for d, r, a in self.documents if a is Action.INSTALL and r == release]


def _statements(registry: Registry) -> list[str]:
    seen: list[str] = []
    event.listen(registry.engine, "before_cursor_execute", lambda _c, _cur, sql, *_: seen.append(sql))
    return seen


def _states(rollouts: Rollouts, rollout_id: str) -> dict[str, str]:
    return {d["device"]: d["state"] for d in rollouts.status(rollout_id)["devices"]}


# -- cost ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [40, 800])
def test_a_tick_costs_the_same_statements_for_a_wave_of_20_or_400_devices(db_url, size):
    registry = _fleet(db_url, size)
    sent = Sent(registry, installs=False)
    clock = Clock()
    rollouts = Rollouts(registry, sent, lambda release: {"raspberry-pi-4"}, clock)
    rollouts.start(_spec(bake_s=600), "op")
    seen = _statements(registry)

    rollouts.tick()  # sends wave 1: half the fleet
    assert len(sent.installs_of(NEW)) == size // 2
    batches = -(-(size // 2) // rollouts_module.SEND_BATCH)
    assert len(seen) <= 6 + batches, "the wave's states are written per batch, not per device"

    seen.clear()
    clock.advance(1)
    rollouts.tick()  # nobody answered yet
    assert len(seen) <= 4, f"a waiting tick reads the wave in a few queries, not per member: {seen}"

    with registry.engine.begin() as conn:  # every device of the wave installed, as ingest records it
        conn.execute(
            text(
                "UPDATE devices SET installed_release = :r "
                "WHERE id IN (SELECT device_id FROM rollout_devices WHERE state = 'assigned')"
            ),
            {"r": NEW},
        )
    seen.clear()
    clock.advance(1)
    rollouts.tick()  # settles the wave; the bake starts
    updates = [s for s in seen if s.lstrip().upper().startswith("UPDATE ROLLOUT_DEVICES")]
    assert len(updates) == 1, "a tick's settled members are one executemany"
    states = _states(rollouts, rollouts.list()[0]["id"])
    assert sum(1 for s in states.values() if s == "installed") == size // 2
    registry.engine.dispose()


def test_a_batch_of_events_settles_each_member_by_its_first_answer_in_one_query(db_url):
    registry = _fleet(db_url, 6)
    clock = Clock()
    rollouts = Rollouts(registry, Sent(registry, installs=False), lambda release: {"raspberry-pi-4"}, clock)
    rollout_id = rollouts.start(_spec(waves=["100%"]), "op")["id"]
    rollouts.tick()
    seen = _statements(registry)
    rollouts.on_events(
        [
            ("d-00000", {"event": "committed", "release": NEW}),
            ("d-00000", {"event": "refused", "release": NEW, "step": "verify", "detail": "late"}),
            ("d-00001", {"event": "refused", "release": NEW, "step": "self-test", "detail": "outputs"}),
            ("d-00002", {"event": "committed", "release": "digits:9.9.9"}),  # another release
            ("d-00003", {"event": "quarantined", "release": NEW}),  # a newer agent's kind
            ("d-00004", {"event": "committed"}),  # no release
        ]
    )
    selects = [s for s in seen if s.lstrip().upper().startswith("SELECT")]
    updates = [s for s in seen if s.lstrip().upper().startswith("UPDATE")]
    assert (len(selects), len(updates)) == (1, 2)  # one read; installed and failed: one statement each
    devices = {d["device"]: (d["state"], d["detail"]) for d in rollouts.status(rollout_id)["devices"]}
    assert devices["d-00000"] == ("installed", None), "the first answer counts, a later one is ignored"
    assert devices["d-00001"] == ("failed", "refused at self-test: outputs")
    assert {devices[d][0] for d in ("d-00002", "d-00003", "d-00004", "d-00005")} == {"assigned"}
    registry.engine.dispose()


def test_a_refusal_that_outruns_the_record_of_its_document_is_kept(db_url):
    """A device answers while the scheduler is still sending the wave (the batch's states are
    written after its documents): the refusal settles the waiting member, and the scheduler's
    record that it was sent does not overwrite it."""
    registry = _fleet(db_url, 4)
    clock = Clock()
    rollouts: Rollouts

    def fast_device(device: str, release: str, action: Action, rollout: str) -> None:
        refusal = {"event": "refused", "release": release, "step": "verify", "detail": "bad signature"}
        rollouts.on_event(device, refusal)

    rollouts = Rollouts(registry, fast_device, lambda release: {"raspberry-pi-4"}, clock)
    rollout_id = rollouts.start(_spec(waves=["100%"]), "op")["id"]
    rollouts.tick()
    assert set(_states(rollouts, rollout_id).values()) == {"failed"}
    rollouts.tick()  # nothing left to wait for: judged on 100% failures
    assert rollouts.status(rollout_id)["state"] == "aborted"
    registry.engine.dispose()


def test_a_device_removed_mid_wave_times_out_instead_of_stalling_the_tick(db_url):
    registry = _fleet(db_url, 4)
    clock = Clock()
    sent = Sent(registry, installs=False)
    rollouts = Rollouts(registry, sent, lambda release: {"raspberry-pi-4"}, clock)
    rollout_id = rollouts.start(_spec(waves=["100%"], abort_if=["install_failure_rate>0.9"]), "op")["id"]
    rollouts.tick()
    registry.remove_device("d-00000")
    for device in ("d-00001", "d-00002", "d-00003"):
        registry.update(device, installed_release=NEW)
    clock.advance(10)
    rollouts.tick()
    states = _states(rollouts, rollout_id)
    assert (states["d-00000"], states["d-00001"]) == ("assigned", "installed")
    clock.advance(3600)
    rollouts.tick()
    rollouts.tick()
    assert _states(rollouts, rollout_id)["d-00000"] == "timed-out"
    assert rollouts.status(rollout_id)["state"] == "completed"
    registry.engine.dispose()


# -- crash safety --------------------------------------------------------------------------------------
def test_a_wave_with_members_still_waiting_is_sent_again():
    half_sent = (MemberState.ASSIGNED, MemberState.INSTALLED, MemberState.WAITING)
    decision = decide(_progress(wave=1, bake_until=None, wave_states=half_sent), START)
    assert (decision.step, decision.wave) == (Step.START_WAVE, 1)
    paused = decide(_progress(state=RolloutState.PAUSED, wave=1, wave_states=half_sent), START)
    assert paused.step is Step.HOLD


class Interrupted(BaseException):
    """A process being stopped (KeyboardInterrupt, SystemExit): not an error a tick handles."""


def test_an_interrupted_wave_records_what_it_sent_and_the_next_scheduler_sends_only_the_rest(db_url):
    registry = _fleet(db_url, 40)
    clock = Clock()
    sent = Sent(registry)
    first = Rollouts(registry, sent, lambda release: {"raspberry-pi-4"}, clock)
    rollout_id = first.start(_spec(), "op")["id"]

    def dies_after_7(device: str, release: str, action: Action, rollout: str) -> None:
        if len(sent.documents) == 7:
            raise Interrupted
        sent(device, release, action, rollout)

    with pytest.raises(Interrupted):
        Rollouts(registry, dies_after_7, lambda release: {"raspberry-pi-4"}, clock).tick()
    assert sorted(d for d, s in _states_of(registry, rollout_id).items() if s == "assigned") == sorted(
        sent.installs_of(NEW)
    )

    replica = Rollouts(registry, sent, lambda release: {"raspberry-pi-4"}, clock)  # another process
    for _ in range(6):
        clock.advance(5)
        replica.tick()
    assert replica.status(rollout_id)["state"] == "completed"
    assert sorted(sent.installs_of(NEW)) == sorted(f"d-{n:05d}" for n in range(40)), "each sent once"
    registry.engine.dispose()


CHILD = textwrap.dedent(
    """
    import datetime as dt, os, sys
    from ota_server.registry import Registry
    from ota_server.rollouts import Rollouts

    url, log, die_after, now = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    registry = Registry.open(url)
    sent = []

    def assign(device, release, action, rollout):
        if len(sent) == die_after:
            os._exit(9)  # killed: no cleanup, no finally, no transaction committed
        sent.append(device)
        with open(log, "a") as f:
            f.write(f"{device} {release}\\n")
        registry.update(device, installed_release=release)

    Rollouts(registry, assign, lambda r: {"raspberry-pi-4"}, lambda: dt.datetime.fromisoformat(now)).tick()
    """
)


def _states_of(registry: Registry, rollout_id: str) -> dict[str, str]:
    with registry.engine.connect() as conn:
        rows = conn.execute(
            text("SELECT device_id, state FROM rollout_devices WHERE rollout_id = :r"), {"r": rollout_id}
        )
        return dict(rows.all())


def test_a_scheduler_killed_while_sending_wave_2_leaves_the_rest_to_the_next_replica(db_url, tmp_path):
    registry = _fleet(db_url, 60)
    clock = Clock()
    sent = Sent(registry)
    rollouts = Rollouts(registry, sent, lambda release: {"raspberry-pi-4"}, clock)
    rollout_id = rollouts.start(_spec(bake_s=60), "op")["id"]
    rollouts.tick()  # wave 1: 30 devices
    clock.advance(5)
    rollouts.tick()  # installed: the bake starts
    clock.advance(61)  # the bake is over: the next tick judges wave 1 and sends wave 2
    status = rollouts.status(rollout_id)
    assert (status["wave"], status["waves"][1].get("waiting")) == (1, 30)
    wave_2 = sorted(d["device"] for d in status["devices"] if d["wave"] == 2)

    log = tmp_path / "sent-by-the-killed-replica"
    child = subprocess.run(
        [sys.executable, "-c", CHILD, db_url, str(log), "11", clock().isoformat()],
        cwd=ROOT,
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert child.returncode == 9, child.stderr
    killed_sent = [line.split()[0] for line in log.read_text().splitlines()]
    assert len(killed_sent) == 11
    assert set(killed_sent) <= set(wave_2)
    after_kill = rollouts.status(rollout_id)
    assert after_kill["wave"] == 2, "the killed replica had moved the rollout to wave 2"
    assert {_states_of(registry, rollout_id)[d] for d in wave_2} == {"waiting"}, "nothing recorded"

    replica = Rollouts(registry, sent, lambda release: {"raspberry-pi-4"}, clock)
    for _ in range(4):
        replica.tick()
        clock.advance(61)
    assert replica.status(rollout_id)["state"] == "completed"
    states = _states_of(registry, rollout_id)
    assert {states[d] for d in wave_2} == {"installed"}
    assert sorted(sent.installs_of(NEW)) == sorted(states), "every member sent by the survivors"
    twice = set(killed_sent) & set(sent.installs_of(NEW))
    assert twice == set(killed_sent), "those the killed replica sent get a second document"
    registry.engine.dispose()


def test_a_rollouts_page_reads_the_telemetry_windows_at_most_every_few_seconds(db_url, monkeypatch):
    registry = _fleet(db_url, 40)
    rollouts = Rollouts(registry, Sent(registry), lambda _release: {"raspberry-pi-4"})
    rollout_id = rollouts.start(_spec(waves=["50%", "100%"]), "test")["id"]
    rollouts.tick()  # wave 1 sent and settled: half the group is the canary
    reads = []
    event.listen(
        registry.engine,
        "before_cursor_execute",
        lambda _c, _cur, sql, *_: reads.append(sql) if "telemetry_windows" in sql else None,
    )
    monkeypatch.setattr(rollouts_module, "VIEW_FIGURES_S", 0.5)
    for _ in range(5):  # five viewers at once: one read
        rollouts.status(rollout_id)
    assert len(reads) == 1
    time.sleep(0.6)
    rollouts.status(rollout_id)  # older than allowed: read again
    assert len(reads) == 2
    rollouts.judge(rollout_id)  # what the scheduler judges on is always read afresh
    assert len(reads) == 3
