"""Rollouts: a release to a group in waves, judged by how the model behaves on the devices.

The scheduler is a state machine persisted in the registry and driven by ``tick()`` with an
injectable clock, so a server restart resumes a rollout where it stood::

    pending → running (wave 0: assign → every member installed, failed or timed out → bake
              → abort rules on canary vs control) → wave 1 ... → completed
    with a shadow phase, each wave first runs the release in shadow (members shadowing →
    shadowed with their figures) and is sent it to serve only if the shadow rules pass
    running ⇄ paused;  running|paused → aborted (canaries get rollback documents)
    completed|aborted|paused → rolled-back (every device that installed it goes back)

Wave members are drawn at the start (a seeded shuffle of the group's devices that have a
bundle for their profile); devices not yet in a wave are the control cohort, still on their
old release. A device with no bundle for its profile is reported, never guessed. A device
that does not answer within ``device_timeout_s`` counts as a failure and does not hold up
its wave.

This module is the store and the plumbing: each tick reads a rollout and its current wave
(the counts of its states, and its assigned members with their devices' installed releases,
in one query), asks ``ota_server.rollout_policy`` what to do, and writes the answer in one
transaction; every member is read only when a wave is judged or rolled back. A wave is sent
in batches, each recorded once its documents are out: a scheduler that dies mid-wave leaves
the rest waiting, and the next tick (on whichever replica runs it) sends them. The spec and
the states are ``edgec.rollout_spec``'s.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import secrets
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

from sqlalchemy import insert, select, update

from edgec.director import Action
from edgec.errors import ConflictError, NotFoundError, UserInputError
from edgec.rollout_spec import MemberState, Metric, RolloutSpec, RolloutState
from ota_server import rollout_policy as policy
from ota_server._rollout_answers import Answer, settle_answers
from ota_server._rollout_tables import (
    MEMBERS,
    ROLLOUTS,
    MemberChange,
    RolloutRow,
    assigned_in_wave,
    chunks,
    iso,
    moment,
    read_members,
    stored,
    wave_counts,
    write_members,
)
from ota_server.registry import Registry

__all__ = ["Rollouts"]

VIEW_FIGURES_S = 2.0  # how old the cohorts' figures on a rollout's page may be
Figures = tuple[policy.CohortFigures, policy.CohortFigures]  # canary, control

logger = logging.getLogger(__name__)

SEND_BATCH = 200  # a wave's members recorded as sent per transaction: what a crash may send twice


class Rollouts:
    """Start, drive and steer rollouts. ``assign(device, release, action, rollout, shadow=...)``
    signs and publishes a director document (the server's); ``bundle_profiles(release)`` lists
    the profiles a release has bundles for."""

    def __init__(
        self,
        registry: Registry,
        assign: Callable[..., Any],  # (device, release, action, rollout[, shadow=ShadowRequest])
        bundle_profiles: Callable[[str], set[str]],
        clock: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
    ) -> None:
        self.registry = registry
        self.assign = assign
        self.bundle_profiles = bundle_profiles
        self.clock = clock
        self._troubles: dict[str, str] = {}  # rollout id -> the error its last tick met
        self._viewed: dict[str, tuple[float, int, Figures]] = {}  # rollout id -> (when, wave, figures)

    def _now(self) -> dt.datetime:
        """The clock to the millisecond, as stored: what a tick decides on is what it writes."""
        now = self.clock()
        return now.replace(microsecond=now.microsecond // 1000 * 1000)

    # -- persistence ------------------------------------------------------------------------
    def _rollout(self, rollout_id: str) -> RolloutRow:
        with self.registry.engine.connect() as conn:
            row = conn.execute(select(ROLLOUTS).where(ROLLOUTS.c.id == rollout_id)).first()
        if row is None:
            raise NotFoundError(f"no rollout {rollout_id!r} (see edgec rollout ls)")
        return RolloutRow.of(row)

    def _set(self, rollout_id: str, **fields: Any) -> None:
        values = stored({**fields, "updated_at": self.clock()})
        with self.registry.engine.begin() as conn:
            conn.execute(update(ROLLOUTS).where(ROLLOUTS.c.id == rollout_id).values(values))

    def _members(
        self, rollout_id: str, wave: int | None = None, state: MemberState | None = None
    ) -> list[policy.Member]:
        with self.registry.engine.connect() as conn:
            return read_members(conn, rollout_id, wave, state)

    def _set_members(self, rollout_id: str, changes: Sequence[MemberChange]) -> None:
        if changes:
            with self.registry.engine.begin() as conn:
                write_members(conn, rollout_id, changes)

    # -- operator commands ----------------------------------------------------------------------
    def start(self, spec: RolloutSpec, created_by: str) -> dict[str, Any]:
        profiles = self.bundle_profiles(spec.release)
        if not profiles:
            raise UserInputError(f"release {spec.release} is not published (see edgec repo ls)")
        devices = {d.id: d for d in self.registry.devices(fleet=spec.fleet, group=spec.group)}
        if not devices:
            raise UserInputError(f"group {spec.group!r} has no devices")
        rollout_id = f"r-{secrets.token_hex(4)}"
        plan = policy.plan_waves(spec, {d.id: d.profile for d in devices.values()}, profiles, rollout_id)
        if not any(plan.waves):
            have = ", ".join(sorted(profiles))
            raise UserInputError(
                f"no device of group {spec.group!r} has a profile {spec.release} is built for ({have})"
            )
        now = iso(self.clock())
        rollout = {
            "id": rollout_id,
            "release": spec.release,
            "group_name": spec.group,
            "state": RolloutState.PENDING,
            "created_by": created_by,
            "created_at": now,
            "spec": spec.model_dump_json(),
            "wave": -1,
            "updated_at": now,
        }
        members = [
            policy.Member(d, wave, MemberState.WAITING, devices[d].installed_release)
            for wave, ids in enumerate(plan.waves)
            for d in ids
        ]
        members += [
            policy.Member(
                d,
                None,
                MemberState.NO_BUNDLE,
                devices[d].installed_release,
                detail=f"no bundle for profile {devices[d].profile}",
            )
            for d in plan.left_out
        ]
        with self.registry.engine.begin() as conn:
            conn.execute(insert(ROLLOUTS).values(stored(rollout)))
            rows = [stored({**dataclasses.asdict(m), "rollout_id": rollout_id}) for m in members]
            conn.execute(insert(MEMBERS), rows)
        eligible = len(devices) - len(plan.left_out)
        logger.info(
            "rollout %s of %s to %d devices in %s", rollout_id, spec.release, eligible, list(plan.sizes)
        )
        return self.status(rollout_id)

    def pause(self, rollout_id: str) -> dict[str, Any]:
        self._require(rollout_id, "pause")
        self._set(rollout_id, state=RolloutState.PAUSED)
        return self.status(rollout_id)

    def resume(self, rollout_id: str) -> dict[str, Any]:
        self._require(rollout_id, "resume")
        self._set(rollout_id, state=RolloutState.RUNNING)
        return self.status(rollout_id)

    def abort(self, rollout_id: str, reason: str = "aborted by an operator") -> dict[str, Any]:
        self._require(rollout_id, "abort")
        self._abort(rollout_id, reason, self._members(rollout_id))
        return self.status(rollout_id)

    def rollback(self, rollout_id: str) -> dict[str, Any]:
        """Every device the rollout reached goes back to the release it ran before."""
        self._require(rollout_id, "roll back")
        self._roll_back(rollout_id, self._members(rollout_id))
        self._set(rollout_id, state=RolloutState.ROLLED_BACK, reason="rolled back by an operator")
        return self.status(rollout_id)

    def _require(self, rollout_id: str, verb: str) -> None:
        state = self._rollout(rollout_id).state
        if state not in policy.STEERABLE[verb]:
            raise ConflictError(f"cannot {verb} rollout {rollout_id}: it is {state}")

    # -- the scheduler ----------------------------------------------------------------------------
    def tick(self) -> None:
        """Advance every active rollout as far as the clock and the devices allow."""
        due = (RolloutState.PENDING.value, RolloutState.RUNNING.value)
        with self.registry.engine.connect() as conn:
            ids = [r.id for r in conn.execute(select(ROLLOUTS.c.id).where(ROLLOUTS.c.state.in_(due)))]
        for rollout_id in ids:
            try:
                self._advance(rollout_id)
                self._troubles.pop(rollout_id, None)
            except Exception as e:  # one rollout's trouble must not stop the others
                trouble = f"{type(e).__name__}: {e}"
                if self._troubles.get(rollout_id) == trouble:  # the same again: once is enough
                    logger.debug("rollout %s still cannot advance: %s", rollout_id, trouble)
                else:
                    logger.exception("rollout %s could not advance", rollout_id)
                self._troubles[rollout_id] = trouble
        self._troubles = {r: t for r, t in self._troubles.items() if r in ids}

    def _advance(self, rollout_id: str) -> None:
        """One tick of one rollout: read it once, settle its wave, decide, write the decision."""
        row = self._rollout(rollout_id)
        spec, problem = row.parsed_spec()
        if spec is None:
            reason = f"its stored spec is invalid ({problem}); start a new rollout"
            self._abort(rollout_id, reason, self._members(rollout_id))
            return
        now = self._now()
        progress = policy.Progress(
            state=row.state,
            wave=row.wave,
            waves=len(spec.waves),
            bake_s=spec.bake_s,
            bake_until=moment(row.bake_until),
            wave_states=self._settle(row, spec, now),
        )
        decision = policy.decide(progress, now)
        members: list[policy.Member] = []
        if decision.step is policy.Step.JUDGE_SHADOW:
            members = self._members(rollout_id)
            judgement = self._shadow_judgement(row, spec, members)
            self._set(rollout_id, judgement=json.dumps([r.as_dict() for r in judgement]))
            decision = policy.decide(progress, now, judgement)
        elif decision.step is policy.Step.JUDGE:
            members = self._members(rollout_id)  # every wave's, once the wave is settled
            if row.bake_until is None:  # no bake: it ends now
                self._set(rollout_id, bake_until=decision.bake_until)
            judgement = self._judgement(row, spec, members, now)
            self._set(rollout_id, judgement=json.dumps([r.as_dict() for r in judgement]))
            progress = dataclasses.replace(progress, bake_until=decision.bake_until)
            decision = policy.decide(progress, now, judgement)
        self._carry_out(row, spec, members, decision)

    def _carry_out(
        self, row: RolloutRow, spec: RolloutSpec, members: list[policy.Member], decision: policy.Decision
    ) -> None:
        step = decision.step
        if step is policy.Step.START_WAVE and decision.wave is not None:
            self._start_wave(row.id, spec, decision.wave)
        elif step is policy.Step.INSTALL_WAVE and decision.wave is not None:
            self._send(row.id, spec, decision.wave, MemberState.SHADOWED, shadow=False)
            self._set(row.id, reason=decision.reason)
        elif step is policy.Step.START_BAKE:
            self._set(row.id, bake_until=decision.bake_until)
        elif step is policy.Step.WAIT_FOR_FIGURES:
            self._set(row.id, reason=decision.reason)
        elif step is policy.Step.ABORT:
            self._abort(row.id, decision.reason or "aborted", members or self._members(row.id))
        elif step is policy.Step.COMPLETE:
            self._set(row.id, state=RolloutState.COMPLETED, reason=decision.reason)
            logger.info("rollout %s completed", row.id)
        # HOLD, WAIT_FOR_DEVICES, BAKE: nothing to write

    def _start_wave(self, rollout_id: str, spec: RolloutSpec, wave: int) -> None:
        """Send the release (to run in shadow, if the spec asks for a shadow phase) to the
        wave's waiting members: all of them, or those a scheduler that died mid-wave left."""
        self._set(rollout_id, state=RolloutState.RUNNING, wave=wave, bake_until=None, reason=None)
        self._send(rollout_id, spec, wave, MemberState.WAITING, shadow=spec.shadow is not None)

    def _send(self, rollout_id: str, spec: RolloutSpec, wave: int, was: MemberState, shadow: bool) -> None:
        """Send the wave's members in state ``was`` the release, to serve or to run in shadow,
        recording each batch once its documents are out."""
        members = self._members(rollout_id, wave, was)
        action, sent_state = (
            (Action.SHADOW, MemberState.SHADOWING) if shadow else (Action.INSTALL, MemberState.ASSIGNED)
        )
        asked = {"shadow": spec.shadow} if shadow else {}  # a callable from before shadows needs no more
        for batch in chunks(members, SEND_BATCH):
            sent: list[MemberChange] = []
            try:
                for member in batch:
                    try:
                        self.assign(member.device_id, spec.release, action, rollout_id, **asked)
                        state, detail = sent_state, None
                    except UserInputError as e:  # e.g. the device was removed
                        state, detail = MemberState.FAILED, str(e)
                    fields = {"state": state, "detail": detail, "assigned_at": self.clock()}
                    sent.append(MemberChange(member.device_id, was, fields))
            finally:  # a broker error stops the wave: what was sent is recorded, the rest waits
                self._set_members(rollout_id, sent)
        what = "in shadow" if shadow else "to serve"
        logger.info("rollout %s: wave %d sent %s to %d devices", rollout_id, wave + 1, what, len(members))

    def _settle(self, row: RolloutRow, spec: RolloutSpec, now: dt.datetime) -> tuple[MemberState, ...]:
        """Settle the current wave's assigned members (installed: the device reports the release;
        or timed out) and shadowing ones (timed out); the states of the wave's members after it."""
        if row.wave < 0:
            return ()
        with self.registry.engine.connect() as conn:
            counts = wave_counts(conn, row.id, row.wave)
            waiting = counts[MemberState.ASSIGNED] + counts[MemberState.SHADOWING]
            assigned = assigned_in_wave(conn, row.id, row.wave) if waiting else []
        changes = []
        for member, installed in assigned:
            after = policy.settle(member, installed, spec.release, now, spec.device_timeout_s)
            if after is member:  # still waiting for its device (most members on most ticks)
                continue
            names = (f.name for f in dataclasses.fields(after))
            changed = {k: getattr(after, k) for k in names if getattr(member, k) != getattr(after, k)}
            changes.append(MemberChange(member.device_id, member.state, changed))
            counts[member.state] -= 1
            counts[after.state] += 1
        self._set_members(row.id, changes)
        return tuple(counts.elements())

    def on_event(self, device_id: str, event: dict[str, Any]) -> None:
        """A device's install event (an ``Event`` dumped): ``committed``, ``shadowed`` or
        ``refused`` settles its part; any other kind, a newer agent's included, is ignored."""
        self.on_events([(device_id, event)])

    def on_events(self, events: Sequence[Answer]) -> None:
        """Install events of many devices, in order, in one query and one transaction
        (``ota_server._rollout_answers.settle_answers`` says which settle what)."""
        settle_answers(self.registry.engine, events, self.clock())

    def _abort(self, rollout_id: str, reason: str, members: Sequence[policy.Member]) -> None:
        logger.warning("rollout %s aborted: %s", rollout_id, reason)
        self._set(rollout_id, state=RolloutState.ABORTED, reason=reason)
        self._roll_back(rollout_id, members)

    def _roll_back(self, rollout_id: str, members: Sequence[policy.Member]) -> None:
        changes: list[MemberChange] = []
        try:
            for member in members:
                if member.state not in policy.ROLLED_BACK_FROM:
                    continue
                previous = member.from_release
                if not previous:
                    fields: dict[str, Any] = {"detail": "nothing to roll back to"}
                else:
                    try:
                        self.assign(member.device_id, previous, Action.ROLLBACK, rollout_id)
                        fields = {"state": MemberState.ROLLED_BACK, "detail": f"back to {previous}"}
                    except UserInputError as e:
                        fields = {"detail": f"rollback failed: {e}"}
                # whatever its state now: an answer to the install may have come in meanwhile
                changes.append(MemberChange(member.device_id, None, fields))
        finally:
            self._set_members(rollout_id, changes)

    # -- figures ----------------------------------------------------------------------------------
    def _figures(self, row: RolloutRow, members: Sequence[policy.Member], now: dt.datetime) -> Figures:
        """The canary and control cohorts' figures, from every telemetry window each device sent
        during the current judgement period (see ``rollout_policy.cohorts``)."""
        found = policy.cohorts(members, row.wave, now)
        history = self.registry.windows([*found.canary, *found.control], iso(found.since))
        return policy.cohort_figures(found, history, row.release)

    def _view_figures(self, row: RolloutRow, members: Sequence[policy.Member], now: dt.datetime) -> Figures:
        """``_figures`` for the views, at most ``VIEW_FIGURES_S`` old: every telemetry window of
        both cohorts is read to compute them (at 10,000 devices most of a second), and the
        dashboard asks every 2 s per viewer. The scheduler's judgement always computes afresh."""
        clock = time.monotonic()
        cached = self._viewed.get(row.id)
        if cached is not None and cached[1] == row.wave and clock - cached[0] < VIEW_FIGURES_S:
            return cached[2]
        figures = self._figures(row, members, now)
        self._viewed = {k: v for k, v in self._viewed.items() if clock - v[0] < VIEW_FIGURES_S}
        self._viewed[row.id] = (clock, row.wave, figures)
        return figures

    def _judgement(
        self, row: RolloutRow, spec: RolloutSpec | None, members: Sequence[policy.Member], now: dt.datetime
    ) -> list[policy.RuleResult]:
        if spec is None:
            return []
        canary, control = self._figures(row, members, now)
        failure_rate = policy.install_failure_rate(members, row.wave)
        # the shadow rules judged the wave before it served (``_shadow_judgement``): no figures
        # of theirs come after it, so a wave never waits for them here
        rules = [r for r in spec.rules() if not r.metric.shadow]
        return policy.judge(rules, canary, control, failure_rate)

    def _shadow_judgement(
        self, row: RolloutRow, spec: RolloutSpec, members: Sequence[policy.Member]
    ) -> list[policy.RuleResult]:
        """The wave's shadow rules (and its install failure rate so far) on its shadow figures."""
        rules = [r for r in spec.rules() if r.metric.shadow or r.metric is Metric.INSTALL_FAILURE_RATE]
        failure_rate = policy.install_failure_rate(members, row.wave)
        empty = policy.CohortFigures()
        return policy.judge(rules, empty, empty, failure_rate, policy.shadow_cohort(members, row.wave))

    def judge(self, rollout_id: str) -> list[dict[str, Any]]:
        """Each abort rule with the canary and control figures behind it, as they stand now."""
        row = self._rollout(rollout_id)
        spec, _ = row.parsed_spec()
        judgement = self._judgement(row, spec, self._members(rollout_id), self._now())
        return [r.as_dict() for r in judgement]

    # -- views --------------------------------------------------------------------------------------
    def status(self, rollout_id: str) -> dict[str, Any]:
        row = self._rollout(rollout_id)
        spec, problem = row.parsed_spec()
        members = self._members(rollout_id)
        now = self._now()
        labels: list[str | None] = list(spec.waves) if spec is not None else []
        if spec is None:  # still show the waves it drew
            labels = [None] * (1 + max((m.wave for m in members if m.wave is not None), default=-1))
        waves = []
        for index, label in enumerate(labels):
            in_wave = [m for m in members if m.wave == index]
            counts = Counter(m.state.value for m in in_wave)
            waves.append({"wave": index + 1, "size": label, "devices": len(in_wave), **dict(counts)})
        canary, control = self._view_figures(row, members, now)
        judged = json.loads(row.judgement) if row.judgement else []
        if row.state in (RolloutState.RUNNING, RolloutState.PAUSED):  # live figures while it runs
            failure_rate = policy.install_failure_rate(members, row.wave)
            shadow = policy.shadow_cohort(members, row.wave)
            rules = [
                r.as_dict()
                for r in policy.judge(spec.rules() if spec else [], canary, control, failure_rate, shadow)
            ]
        else:  # once it ended, those it was judged on
            rules = judged
        extra = {} if problem is None else {"spec_error": problem}
        return {
            "id": row.id,
            "release": row.release,
            "group": row.group_name,
            "state": row.state.value,
            "wave": row.wave + 1,
            "waves": waves,
            "bake_until": row.bake_until,
            "reason": row.reason,
            "created_by": row.created_by,
            "created_at": row.created_at,
            "updated_at": row.updated_at,
            "spec": None if spec is None else spec.model_dump(mode="json"),
            **extra,
            "rules": rules,
            "last_judgement": judged,  # the rules as judged at the end of the last bake
            "canary": canary.as_dict(),
            "control": control.as_dict(),
            "shadow": policy.shadow_cohort(members, row.wave).as_dict(),  # the current wave's shadow run
            "devices": [
                {
                    "device": m.device_id,
                    "wave": None if m.wave is None else m.wave + 1,
                    "state": m.state.value,
                    "from": m.from_release,
                    "detail": m.detail,
                    "shadow": m.shadow,
                }
                for m in members
            ],
        }

    def list(self) -> list[dict[str, Any]]:
        with self.registry.engine.connect() as conn:
            rows = [
                RolloutRow.of(r)
                for r in conn.execute(select(ROLLOUTS).order_by(ROLLOUTS.c.created_at, ROLLOUTS.c.id))
            ]
        result = []
        for r in rows:
            spec, _ = r.parsed_spec()
            result.append(
                {
                    "id": r.id,
                    "release": r.release,
                    "group": r.group_name,
                    "state": r.state.value,
                    "wave": f"{r.wave + 1}/{len(spec.waves) if spec is not None else '?'}",
                    "created_at": r.created_at,
                    "reason": r.reason,
                }
            )
        return result
