"""The rollout scheduler as a state machine: a real registry (SQLite and PostgreSQL), an
injected clock, and devices that answer director documents the way agents do (they report
the installed release and telemetry into the registry, as the server's ingest would)."""

from __future__ import annotations

import datetime as dt

import pytest

from edgec.director import Action
from edgec.errors import OptionError, UserInputError
from edgec.rollout_spec import RolloutSpec, parse_duration, parse_rule
from ota_server.registry import Registry
from ota_server.rollouts import Rollouts

START = dt.datetime(2026, 11, 29, 12, 0, tzinfo=dt.UTC)


class Clock:
    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> dt.datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += dt.timedelta(seconds=seconds)


class Devices:
    """Answers director documents as agents do (install, or stay silent), and every device that
    serves reports a telemetry window for its release whenever ``report`` is called."""

    def __init__(
        self, registry: Registry, clock: Clock, p95_ms: dict[str, float], silent: set[str] = frozenset()
    ) -> None:
        self.registry = registry
        self.clock = clock
        self.p95_ms = p95_ms
        self.silent = set(silent)
        self.quiet: set[str] = set()  # releases that serve no traffic (no telemetry)
        self.documents: list[tuple[str, str, Action, str]] = []

    def assign(self, device: str, release: str, action: Action, rollout: str) -> None:
        self.documents.append((device, release, action, rollout))
        self.registry.update(device, desired_release=release)
        if device not in self.silent:
            self.registry.update(device, installed_release=release, status="serving")

    def report(self) -> None:
        now = self.clock().isoformat(timespec="milliseconds")
        for device in self.registry.devices(group="field"):
            release = device.installed_release
            if release is None or release in self.quiet or device.profile != "raspberry-pi-4":
                continue
            p95 = self.p95_ms[release.partition(":")[2]]
            window = {
                "model": release,
                "requests": 100,
                "errors": 0,
                "p95_ms": p95,
                "drift": "ok",
                "ended_at": now,
            }
            self.registry.add_window(device.id, window, now)
            self.registry.update(device.id, telemetry=window)

    def sent(self, action: Action) -> list[str]:
        return [d for d, _, a, _ in self.documents if a is action]


@pytest.fixture
def fleet(db_url):
    registry = Registry.open(db_url)
    for n in range(50):
        registry.add_device(f"pi-{n:02d}", "lab", "field", "raspberry-pi-4")
        registry.update(f"pi-{n:02d}", installed_release="digits:1.0.0")
    registry.add_device("mac-01", "lab", "field", "apple-silicon-mac")  # no bundle for it
    yield registry
    registry.engine.dispose()


def _rollouts(registry: Registry, devices: Devices, clock: Clock) -> Rollouts:
    return Rollouts(registry, devices.assign, lambda release: {"raspberry-pi-4", "x86-64-cpu"}, clock)


def _spec(**changes) -> RolloutSpec:
    base = {
        "release": "digits:2.0.0",
        "group": "field",
        "waves": ["10%", "50%", "100%"],
        "bake_s": 600,
        "abort_if": ["install_failure_rate>0.05", "p95_ms>1.5*control", "error_rate>0.01", "drift=drift"],
    }
    return RolloutSpec.model_validate({**base, **changes})


def _run(
    rollouts: Rollouts, devices: Devices, clock: Clock, rollout_id: str, steps: int = 20, step_s: float = 300
) -> str:
    for _ in range(steps):
        devices.report()
        rollouts.tick()
        state = rollouts.status(rollout_id)["state"]
        if state not in ("pending", "running"):
            return state
        clock.advance(step_s)
    return rollouts.status(rollout_id)["state"]


def test_a_good_release_goes_through_every_wave(fleet):
    clock = Clock()
    devices = Devices(fleet, clock, {"1.0.0": 10.0, "2.0.0": 10.5})
    rollouts = _rollouts(fleet, devices, clock)
    started = rollouts.start(_spec(), "op")
    assert [w["devices"] for w in started["waves"]] == [5, 20, 25]  # 10%, 50%, 100% of 50
    no_bundle = [d for d in started["devices"] if d["state"] == "no-bundle"]
    assert [d["device"] for d in no_bundle] == ["mac-01"]
    rollouts.tick()  # wave 1 goes out
    assert len(devices.sent(Action.INSTALL)) == 5
    clock.advance(599)
    rollouts.tick()  # everyone installed: the bake starts now
    rollouts.tick()
    assert len(devices.sent(Action.INSTALL)) == 5, "no second wave before the bake is over"
    assert _run(rollouts, devices, clock, started["id"]) == "completed"
    assert len(devices.sent(Action.INSTALL)) == 50
    assert not devices.sent(Action.ROLLBACK)
    assert all(
        d.installed_release == "digits:2.0.0" for d in fleet.devices() if d.profile == "raspberry-pi-4"
    )


def test_a_release_that_doubles_p95_aborts_after_the_first_wave_and_rolls_the_canaries_back(fleet):
    clock = Clock()
    devices = Devices(fleet, clock, {"1.0.0": 10.0, "2.0.0": 20.0})
    rollouts = _rollouts(fleet, devices, clock)
    rollout_id = rollouts.start(_spec(), "op")["id"]
    assert _run(rollouts, devices, clock, rollout_id) == "aborted"
    status = rollouts.status(rollout_id)
    canaries = [d["device"] for d in status["devices"] if d["wave"] == 1]
    assert sorted(devices.sent(Action.INSTALL)) == sorted(canaries)  # no wave 2
    assert sorted(devices.sent(Action.ROLLBACK)) == sorted(canaries)
    assert {d.installed_release for d in fleet.devices() if d.id in canaries} == {"digits:1.0.0"}
    rule = next(r for r in status["rules"] if r["rule"] == "p95_ms>1.5*control")
    assert (rule["canary"], rule["control"], rule["threshold"], rule["verdict"]) == (
        20.0,
        10.0,
        15.0,
        "abort",
    )
    assert "p95_ms>1.5*control" in status["reason"]


def test_pause_holds_the_next_wave_and_resume_carries_on(fleet):
    clock = Clock()
    devices = Devices(fleet, clock, {"1.0.0": 10.0, "2.0.0": 10.0})
    rollouts = _rollouts(fleet, devices, clock)
    rollout_id = rollouts.start(_spec(), "op")["id"]
    rollouts.tick()
    rollouts.pause(rollout_id)
    for _ in range(10):
        clock.advance(600)
        rollouts.tick()
    assert rollouts.status(rollout_id)["state"] == "paused"
    assert len(devices.sent(Action.INSTALL)) == 5
    with pytest.raises(UserInputError, match="it is paused"):
        rollouts.pause(rollout_id)
    rollouts.resume(rollout_id)
    assert _run(rollouts, devices, clock, rollout_id) == "completed"


def test_a_restarted_server_resumes_the_rollout_where_it_stood(fleet, db_url):
    clock = Clock()
    devices = Devices(fleet, clock, {"1.0.0": 10.0, "2.0.0": 10.0})
    first = _rollouts(fleet, devices, clock)
    rollout_id = first.start(_spec(), "op")["id"]
    first.tick()
    clock.advance(1)
    first.tick()  # wave 1 installed, baking
    registry = Registry.open(db_url)  # the server restarts: a new connection, a new scheduler
    try:
        restarted = _rollouts(registry, devices, clock)
        assert restarted.status(rollout_id)["wave"] == 1
        assert _run(restarted, devices, clock, rollout_id) == "completed"
        assert len(devices.sent(Action.INSTALL)) == 50  # nobody was assigned twice
        assert len(set(devices.sent(Action.INSTALL))) == 50
    finally:
        registry.engine.dispose()


def test_silent_devices_time_out_as_failures_without_holding_the_wave(fleet):
    clock = Clock()
    devices = Devices(fleet, clock, {"1.0.0": 10.0, "2.0.0": 10.0})
    rollouts = _rollouts(fleet, devices, clock)
    spec = _spec(device_timeout_s=900, waves=["20", "100%"], abort_if=["install_failure_rate>0.2"])
    rollout_id = rollouts.start(spec, "op")["id"]
    wave1 = [d["device"] for d in rollouts.status(rollout_id)["devices"] if d["wave"] == 1]
    devices.silent = set(wave1[:3])  # 3 of 20 never answer: 15% < 20%
    assert _run(rollouts, devices, clock, rollout_id) == "completed"
    timed_out = [d["device"] for d in rollouts.status(rollout_id)["devices"] if d["state"] == "timed-out"]
    assert sorted(timed_out) == sorted(wave1[:3])


def test_refusals_reported_by_devices_count_as_install_failures(fleet):
    clock = Clock()
    devices = Devices(fleet, clock, {"1.0.0": 10.0, "2.0.0": 10.0})
    rollouts = _rollouts(fleet, devices, clock)
    rollout_id = rollouts.start(_spec(), "op")["id"]
    wave1 = [d["device"] for d in rollouts.status(rollout_id)["devices"] if d["wave"] == 1]
    devices.silent = set(wave1)  # they get the document but report a refusal instead
    rollouts.tick()
    for device in wave1[:2]:
        event = {"event": "refused", "release": "digits:2.0.0", "step": "self-test", "detail": "outputs"}
        rollouts.on_event(device, event)
    for device in wave1[2:]:
        fleet.update(device, installed_release="digits:2.0.0")
    assert _run(rollouts, devices, clock, rollout_id) == "aborted"
    status = rollouts.status(rollout_id)
    rule = status["rules"][0]
    assert (rule["rule"], rule["canary"], rule["verdict"]) == ("install_failure_rate>0.05", 0.4, "abort")
    failed = {d["device"]: d["detail"] for d in status["devices"] if d["state"] == "failed"}
    assert set(failed) == set(wave1[:2])
    assert all("self-test" in detail for detail in failed.values())


def test_an_operator_rollback_sends_everyone_back(fleet):
    clock = Clock()
    devices = Devices(fleet, clock, {"1.0.0": 10.0, "2.0.0": 10.0})
    rollouts = _rollouts(fleet, devices, clock)
    rollout_id = rollouts.start(_spec(waves=["100%"]), "op")["id"]
    assert _run(rollouts, devices, clock, rollout_id) == "completed"
    rollouts.rollback(rollout_id)
    assert len(devices.sent(Action.ROLLBACK)) == 50
    assert {d.installed_release for d in fleet.devices() if d.profile == "raspberry-pi-4"} == {"digits:1.0.0"}
    assert rollouts.status(rollout_id)["state"] == "rolled-back"


def test_rules_waves_and_durations_are_checked_up_front():
    assert parse_rule("p95_ms>1.5*control").of_control
    assert parse_rule("error_rate>0.01").value == 0.01
    assert parse_rule("drift=drift").value == "drift"
    for bad in ("p95>2", "p95_ms>fast", "drift>1", "error_rate"):
        with pytest.raises(OptionError, match="bad abort rule"):
            parse_rule(bad)
    assert _spec(waves=["5%", "25%", "100%"]).wave_sizes(50) == [3, 13, 50]
    assert _spec(waves=["5%", "100%"], min_devices=5).wave_sizes(50) == [5, 50]
    assert parse_duration("10m") == 600
    with pytest.raises(OptionError):
        parse_duration("ten minutes")
    with pytest.raises(ValueError, match="neither a percentage"):
        _spec(waves=["half"])


def test_a_wave_waits_for_the_canary_figures_its_rules_need_then_goes_on_with_a_note(fleet):
    clock = Clock()
    devices = Devices(fleet, clock, {"1.0.0": 10.0, "2.0.0": 10.0})
    devices.quiet = {"digits:2.0.0"}
    rollouts = _rollouts(fleet, devices, clock)
    rollout_id = rollouts.start(_spec(waves=["10%", "100%"], bake_s=60), "op")["id"]
    rollouts.tick()
    rollouts.tick()  # installed: the bake starts
    clock.advance(61)
    rollouts.tick()
    held = rollouts.status(rollout_id)
    assert (held["state"], held["wave"]) == ("running", 1)
    assert "waiting for canary figures: p95_ms>1.5*control" in held["reason"]
    clock.advance(30)
    rollouts.tick()
    assert rollouts.status(rollout_id)["wave"] == 1  # still held
    clock.advance(31)  # a minute past the bake: it goes on, and says what it went without
    rollouts.tick()
    assert rollouts.status(rollout_id)["wave"] == 2


def test_one_slow_window_per_canary_does_not_abort_a_good_release(fleet):
    clock = Clock()
    devices = Devices(fleet, clock, {"1.0.0": 10.0, "2.0.0": 10.0})
    rollouts = _rollouts(fleet, devices, clock)
    rollout_id = rollouts.start(_spec(waves=["10%", "100%"], bake_s=600), "op")["id"]
    rollouts.tick()  # wave 1 goes out and installs
    rollouts.tick()  # the bake starts
    for _ in range(6):  # every device reports through the bake
        clock.advance(100)
        devices.report()
    canaries = [d["device"] for d in rollouts.status(rollout_id)["devices"] if d["wave"] == 1]
    clock.advance(1)
    now = clock().isoformat(timespec="milliseconds")
    for device in canaries:  # then a burst: every canary's LAST window is 10x slower
        window = {"model": "digits:2.0.0", "requests": 100, "p95_ms": 100.0, "ended_at": now}
        fleet.add_window(device, window, now)
        fleet.update(device, telemetry=window)
    rollouts.tick()  # the bake is over: judged on the whole bake, not the last window
    status = rollouts.status(rollout_id)
    assert (status["state"], status["wave"]) == ("running", 2)
    rule = next(r for r in status["last_judgement"] if r["rule"] == "p95_ms>1.5*control")
    assert (rule["canary"], rule["control"], rule["verdict"]) == (10.0, 10.0, "ok")
