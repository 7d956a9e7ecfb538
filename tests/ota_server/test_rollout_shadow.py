"""Rollouts with a shadow phase: each wave runs the release in shadow first, and the shadow
rules stop it before any device serves it. A real registry (SQLite and PostgreSQL), an injected
clock, and devices that answer director documents as agents do: a shadow document with a
``shadowed`` event carrying their figures (through ``Rollouts.on_events``, as the server's
report writer calls it), an install document by installing."""

from __future__ import annotations

import datetime as dt

import pytest

from edgec.director import Action, ShadowRequest
from edgec.errors import OptionError
from edgec.reports import EventKind
from edgec.rollout_spec import RolloutSpec, parse_rule
from ota_server.registry import Registry
from ota_server.rollouts import Rollouts
from tests.ota_server.test_rollouts import Clock

SHADOW_RULES = ["install_failure_rate>0.05", "shadow_agreement<0.98", "shadow_p95_ms>1.2*serving"]


class ShadowDevices:
    """Agents as the server sees them: a shadow document is answered (on ``answer``) with a
    ``shadowed`` event of the figures the candidate gives, an install document by serving it."""

    def __init__(self, registry: Registry, agreement: float, p95_ms: float, serving_p95_ms: float = 10.0):
        self.registry = registry
        self.agreement = agreement
        self.p95_ms = p95_ms
        self.serving_p95_ms = serving_p95_ms
        self.silent: set[str] = set()
        self.documents: list[tuple[str, str, Action, ShadowRequest | None]] = []
        self.pending: list[tuple[str, str]] = []  # (device, release) shadowing, not answered yet
        self.rollouts: Rollouts | None = None

    def assign(
        self, device: str, release: str, action: Action, rollout: str, shadow: ShadowRequest | None = None
    ) -> None:
        self.documents.append((device, release, action, shadow))
        if device in self.silent:
            return
        if action is Action.SHADOW:
            self.pending.append((device, release))
        else:
            self.registry.update(device, installed_release=release, status="serving")

    def answer(self) -> None:
        """The shadow runs end: every pending device reports its figures."""
        assert self.rollouts is not None
        events = [
            (
                device,
                {
                    "event": EventKind.SHADOWED.value,
                    "release": release,
                    "detail": "requests",
                    "compared": 200,
                    "agreement": self.agreement,
                    "errors": 0,
                    "p50_ms": self.p95_ms / 2,
                    "p95_ms": self.p95_ms,
                    "p99_ms": self.p95_ms * 1.2,
                    "serving_p50_ms": self.serving_p95_ms / 2,
                    "serving_p95_ms": self.serving_p95_ms,
                    "serving_p99_ms": self.serving_p95_ms * 1.2,
                    "outputs": {"logits": self.agreement},
                    "ignored": "not a shadow figure",
                },
            )
            for device, release in self.pending
        ]
        self.pending = []
        self.rollouts.on_events(events)

    def sent(self, action: Action) -> list[str]:
        return [d for d, _, a, _ in self.documents if a is action]


@pytest.fixture
def fleet(db_url):
    registry = Registry.open(db_url)
    for n in range(20):
        registry.add_device(f"pi-{n:02d}", "lab", "field", "raspberry-pi-4")
        registry.update(f"pi-{n:02d}", installed_release="digits:1.0.0")
    yield registry
    registry.engine.dispose()


def _start(registry: Registry, devices: ShadowDevices, clock: Clock, **changes) -> tuple[Rollouts, str]:
    rollouts = Rollouts(registry, devices.assign, lambda release: {"raspberry-pi-4"}, clock)
    devices.rollouts = rollouts
    spec = {
        "release": "digits:2.0.0",
        "group": "field",
        "waves": ["5", "100%"],
        "bake_s": 0,
        "shadow_s": 600,
        "abort_if": SHADOW_RULES,
        **changes,
    }
    return rollouts, rollouts.start(RolloutSpec.model_validate(spec), "op")["id"]


def _run(rollouts: Rollouts, devices: ShadowDevices, clock: Clock, rollout_id: str, steps: int = 30) -> str:
    for _ in range(steps):
        rollouts.tick()
        devices.answer()
        state = rollouts.status(rollout_id)["state"]
        if state not in ("pending", "running"):
            return state
        clock.advance(60)
    return rollouts.status(rollout_id)["state"]


def test_a_release_that_disagrees_is_stopped_in_shadow_and_no_device_serves_it(fleet):
    clock = Clock()
    devices = ShadowDevices(fleet, agreement=0.9, p95_ms=10.0)
    rollouts, rollout_id = _start(fleet, devices, clock)
    assert _run(rollouts, devices, clock, rollout_id) == "aborted"
    status = rollouts.status(rollout_id)
    canaries = sorted(d["device"] for d in status["devices"] if d["wave"] == 1)
    assert sorted(devices.sent(Action.SHADOW)) == canaries  # wave 2 never started
    assert devices.sent(Action.INSTALL) == []  # nobody was sent it to serve ...
    assert devices.sent(Action.ROLLBACK) == []  # ... so nobody has anything to roll back
    assert {d.installed_release for d in fleet.devices()} == {"digits:1.0.0"}
    assert "wave 1 in shadow" in status["reason"]
    assert "shadow_agreement<0.98" in status["reason"]
    rule = next(r for r in status["rules"] if r["rule"] == "shadow_agreement<0.98")
    assert (rule["canary"], rule["threshold"], rule["verdict"]) == (0.9, 0.98, "abort")
    assert status["shadow"]["devices"] == 5
    assert status["shadow"]["compared"] == 1000
    shadowed = [d for d in status["devices"] if d["state"] == "shadowed"]
    assert len(shadowed) == 5
    assert shadowed[0]["shadow"]["agreement"] == 0.9
    assert "ignored" not in shadowed[0]["shadow"]  # only the shadow figures are kept


def test_a_good_release_passes_shadow_wave_by_wave_and_completes(fleet):
    clock = Clock()
    devices = ShadowDevices(fleet, agreement=0.999, p95_ms=10.5)
    rollouts, rollout_id = _start(fleet, devices, clock)
    rollouts.tick()  # wave 1 is sent in shadow
    assert len(devices.sent(Action.SHADOW)) == 5
    assert devices.documents[0][3] == ShadowRequest(duration_s=600, sample=0.1)
    rollouts.tick()
    assert devices.sent(Action.INSTALL) == [], "nobody serves it before the wave's shadow runs are in"
    assert _run(rollouts, devices, clock, rollout_id) == "completed"
    assert sorted(devices.sent(Action.SHADOW)) == sorted(devices.sent(Action.INSTALL))
    assert len(devices.sent(Action.INSTALL)) == 20
    for device in devices.sent(Action.INSTALL):  # each device shadowed before it was sent it to serve
        actions = [a for d, _, a, _ in devices.documents if d == device]
        assert actions == [Action.SHADOW, Action.INSTALL]
    assert {d.installed_release for d in fleet.devices()} == {"digits:2.0.0"}


def test_a_candidate_slower_than_the_serving_model_is_stopped_by_the_latency_rule(fleet):
    clock = Clock()
    devices = ShadowDevices(fleet, agreement=1.0, p95_ms=15.0, serving_p95_ms=10.0)
    rollouts, rollout_id = _start(fleet, devices, clock)
    assert _run(rollouts, devices, clock, rollout_id) == "aborted"
    status = rollouts.status(rollout_id)
    rule = next(r for r in status["rules"] if r["rule"] == "shadow_p95_ms>1.2*serving")
    assert (rule["canary"], rule["control"], rule["threshold"], rule["verdict"]) == (
        15.0,
        10.0,
        12.0,
        "abort",
    )
    assert devices.sent(Action.INSTALL) == []


def test_a_silent_shadowing_device_times_out_as_a_failure(fleet):
    clock = Clock()
    devices = ShadowDevices(fleet, agreement=1.0, p95_ms=10.0)
    rollouts, rollout_id = _start(fleet, devices, clock, device_timeout_s=900, waves=["100%"])
    devices.silent = {"pi-03"}
    assert _run(rollouts, devices, clock, rollout_id) == "aborted"  # 1 of 20 failed: over 5%
    status = rollouts.status(rollout_id)
    silent = next(d for d in status["devices"] if d["device"] == "pi-03")
    assert silent["state"] == "timed-out"
    assert "install_failure_rate>0.05" in status["reason"]


def test_an_install_answer_does_not_settle_a_shadowing_member(fleet):
    clock = Clock()
    devices = ShadowDevices(fleet, agreement=1.0, p95_ms=10.0)
    rollouts, rollout_id = _start(fleet, devices, clock)
    rollouts.tick()
    device = devices.sent(Action.SHADOW)[0]
    late = {"event": EventKind.COMMITTED.value, "release": "digits:2.0.0"}
    rollouts.on_events([(device, late)])  # e.g. an operator's own install document of the release
    member = next(d for d in rollouts.status(rollout_id)["devices"] if d["device"] == device)
    assert member["state"] == "shadowing"
    refused = {"event": EventKind.REFUSED.value, "release": "digits:2.0.0", "step": "load", "detail": "no"}
    rollouts.on_events([(device, refused)])
    member = next(d for d in rollouts.status(rollout_id)["devices"] if d["device"] == device)
    assert member["state"] == "failed"


def test_shadow_rules_are_checked_when_the_rollout_is_asked_for():
    with pytest.raises(ValueError, match="judges a shadow run: give the rollout one"):
        RolloutSpec(release="digits:2.0.0", group="field", abort_if=["shadow_agreement<0.98"])
    with pytest.raises(OptionError, match="only shadow latency"):
        parse_rule("p95_ms>1.2*serving")
    with pytest.raises(OptionError, match="shadow figures have no control cohort"):
        parse_rule("shadow_p95_ms>1.2*control")
    rule = parse_rule("shadow_p95_ms>1.2*serving")
    assert (rule.value, rule.of_serving, rule.of_control) == (1.2, True, False)
    spec = RolloutSpec(release="digits:2.0.0", group="field", shadow_requests=500, shadow_sample=0.2)
    assert spec.shadow == ShadowRequest(requests=500, sample=0.2)
    assert RolloutSpec(release="digits:2.0.0", group="field").shadow is None


def test_a_shadow_document_says_for_how_long_and_only_it_does():
    from edgec.director import DirectorDocument

    base = {
        "fleet": "lab",
        "device": "pi-01",
        "profile": "raspberry-pi-4",
        "version": 1,
        "expires": dt.datetime(2030, 1, 1, tzinfo=dt.UTC),
        "rollout": "r-1",
        "release": "digits:2.0.0",
        "files": [{"path": "digits/2.0.0/raspberry-pi-4/manifest.json", "sha256": "0" * 64, "length": 1}],
    }
    with pytest.raises(ValueError, match="only it does"):
        DirectorDocument.model_validate({**base, "action": "shadow"})
    with pytest.raises(ValueError, match="only it does"):
        DirectorDocument.model_validate({**base, "action": "install", "shadow": {"duration_s": 60}})
    with pytest.raises(ValueError, match="duration_s, requests or both"):
        DirectorDocument.model_validate({**base, "action": "shadow", "shadow": {"sample": 0.5}})
    doc = DirectorDocument.model_validate({**base, "action": "shadow", "shadow": {"requests": 100}})
    assert doc.shadow == ShadowRequest(requests=100, sample=0.1)
