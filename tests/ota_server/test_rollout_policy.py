"""The rollout policy on plain values: no database, no broker, no clock. Wave plans, cohort
figures, the abort rules' verdicts and the decision a tick takes."""

from __future__ import annotations

import datetime as dt

import pytest

from edgec.rollout_spec import MemberState, RolloutSpec, RolloutState, Verdict, parse_rule
from ota_server.rollout_policy import (
    STEERABLE,
    CohortFigures,
    Member,
    Progress,
    RuleResult,
    Step,
    cohort_figures,
    cohorts,
    decide,
    figures,
    install_failure_rate,
    judge,
    judge_rule,
    plan_waves,
    settle,
)

NOW = dt.datetime(2026, 11, 29, 12, 0, tzinfo=dt.UTC)
PI = "raspberry-pi-4"


def _spec(**changes) -> RolloutSpec:
    return RolloutSpec.model_validate({"release": "digits:2.0.0", "group": "field", **changes})


def _progress(**changes) -> Progress:
    base = {
        "state": RolloutState.RUNNING,
        "wave": 0,
        "waves": 3,
        "bake_s": 600.0,
        "bake_until": NOW,
        "wave_states": (MemberState.INSTALLED,) * 5,
    }
    return Progress(**{**base, **changes})


def _result(rule: str, canary, verdict: Verdict, threshold=None) -> RuleResult:
    return RuleResult(rule, canary, None, threshold, verdict)


def _at(seconds: float) -> dt.datetime:
    return NOW + dt.timedelta(seconds=seconds)


# -- wave plan ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("devices", "waves", "sizes"),
    [
        (7, ["5%", "25%", "100%"], (1, 2, 7)),  # ceil(0.35) = 1, ceil(1.75) = 2
        (13, ["10%", "50%", "100%"], (2, 7, 13)),
        (1, ["5%", "25%", "100%"], (1, 1, 1)),  # one device: the first wave takes it
        (11, ["3", "5", "100%"], (3, 5, 11)),
        (5, ["20", "100%"], (5, 5)),  # a count over the fleet is the fleet
    ],
)
def test_odd_fleet_sizes_split_into_disjoint_cumulative_waves(devices, waves, sizes):
    fleet = {f"pi-{n:02d}": PI for n in range(devices)}
    plan = plan_waves(_spec(waves=waves), fleet, {PI}, seed="r-1")
    assert plan.sizes == sizes
    assert [len(w) for w in plan.waves] == [b - a for a, b in zip((0, *sizes[:-1]), sizes, strict=True)]
    drawn = [d for wave in plan.waves for d in wave]
    assert sorted(drawn) == sorted(fleet)  # every device once, none twice
    assert plan.left_out == ()


def test_min_devices_raises_a_small_first_wave():
    fleet = {f"pi-{n:02d}": PI for n in range(50)}
    plan = plan_waves(_spec(waves=["5%", "100%"], min_devices=5), fleet, {PI}, seed="r-1")
    assert [len(w) for w in plan.waves] == [5, 45]


def test_the_draw_is_seeded_by_the_rollout_and_leaves_out_devices_without_a_bundle():
    fleet = {f"pi-{n:02d}": PI for n in range(40)} | {"mac-01": "apple-silicon-mac"}
    spec = _spec(waves=["10%", "100%"])
    first = plan_waves(spec, fleet, {PI, "x86-64-cpu"}, seed="r-1")
    assert plan_waves(spec, fleet, {PI, "x86-64-cpu"}, seed="r-1") == first  # a restart draws the same
    assert plan_waves(spec, fleet, {PI}, seed="r-2").waves != first.waves
    assert first.left_out == ("mac-01",)
    assert "mac-01" not in {d for wave in first.waves for d in wave}
    assert first.sizes == (4, 40)


def test_no_device_with_a_bundle_gives_empty_waves():
    plan = plan_waves(_spec(), {"mac-01": "apple-silicon-mac"}, {PI}, seed="r-1")
    assert not any(plan.waves)
    assert plan.left_out == ("mac-01",)


# -- members ------------------------------------------------------------------------------------
def test_an_assigned_member_is_installed_when_its_device_reports_the_release():
    member = Member("pi-01", 0, MemberState.ASSIGNED, "digits:1.0.0", assigned_at=NOW)
    after = settle(member, "digits:2.0.0", "digits:2.0.0", _at(5), timeout_s=900)
    assert (after.state, after.finished_at) == (MemberState.INSTALLED, _at(5))
    assert settle(member, "digits:1.0.0", "digits:2.0.0", _at(5), timeout_s=900) == member


def test_a_silent_member_times_out_only_after_the_device_timeout():
    member = Member("pi-01", 0, MemberState.ASSIGNED, "digits:1.0.0", assigned_at=NOW)
    assert settle(member, "digits:1.0.0", "digits:2.0.0", _at(900), timeout_s=900) == member
    after = settle(member, "digits:1.0.0", "digits:2.0.0", _at(900.001), timeout_s=900)
    assert (after.state, after.detail) == (MemberState.TIMED_OUT, "no answer")
    waiting = Member("pi-02", 1, MemberState.WAITING)
    assert settle(waiting, None, "digits:2.0.0", _at(10_000), timeout_s=900) == waiting


def test_install_failure_rate_counts_failures_and_timeouts_of_started_waves_over_settled_members():
    members = [
        Member("a", 0, MemberState.INSTALLED),
        Member("b", 0, MemberState.FAILED),
        Member("c", 1, MemberState.TIMED_OUT),
        Member("d", 1, MemberState.INSTALLED),
        Member("e", 1, MemberState.ASSIGNED),  # not settled: not counted
        Member("f", 2, MemberState.FAILED),  # a wave not started yet: not counted
        Member("g", None, MemberState.NO_BUNDLE),
    ]
    assert install_failure_rate(members, wave=1) == 0.5
    assert install_failure_rate(members, wave=0) == 0.5
    assert install_failure_rate(members[4:5], wave=1) is None


# -- figures ------------------------------------------------------------------------------------
def test_latency_is_the_median_over_devices_of_each_devices_median_window():
    windows = {
        "a": [{"p95_ms": 10.0, "requests": 100}, {"p95_ms": 11.0, "requests": 100}, {"p95_ms": 900.0}],
        "b": [{"p95_ms": 12.0, "requests": 100, "errors": 3}],
        "c": [{"p95_ms": 14.0, "requests": 100, "errors": 1}],
        "silent": [],
    }
    found = figures(windows)
    assert (found.devices, found.windows) == (3, 5)
    assert found.p95_ms == 12.0  # medians 11, 12, 14: the 900 ms outlier does not move it
    assert found.p50_ms is None
    assert found.error_rate == 0.01  # 4 errors in 400 requests
    assert figures({}) == CohortFigures()


def test_drift_is_the_verdict_most_windows_gave_and_a_tie_goes_to_the_worse():
    assert figures({"a": [{"drift": "ok"}, {"drift": "ok"}, {"drift": "drift"}]}).drift == "ok"
    assert figures({"a": [{"drift": "ok"}, {"drift": "warn"}]}).drift == "warn"
    assert figures({"a": [{"requests": 10}]}).drift is None


def test_canaries_are_judged_on_the_release_since_they_installed_it_and_control_on_the_old_one():
    members = [
        Member("canary", 0, MemberState.INSTALLED, assigned_at=_at(0), finished_at=_at(60)),
        Member("failed", 0, MemberState.FAILED, assigned_at=_at(0)),
        Member("control", 1, MemberState.WAITING),
    ]
    found = cohorts(members, wave=0, now=_at(600))
    assert (dict(found.canary), found.control, found.since) == ({"canary": _at(60)}, ("control",), _at(0))

    def window(seconds: float, model: str, p95: float) -> dict:
        return {"received_at": _at(seconds).isoformat(), "model": model, "p95_ms": p95, "requests": 10}

    history = {
        "canary": [
            window(30, "digits:1.0.0", 1.0),  # the old release, before it installed
            window(59, "digits:2.0.0", 99.0),  # before it counts as installed
            window(120, "digits:2.0.0", 20.0),
        ],
        "control": [window(30, "digits:1.0.0", 10.0), window(120, "digits:2.0.0", 99.0)],
    }
    canary, control = cohort_figures(found, history, "digits:2.0.0")
    assert (canary.p95_ms, canary.windows) == (20.0, 1)
    assert (control.p95_ms, control.windows) == (10.0, 1)


# -- judgement ----------------------------------------------------------------------------------
def test_a_rule_against_control_fires_when_the_canary_is_over_the_factor_and_not_below_it():
    rule = parse_rule("p95_ms>1.5*control")
    fired = judge_rule(rule, 20.0, 10.0)
    assert (fired.canary, fired.control, fired.threshold, fired.verdict) == (20.0, 10.0, 15.0, Verdict.ABORT)
    assert judge_rule(rule, 14.9, 10.0).verdict is Verdict.OK
    assert judge_rule(rule, 15.0, 10.0).verdict is Verdict.OK  # > is strict


def test_a_rule_with_no_canary_or_no_control_figure_gives_no_data_not_a_verdict():
    rule = parse_rule("p95_ms>1.5*control")
    assert judge_rule(rule, None, 10.0).verdict is Verdict.NO_DATA
    no_control = judge_rule(rule, 20.0, None)
    assert (no_control.verdict, no_control.threshold) == (Verdict.NO_DATA, None)
    assert judge_rule(parse_rule("error_rate>0.01"), None, None).verdict is Verdict.NO_DATA


def test_a_drift_warn_rule_fires_on_the_worse_drift_verdict_too():
    rule = parse_rule("drift=warn")
    assert judge_rule(rule, "warn", None).verdict is Verdict.ABORT
    assert judge_rule(rule, "drift", None).verdict is Verdict.ABORT
    assert judge_rule(rule, "ok", None).verdict is Verdict.OK
    assert judge_rule(parse_rule("drift=drift"), "warn", None).verdict is Verdict.OK


def test_absolute_and_drift_rules():
    assert judge_rule(parse_rule("error_rate>0.01"), 0.02, None).verdict is Verdict.ABORT
    assert judge_rule(parse_rule("error_rate>0.01"), 0.01, None).verdict is Verdict.OK
    assert judge_rule(parse_rule("p99_ms<=5"), 5.0, None).verdict is Verdict.ABORT
    drift = judge_rule(parse_rule("drift=drift"), "drift", "ok")
    assert (drift.verdict, drift.threshold, drift.control) == (Verdict.ABORT, "drift", None)
    assert judge_rule(parse_rule("drift=drift"), "ok", None).verdict is Verdict.OK


def test_install_failures_are_judged_on_the_canaries_alone():
    rules = [parse_rule("install_failure_rate>0.05"), parse_rule("p95_ms>1.5*control")]
    results = judge(rules, CohortFigures(p95_ms=10.0), CohortFigures(p95_ms=10.0), failure_rate=0.4)
    assert [(r.canary, r.verdict) for r in results] == [(0.4, Verdict.ABORT), (10.0, Verdict.OK)]
    assert results[0].as_dict() == {
        "rule": "install_failure_rate>0.05",
        "canary": 0.4,
        "control": None,
        "threshold": 0.05,
        "verdict": "abort",
    }
    assert judge(rules[:1], CohortFigures(), CohortFigures(), failure_rate=None)[0].verdict is Verdict.NO_DATA


# -- the decision of a tick ------------------------------------------------------------------------
def test_a_pending_rollout_starts_its_first_wave():
    decision = decide(_progress(state=RolloutState.PENDING, wave=-1, wave_states=()), NOW)
    assert (decision.step, decision.wave) == (Step.START_WAVE, 0)


@pytest.mark.parametrize(
    "state", [RolloutState.PAUSED, RolloutState.COMPLETED, RolloutState.ABORTED, RolloutState.ROLLED_BACK]
)
def test_a_paused_or_ended_rollout_does_not_advance_even_past_its_bake(state):
    judgement = [_result("error_rate>0.01", 0.0, Verdict.OK, 0.01)]
    assert decide(_progress(state=state), _at(10_000), judgement).step is Step.HOLD


def test_a_wave_waits_for_every_assigned_member():
    states = (MemberState.INSTALLED, MemberState.ASSIGNED, MemberState.TIMED_OUT)
    assert decide(_progress(wave_states=states, bake_until=None), _at(10_000)).step is Step.WAIT_FOR_DEVICES


def test_the_bake_starts_when_the_wave_has_answered_and_is_respected_to_the_second():
    started = decide(_progress(bake_until=None, bake_s=600), NOW)
    assert (started.step, started.bake_until) == (Step.START_BAKE, _at(600))
    baking = _progress(bake_until=_at(600))
    assert decide(baking, _at(599.999)).step is Step.BAKE
    judged = [_result("error_rate>0.01", 0.0, Verdict.OK, 0.01)]
    assert decide(baking, _at(599.999), judged).step is Step.BAKE  # a judgement does not cut it short
    assert decide(baking, _at(600)).step is Step.JUDGE


def test_without_a_bake_the_wave_is_judged_at_once():
    decision = decide(_progress(bake_until=None, bake_s=0), NOW)
    assert (decision.step, decision.bake_until) == (Step.JUDGE, NOW)


def test_a_good_wave_starts_the_next_and_the_last_completes():
    judged = [_result("p95_ms>1.5*control", 10.0, Verdict.OK, 15.0)]
    decision = decide(_progress(wave=0), _at(1), judged)
    assert (decision.step, decision.wave, decision.reason) == (Step.START_WAVE, 1, None)
    last = decide(_progress(wave=2), _at(1), judged)
    assert (last.step, last.reason) == (Step.COMPLETE, None)


def test_a_fired_rule_aborts_with_the_rule_and_its_figures_as_the_reason():
    judged = [
        _result("install_failure_rate>0.05", 0.0, Verdict.OK, 0.05),
        _result("p95_ms>1.5*control", 20.0, Verdict.ABORT, 15.0),
        _result("drift=drift", "drift", Verdict.ABORT, "drift"),
    ]
    decision = decide(_progress(wave=1), _at(1), judged)
    assert decision.step is Step.ABORT
    assert decision.reason == (
        "wave 2: p95_ms>1.5*control (canary 20.0, threshold 15.0); "
        "drift=drift (canary drift, threshold drift)"
    )


def test_missing_canary_figures_hold_the_wave_for_a_minute_or_a_bake_then_it_goes_on_with_a_note():
    judged = [
        _result("error_rate>0.01", 0.0, Verdict.OK, 0.01),
        _result("p95_ms>1.5*control", None, Verdict.NO_DATA),
    ]
    short_bake = _progress(bake_s=30, bake_until=NOW, wave=2)
    held = decide(short_bake, _at(59.9), judged)
    assert (held.step, held.reason) == (
        Step.WAIT_FOR_FIGURES,
        "waiting for canary figures: p95_ms>1.5*control",
    )
    done = decide(short_bake, _at(60), judged)
    assert (done.step, done.reason) == (Step.COMPLETE, "completed without figures for p95_ms>1.5*control")
    long_bake = _progress(bake_s=600, bake_until=NOW, wave=0)
    assert decide(long_bake, _at(599), judged).step is Step.WAIT_FOR_FIGURES
    assert decide(long_bake, _at(600), judged).step is Step.START_WAVE


def test_no_data_for_want_of_a_control_figure_does_not_hold_the_wave():
    judged = [RuleResult("p95_ms>1.5*control", 20.0, None, None, Verdict.NO_DATA)]
    assert decide(_progress(wave=0), _at(1), judged).step is Step.START_WAVE


def test_a_fired_rule_aborts_even_while_other_figures_are_missing():
    judged = [
        _result("p95_ms>1.5*control", None, Verdict.NO_DATA),
        _result("install_failure_rate>0.05", 0.5, Verdict.ABORT, 0.05),
    ]
    assert decide(_progress(), _at(1), judged).step is Step.ABORT


def test_operator_commands_are_allowed_only_in_their_states():
    assert RolloutState.PAUSED not in STEERABLE["pause"]
    assert STEERABLE["resume"] == {RolloutState.PAUSED}
    assert RolloutState.COMPLETED not in STEERABLE["abort"]
    assert RolloutState.PENDING not in STEERABLE["roll back"]
    assert RolloutState.ROLLED_BACK not in STEERABLE["roll back"]
