"""The rollout policy: who is in which wave, the cohorts' figures, the abort rules' verdicts and
what a tick does next. Plain values in, plain values out: no database, no broker, no clock.

``ota_server.rollouts`` reads a rollout and its members, asks ``decide`` what to do, and writes
the answer; everything here can be tested (and reasoned about) without either::

    pending → START_WAVE 0 → WAIT_FOR_DEVICES (members assigned) → START_BAKE → BAKE
            → JUDGE → ABORT (a rule fired) | WAIT_FOR_FIGURES | START_WAVE n+1 | COMPLETE
    with a shadow phase, a wave starts in shadow: START_WAVE → WAIT_FOR_DEVICES (members
            shadowing) → JUDGE_SHADOW → ABORT | INSTALL_WAVE (the shadowed members are sent
            the release to serve) → WAIT_FOR_DEVICES → START_BAKE ...
    a wave with members still waiting (its sending was cut short) → START_WAVE n again
    paused, completed, aborted, rolled-back → HOLD
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import logging
import random
import statistics
from collections import Counter
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from edgec.rollout_spec import AbortRule, Comparison, MemberState, Metric, RolloutSpec, RolloutState, Verdict

__all__ = [
    "ACTIVE",
    "FAILED",
    "ROLLED_BACK_FROM",
    "STEERABLE",
    "CohortFigures",
    "Cohorts",
    "Decision",
    "Member",
    "Progress",
    "RuleResult",
    "ShadowCohort",
    "Step",
    "WavePlan",
    "cohort_figures",
    "cohorts",
    "decide",
    "figures",
    "install_failure_rate",
    "judge",
    "judge_rule",
    "plan_waves",
    "settle",
    "shadow_cohort",
]

logger = logging.getLogger(__name__)

ACTIVE = frozenset({RolloutState.PENDING, RolloutState.RUNNING, RolloutState.PAUSED})
FAILED = frozenset({MemberState.FAILED, MemberState.TIMED_OUT})
SETTLED = FAILED | {MemberState.INSTALLED}
ROLLED_BACK_FROM = frozenset({MemberState.INSTALLED, MemberState.ASSIGNED})  # members a rollback reaches
# the states each operator command may be given in, by its verb
STEERABLE: Mapping[str, frozenset[RolloutState]] = {
    "pause": frozenset({RolloutState.PENDING, RolloutState.RUNNING}),
    "resume": frozenset({RolloutState.PAUSED}),
    "abort": ACTIVE,
    "roll back": frozenset(
        {RolloutState.COMPLETED, RolloutState.ABORTED, RolloutState.PAUSED, RolloutState.RUNNING}
    ),
}
MIN_FIGURES_WAIT_S = 60.0  # a wave waits at least this long (or a bake) for the figures its rules need
_DRIFT_ORDER = {"drift": 2, "warn": 1, "ok": 0}  # a tie between verdicts goes to the worse one


@dataclass(frozen=True)
class Member:
    """One device of a rollout, as the store keeps it."""

    device_id: str
    wave: int | None  # 0-based; None: left out (no bundle for its profile)
    state: MemberState
    from_release: str | None = None  # what it ran before: a rollback sends it back there
    assigned_at: dt.datetime | None = None
    finished_at: dt.datetime | None = None
    detail: str | None = None
    shadow: Mapping[str, Any] | None = None  # its shadow run's totals, as its device reported them


# -- the wave plan ----------------------------------------------------------------------------
@dataclass(frozen=True)
class WavePlan:
    """The devices of each wave, drawn when the rollout starts, and those left out."""

    sizes: tuple[int, ...]  # cumulative device counts, as the spec's waves
    waves: tuple[tuple[str, ...], ...]  # the devices each wave adds
    left_out: tuple[str, ...]  # no bundle for their profile


def plan_waves(
    spec: RolloutSpec, profiles: Mapping[str, str], bundled: Collection[str], seed: str
) -> WavePlan:
    """Shuffle (seeded: the same seed draws the same waves) the devices whose profile has a
    bundle, and cut them into the spec's waves. ``profiles`` maps each device to its profile."""
    eligible = [device for device, profile in profiles.items() if profile in bundled]
    random.Random(seed).shuffle(eligible)
    sizes = spec.wave_sizes(len(eligible))
    waves = tuple(tuple(eligible[start:end]) for start, end in zip([0, *sizes[:-1]], sizes, strict=True))
    left_out = tuple(device for device, profile in profiles.items() if profile not in bundled)
    return WavePlan(tuple(sizes), waves, left_out)


def settle(
    member: Member, installed_release: str | None, release: str, now: dt.datetime, timeout_s: float
) -> Member:
    """An assigned member is installed once its device reports the release, and an assigned or
    shadowing one timed out (a failure) once it has been silent ``timeout_s``; any other member
    is left as it is."""
    if member.state not in (MemberState.ASSIGNED, MemberState.SHADOWING):
        return member
    if member.state is MemberState.ASSIGNED and installed_release == release:
        return dataclasses.replace(member, state=MemberState.INSTALLED, finished_at=now)
    if member.assigned_at is not None and now - member.assigned_at > dt.timedelta(seconds=timeout_s):
        return dataclasses.replace(member, state=MemberState.TIMED_OUT, finished_at=now, detail="no answer")
    return member


# -- figures ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Cohorts:
    """Whose telemetry windows a wave is judged on, and from when: a canary's since it installed
    the release, a control device's (one whose wave has not started) since the wave began."""

    canary: Mapping[str, dt.datetime | None]  # device -> when it installed
    control: tuple[str, ...]
    wave_start: dt.datetime

    @property
    def since(self) -> dt.datetime:
        """The oldest window either cohort needs."""
        return min([self.wave_start, *(t for t in self.canary.values() if t)])


def cohorts(members: Sequence[Member], wave: int, now: dt.datetime) -> Cohorts:
    started = [m for m in members if m.wave is not None and m.wave <= wave]
    canary = {m.device_id: m.finished_at for m in started if m.state is MemberState.INSTALLED}
    current = [m.assigned_at for m in started if m.wave == wave and m.assigned_at]
    control = tuple(m.device_id for m in members if m.state is MemberState.WAITING)
    return Cohorts(canary, control, min(current) if current else now)


@dataclass(frozen=True)
class CohortFigures:
    """A cohort's figures; None where no window had them."""

    devices: int = 0  # devices that sent a window
    windows: int = 0
    p50_ms: float | None = None
    p95_ms: float | None = None
    p99_ms: float | None = None
    error_rate: float | None = None
    drift: str | None = None  # the verdict most windows gave

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


Windows = Mapping[str, Sequence[Mapping[str, Any]]]  # device -> its telemetry windows


def figures(windows: Windows) -> CohortFigures:
    """A cohort's figures: latency per device the median of its windows, then the median over
    devices (single windows' sub-millisecond p95s swing several-fold on a busy device); error
    rate over every request; drift the verdict most windows gave."""
    reporting = [ws for ws in windows.values() if ws]
    every = [w for ws in reporting for w in ws]
    latency: dict[str, float | None] = {}
    for key in ("p50_ms", "p95_ms", "p99_ms"):
        per_device = [
            statistics.median(values)
            for ws in reporting
            if (values := [w[key] for w in ws if isinstance(w.get(key), (int, float))])
        ]
        latency[key] = round(statistics.median(per_device), 3) if per_device else None
    requests = sum(int(w.get("requests", 0)) for w in every)
    errors = sum(int(w.get("errors", 0)) for w in every)
    verdicts = Counter(w["drift"] for w in every if w.get("drift"))
    return CohortFigures(
        devices=len(reporting),
        windows=len(every),
        **latency,
        error_rate=round(errors / requests, 5) if requests else None,
        drift=max(verdicts, key=lambda v: (verdicts[v], _DRIFT_ORDER.get(v, 0))) if verdicts else None,
    )


def cohort_figures(found: Cohorts, history: Windows, release: str) -> tuple[CohortFigures, CohortFigures]:
    """The canary and control figures from ``history`` (each device's windows since
    ``found.since``, with their ``received_at``): a canary's windows of the release since it
    installed it, a control device's windows of any other model."""
    canary = {
        device: [
            w
            for w in history.get(device, ())
            if w.get("model") == release and (since is None or _received(w) >= since)
        ]
        for device, since in found.canary.items()
    }
    control = {d: [w for w in history.get(d, ()) if w.get("model") != release] for d in found.control}
    return figures(canary), figures(control)


def _received(window: Mapping[str, Any]) -> dt.datetime:
    return dt.datetime.fromisoformat(window["received_at"])


@dataclass(frozen=True)
class ShadowCohort:
    """The shadow figures of a wave's members: agreement and the candidate's error rate over
    every compared request, latency per device then the median over devices (as ``figures``
    does), for the candidate and for the serving model on the same requests."""

    devices: int = 0  # members whose shadow run compared requests
    compared: int = 0
    agreement: float | None = None
    error_rate: float | None = None
    p50_ms: float | None = None
    p95_ms: float | None = None
    p99_ms: float | None = None
    serving_p50_ms: float | None = None
    serving_p95_ms: float | None = None
    serving_p99_ms: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def shadow_cohort(members: Sequence[Member], wave: int) -> ShadowCohort:
    """The shadow figures of the members of ``wave`` that reported some."""
    runs = [m.shadow for m in members if m.wave == wave and m.shadow]
    compared_runs = [r for r in runs if (_number(r.get("compared")) or 0) > 0]
    compared = sum(int(_number(r.get("compared")) or 0) for r in compared_runs)
    agreeing = sum(
        (_number(r.get("agreement")) or 0.0) * int(_number(r.get("compared")) or 0) for r in compared_runs
    )
    errors = sum(int(_number(r.get("errors")) or 0) for r in runs)
    given = compared + errors
    latency: dict[str, float | None] = {}
    for key in ("p50_ms", "p95_ms", "p99_ms", "serving_p50_ms", "serving_p95_ms", "serving_p99_ms"):
        values = [v for r in compared_runs if (v := _number(r.get(key))) is not None]
        latency[key] = round(statistics.median(values), 3) if values else None
    return ShadowCohort(
        devices=len(compared_runs),
        compared=compared,
        agreement=round(agreeing / compared, 5) if compared else None,
        error_rate=round(errors / given, 5) if given else None,
        **latency,
    )


def install_failure_rate(members: Sequence[Member], wave: int) -> float | None:
    """Failed and timed-out members over those settled, in the waves started so far."""
    settled = [m for m in members if m.wave is not None and m.wave <= wave and m.state in SETTLED]
    failures = [m for m in settled if m.state in FAILED]
    return round(len(failures) / len(settled), 4) if settled else None


# -- judgement ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class RuleResult:
    """An abort rule with the figures behind its verdict."""

    rule: str
    canary: float | str | None
    control: float | str | None  # only for rules against the control cohort
    threshold: float | str | None
    verdict: Verdict

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_COMPARE = {
    Comparison.GT: lambda a, b: a > b,
    Comparison.GE: lambda a, b: a >= b,
    Comparison.LT: lambda a, b: a < b,
    Comparison.LE: lambda a, b: a <= b,
    Comparison.EQ: lambda a, b: a == b,
}


def judge_rule(rule: AbortRule, canary: float | str | None, control: float | str | None) -> RuleResult:
    """One rule on the canary's figure (and the control's, for ``N*control`` rules); no data
    when a figure it needs is missing."""
    shown_control = control if rule.relative else None
    if canary is None:
        return RuleResult(rule.text, canary, shown_control, None, Verdict.NO_DATA)
    if rule.metric is Metric.DRIFT:  # drift=warn fires at warn or worse, drift=drift at drift
        worse = _DRIFT_ORDER.get(str(canary), 0) >= _DRIFT_ORDER.get(str(rule.value), 0)
        verdict = Verdict.ABORT if worse else Verdict.OK
        return RuleResult(rule.text, canary, None, rule.value, verdict)
    if isinstance(rule.value, str) or isinstance(canary, str):  # a drift verdict on a numeric metric
        return RuleResult(rule.text, canary, shown_control, None, Verdict.NO_DATA)
    if rule.relative:
        if not isinstance(control, (int, float)):
            return RuleResult(rule.text, canary, shown_control, None, Verdict.NO_DATA)
        threshold = rule.value * float(control)
    else:
        threshold = float(rule.value)
    fired = _COMPARE[rule.op](float(canary), threshold)
    return RuleResult(
        rule.text, canary, shown_control, round(threshold, 4), Verdict.ABORT if fired else Verdict.OK
    )


def judge(
    rules: Sequence[AbortRule],
    canary: CohortFigures,
    control: CohortFigures,
    failure_rate: float | None,
    shadow: ShadowCohort | None = None,
) -> list[RuleResult]:
    """Every rule on the canary and control figures; ``failure_rate`` is the canaries' install
    failure rate (the control cohort installed nothing, so it has none); the ``shadow_*``
    rules on the wave's ``shadow`` figures, latency against the serving model's."""
    results = []
    for rule in rules:
        if rule.metric.shadow:
            figure = rule.metric.value.removeprefix("shadow_")
            found = shadow or ShadowCohort()
            canary_value = getattr(found, figure)
            control_value = getattr(found, f"serving_{figure}", None)
        elif rule.metric is Metric.INSTALL_FAILURE_RATE:
            canary_value, control_value = failure_rate, None
        else:
            canary_value, control_value = getattr(canary, rule.metric), getattr(control, rule.metric)
        results.append(judge_rule(rule, canary_value, control_value))
    return results


# -- the decision of a tick ------------------------------------------------------------------------
class Step(enum.StrEnum):
    HOLD = "hold"  # paused or over: nothing to do
    START_WAVE = "start-wave"  # send the wave ``Decision.wave`` (the first: the rollout starts)
    WAIT_FOR_DEVICES = "wait-for-devices"  # members of the wave have not answered yet
    START_BAKE = "start-bake"  # every member answered: bake until ``Decision.bake_until``
    BAKE = "bake"
    JUDGE = "judge"  # the bake is over: judge the rules, then decide again with the judgement
    JUDGE_SHADOW = "judge-shadow"  # the wave ran in shadow: judge the shadow rules, then decide again
    INSTALL_WAVE = "install-wave"  # the wave passed its shadow run: send its shadowed members the release
    WAIT_FOR_FIGURES = "wait-for-figures"  # the canaries have not reported what a rule needs yet
    COMPLETE = "complete"
    ABORT = "abort"


@dataclass(frozen=True)
class Progress:
    """Where a rollout stands, as a tick sees it after settling the current wave's members."""

    state: RolloutState
    wave: int  # the current wave, 0-based; -1 before the first
    waves: int  # how many the spec has
    bake_s: float
    bake_until: dt.datetime | None  # None until every member of the wave has answered
    wave_states: tuple[MemberState, ...]  # the current wave's members


@dataclass(frozen=True)
class Decision:
    step: Step
    wave: int | None = None  # START_WAVE: the wave to send
    bake_until: dt.datetime | None = None  # START_BAKE, JUDGE: the end of the bake, to record
    reason: str | None = None  # ABORT: why; WAIT_FOR_FIGURES: for what; COMPLETE, INSTALL_WAVE: without what


def decide(progress: Progress, now: dt.datetime, judgement: Sequence[RuleResult] | None = None) -> Decision:
    """What a tick does with a rollout. Once the bake is over it answers JUDGE until it is given
    the ``judgement`` of the wave, then ABORT, WAIT_FOR_FIGURES, START_WAVE or COMPLETE. Once a
    wave's shadow runs are in, it answers JUDGE_SHADOW until given their judgement, then ABORT
    or INSTALL_WAVE."""
    if progress.state is RolloutState.PENDING:
        return Decision(Step.START_WAVE, wave=0)
    if progress.state is not RolloutState.RUNNING:
        return Decision(Step.HOLD)
    if progress.wave >= 0 and MemberState.WAITING in progress.wave_states:
        # the wave was left half-sent (its scheduler died while assigning it): send the rest
        return Decision(Step.START_WAVE, wave=progress.wave)
    if MemberState.SHADOWING in progress.wave_states:
        return Decision(Step.WAIT_FOR_DEVICES)
    if MemberState.SHADOWED in progress.wave_states:  # (members installing already: sent before a crash)
        if judgement is None:
            return Decision(Step.JUDGE_SHADOW)
        fired = [r for r in judgement if r.verdict is Verdict.ABORT]
        if fired:
            reasons = "; ".join(f"{r.rule} (canary {r.canary}, threshold {r.threshold})" for r in fired)
            return Decision(Step.ABORT, reason=f"wave {progress.wave + 1} in shadow: {reasons}")
        unjudged = [r.rule for r in judgement if r.verdict is Verdict.NO_DATA]
        note = (
            f"wave {progress.wave + 1} shadow gave no figures for {', '.join(unjudged)}" if unjudged else None
        )
        return Decision(Step.INSTALL_WAVE, wave=progress.wave, reason=note)
    if MemberState.ASSIGNED in progress.wave_states:
        return Decision(Step.WAIT_FOR_DEVICES)
    if progress.bake_until is None and progress.bake_s > 0:
        return Decision(Step.START_BAKE, bake_until=now + dt.timedelta(seconds=progress.bake_s))
    if progress.bake_until is not None and now < progress.bake_until:
        return Decision(Step.BAKE)
    bake_until = progress.bake_until or now  # no bake: it ends as it starts
    if judgement is None:
        return Decision(Step.JUDGE, bake_until=bake_until)
    fired = [r for r in judgement if r.verdict is Verdict.ABORT]
    if fired:
        reasons = "; ".join(f"{r.rule} (canary {r.canary}, threshold {r.threshold})" for r in fired)
        return Decision(Step.ABORT, reason=f"wave {progress.wave + 1}: {reasons}")
    unjudged = [r.rule for r in judgement if r.verdict is Verdict.NO_DATA and r.canary is None]
    waited_s = (now - bake_until).total_seconds()
    if unjudged and waited_s < max(progress.bake_s, MIN_FIGURES_WAIT_S):
        # the canaries have not reported the figures a rule needs yet: wait for them (up to
        # another bake, at least a minute) rather than go on blind
        return Decision(Step.WAIT_FOR_FIGURES, reason=f"waiting for canary figures: {', '.join(unjudged)}")
    if progress.wave + 1 >= progress.waves:
        note = f"completed without figures for {', '.join(unjudged)}" if unjudged else None
        return Decision(Step.COMPLETE, reason=note)
    return Decision(Step.START_WAVE, wave=progress.wave + 1)
