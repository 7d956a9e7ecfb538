"""Rollouts: a release to a group in waves, judged by how the model behaves on the devices.

The scheduler is a state machine persisted in the registry and driven by ``tick()`` with an
injectable clock, so a server restart resumes a rollout where it stood::

    pending → running (wave 0: assign → every member installed, failed or timed out → bake
              → abort rules on canary vs control) → wave 1 ... → completed
    running ⇄ paused;  running|paused → aborted (canaries get rollback documents)
    completed|aborted|paused → rolled-back (every device that installed it goes back)

Wave members are drawn at the start (a seeded shuffle of the group's devices that have a
bundle for their profile); devices not yet in a wave are the control cohort, still on their
old release. A device with no bundle for its profile is reported, never guessed. A device
that does not answer within ``device_timeout_s`` counts as a failure and does not hold up
its wave.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
import random
import re
import secrets
import statistics
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from sqlalchemy import text

from edgec.director import Action
from edgec.errors import NotFoundError, OptionError, UserInputError
from edgec.names import Name, Release
from ota_server.registry import Device, Registry

__all__ = ["AbortRule", "RolloutSpec", "Rollouts", "parse_duration", "parse_rule"]

logger = logging.getLogger(__name__)

METRICS = ("install_failure_rate", "error_rate", "p50_ms", "p95_ms", "p99_ms", "drift")
_RULE = re.compile(r"^\s*([a-z0-9_]+)\s*(>=|<=|>|<|=)\s*(.+?)\s*$")
_CONTROL = re.compile(r"^(?:([0-9.]+)\s*\*\s*)?control$")
ACTIVE = ("pending", "running", "paused")
FAILED = ("failed", "timed-out")
# bounds of a rollout spec: far beyond any real rollout, well inside what datetime arithmetic,
# the database and a status page can hold
MAX_DURATION_S = 30 * 24 * 3600.0  # bake_s and device_timeout_s: 30 days
MAX_WAVES = 100
MAX_RULES = 32
MAX_RULE_CHARS = 128
MAX_DEVICES = 1_000_000


def parse_duration(value: str) -> float:
    """``90``, ``30s``, ``10m``, ``2h`` -> seconds."""
    match = re.fullmatch(r"\s*([0-9.]+)\s*([smh]?)\s*", value)
    if not match:
        raise OptionError(f"bad duration {value!r}: use 30s, 10m or 2h")
    return float(match[1]) * {"": 1, "s": 1, "m": 60, "h": 3600}[match[2]]


@dataclass(frozen=True)
class AbortRule:
    text: str
    metric: str
    op: str
    value: float | str  # a number, a factor of the control cohort's figure, or a drift verdict
    of_control: bool = False

    def fires(self, canary: float | str | None, control: float | str | None) -> tuple[bool | None, Any]:
        """``(fired, threshold)``; ``fired`` is None when the figures are not there to judge."""
        if canary is None:
            return None, None
        if self.metric == "drift":
            return (canary == self.value) if self.op == "=" else None, self.value
        threshold: float
        if self.of_control:
            if not isinstance(control, (int, float)):
                return None, None
            threshold = float(self.value) * float(control)
        else:
            threshold = float(self.value)
        value = float(canary)
        return {
            ">": value > threshold,
            ">=": value >= threshold,
            "<": value < threshold,
            "<=": value <= threshold,
            "=": value == threshold,
        }[self.op], threshold


def parse_rule(rule: str) -> AbortRule:
    """``install_failure_rate>0.05``, ``p95_ms>1.5*control``, ``error_rate>0.01``, ``drift=drift``."""
    match = _RULE.match(rule)
    if not match or match[1] not in METRICS:
        raise OptionError(
            f"bad abort rule {rule!r}: write METRIC OP VALUE with METRIC one of {', '.join(METRICS)}, "
            'e.g. "p95_ms>1.5*control" or "drift=drift"'
        )
    metric, op, raw = match[1], match[2], match[3]
    if metric == "drift":
        if op != "=" or raw not in ("ok", "warn", "drift"):
            raise OptionError(f"bad abort rule {rule!r}: drift rules read drift=warn or drift=drift")
        return AbortRule(rule, metric, op, raw)
    control = _CONTROL.match(raw)
    try:
        value = float(control[1] or 1.0) if control else float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):  # "inf", "nan", "1e999", "1.2.3*control"
        raise OptionError(f"bad abort rule {rule!r}: {raw!r} is not a finite number or N*control")
    return AbortRule(rule, metric, op, value, of_control=bool(control))


class RolloutSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    release: Release  # NAME:VERSION, both parts checked names
    group: Name
    fleet: Annotated[str, Field(max_length=128)] | None = None
    waves: Annotated[
        list[Annotated[str, Field(max_length=16)]], Field(min_length=1, max_length=MAX_WAVES)
    ] = ["5%", "25%", "100%"]
    bake_s: Annotated[float, Field(ge=0, le=MAX_DURATION_S, allow_inf_nan=False)] = 600.0
    abort_if: Annotated[
        list[Annotated[str, Field(max_length=MAX_RULE_CHARS)]], Field(max_length=MAX_RULES)
    ] = ["install_failure_rate>0.05"]
    min_devices: Annotated[int, Field(ge=1, le=MAX_DEVICES)] = 1
    device_timeout_s: Annotated[float, Field(gt=0, le=MAX_DURATION_S, allow_inf_nan=False)] = 1800.0

    @field_validator("abort_if")
    @classmethod
    def _rules(cls, rules: list[str]) -> list[str]:
        for rule in rules:
            try:
                parse_rule(rule)
            except OptionError as e:
                raise ValueError(str(e)) from e
        return rules

    @field_validator("waves")
    @classmethod
    def _waves(cls, waves: list[str]) -> list[str]:
        for wave in waves:
            if not re.fullmatch(r"(\d+(\.\d+)?%|\d+)", wave):
                raise ValueError(f"wave {wave!r} is neither a percentage (25%) nor a device count (10)")
            if wave.endswith("%") and float(wave[:-1]) > 100:
                raise ValueError(f"wave {wave!r} is over 100%")
            if not wave.endswith("%") and int(wave) > MAX_DEVICES:
                raise ValueError(f"wave {wave!r} is over {MAX_DEVICES:,} devices")
        return waves

    def wave_sizes(self, devices: int) -> list[int]:
        """Cumulative device counts per wave, the last one covering every device."""
        sizes: list[int] = []
        for wave in self.waves:
            n = math.ceil(float(wave[:-1]) / 100 * devices) if wave.endswith("%") else int(wave)
            n = min(max(n, self.min_devices, sizes[-1] if sizes else 0), devices)
            sizes.append(n)
        sizes[-1] = devices
        return sizes


def _iso(moment: dt.datetime) -> str:
    return moment.isoformat(timespec="milliseconds")


def _stored_spec(row: dict[str, Any]) -> tuple[RolloutSpec | None, str | None]:
    """The spec a rollout row holds, or None and why: a row an older version stored may hold
    values this one refuses (``bake_s`` stored as null from Infinity)."""
    try:
        return RolloutSpec.model_validate_json(row["spec"]), None
    except ValueError as e:  # pydantic's ValidationError is one
        errors = e.errors() if isinstance(e, ValidationError) else []
        if errors:
            where = ".".join(str(p) for p in errors[0]["loc"]) or "spec"
            return None, f"{where}: {errors[0]['msg']}"
        return None, (str(e).splitlines() or ["unreadable"])[0]


class Rollouts:
    """Start, drive and steer rollouts. ``assign(device, release, action, rollout)`` signs and
    publishes a director document (the server's); ``bundle_profiles(release)`` lists the
    profiles a release has bundles for."""

    def __init__(
        self,
        registry: Registry,
        assign: Callable[[str, str, Action, str], Any],
        bundle_profiles: Callable[[str], set[str]],
        clock: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
    ) -> None:
        self.registry = registry
        self.assign = assign
        self.bundle_profiles = bundle_profiles
        self.clock = clock
        self._troubles: dict[str, str] = {}  # rollout id -> the error its last tick met

    # -- persistence ------------------------------------------------------------------------
    def _rollout_row(self, rollout_id: str) -> dict[str, Any]:
        with self.registry.engine.connect() as conn:
            row = conn.execute(text("SELECT * FROM rollouts WHERE id = :id"), {"id": rollout_id}).first()
        if row is None:
            raise NotFoundError(f"no rollout {rollout_id!r} (see edgec rollout ls)")
        return dict(row._mapping)

    def _set(self, rollout_id: str, **fields: Any) -> None:
        fields["updated_at"] = _iso(self.clock())
        assignments = ", ".join(f"{k} = :{k}" for k in fields)
        with self.registry.engine.begin() as conn:
            conn.execute(
                text(f"UPDATE rollouts SET {assignments} WHERE id = :id"), {**fields, "id": rollout_id}
            )

    def _members(self, rollout_id: str) -> list[dict[str, Any]]:
        with self.registry.engine.connect() as conn:
            rows = conn.execute(
                text("SELECT * FROM rollout_devices WHERE rollout_id = :id ORDER BY wave, device_id"),
                {"id": rollout_id},
            ).all()
        return [dict(r._mapping) for r in rows]

    def _set_member(self, rollout_id: str, device_id: str, **fields: Any) -> None:
        assignments = ", ".join(f"{k} = :{k}" for k in fields)
        with self.registry.engine.begin() as conn:
            conn.execute(
                text(f"UPDATE rollout_devices SET {assignments} WHERE rollout_id = :r AND device_id = :d"),
                {**fields, "r": rollout_id, "d": device_id},
            )

    # -- operator commands ----------------------------------------------------------------------
    def start(self, spec: RolloutSpec, created_by: str) -> dict[str, Any]:
        profiles = self.bundle_profiles(spec.release)
        if not profiles:
            raise UserInputError(f"release {spec.release} is not published (see edgec repo ls)")
        devices = self.registry.devices(fleet=spec.fleet, group=spec.group)
        if not devices:
            raise UserInputError(f"group {spec.group!r} has no devices")
        eligible = [d for d in devices if d.profile in profiles]
        if not eligible:
            have = ", ".join(sorted(profiles))
            raise UserInputError(
                f"no device of group {spec.group!r} has a profile {spec.release} is built for ({have})"
            )
        rollout_id = f"r-{secrets.token_hex(4)}"
        random.Random(rollout_id).shuffle(eligible)
        sizes = spec.wave_sizes(len(eligible))
        now = _iso(self.clock())
        with self.registry.engine.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO rollouts (id, release, group_name, state, created_by, created_at, spec, "
                    "wave, updated_at) VALUES (:id, :release, :group, 'pending', :by, :now, :spec, -1, :now)"
                ),
                {
                    "id": rollout_id,
                    "release": spec.release,
                    "group": spec.group,
                    "by": created_by,
                    "now": now,
                    "spec": spec.model_dump_json(),
                },
            )
            members: list[tuple[Device, int | None]] = [
                (d, next(i for i, size in enumerate(sizes) if n < size)) for n, d in enumerate(eligible)
            ]
            members += [(d, None) for d in devices if d.profile not in profiles]
            for device, wave in members:
                conn.execute(
                    text(
                        "INSERT INTO rollout_devices (rollout_id, device_id, wave, state, from_release, "
                        "detail) VALUES (:r, :d, :w, :s, :f, :detail)"
                    ),
                    {
                        "r": rollout_id,
                        "d": device.id,
                        "w": wave,
                        "s": "waiting" if wave is not None else "no-bundle",
                        "f": device.installed_release,
                        "detail": None if wave is not None else f"no bundle for profile {device.profile}",
                    },
                )
        logger.info("rollout %s of %s to %d devices in %s", rollout_id, spec.release, len(eligible), sizes)
        return self.status(rollout_id)

    def pause(self, rollout_id: str) -> dict[str, Any]:
        self._require(rollout_id, ("pending", "running"), "pause")
        self._set(rollout_id, state="paused")
        return self.status(rollout_id)

    def resume(self, rollout_id: str) -> dict[str, Any]:
        self._require(rollout_id, ("paused",), "resume")
        self._set(rollout_id, state="running")
        return self.status(rollout_id)

    def abort(self, rollout_id: str, reason: str = "aborted by an operator") -> dict[str, Any]:
        self._require(rollout_id, ACTIVE, "abort")
        self._abort(rollout_id, reason)
        return self.status(rollout_id)

    def rollback(self, rollout_id: str) -> dict[str, Any]:
        """Every device the rollout reached goes back to the release it ran before."""
        self._require(rollout_id, ("completed", "aborted", "paused", "running"), "roll back")
        self._roll_back(rollout_id, ("installed", "assigned"))
        self._set(rollout_id, state="rolled-back", reason="rolled back by an operator")
        return self.status(rollout_id)

    def _require(self, rollout_id: str, states: tuple[str, ...], verb: str) -> None:
        state = self._rollout_row(rollout_id)["state"]
        if state not in states:
            raise UserInputError(f"cannot {verb} rollout {rollout_id}: it is {state}")

    # -- the state machine ------------------------------------------------------------------------
    def tick(self) -> None:
        """Advance every active rollout as far as the clock and the devices allow."""
        with self.registry.engine.connect() as conn:
            ids = [
                r.id
                for r in conn.execute(text("SELECT id FROM rollouts WHERE state IN ('pending', 'running')"))
            ]
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
        row = self._rollout_row(rollout_id)
        spec, problem = _stored_spec(row)
        if spec is None:
            self._abort(rollout_id, f"its stored spec is invalid ({problem}); start a new rollout")
            return
        now = self.clock()
        if row["state"] == "pending":
            self._set(rollout_id, state="running")
            self._start_wave(rollout_id, spec, 0)
            return
        wave = int(row["wave"])
        members = [m for m in self._members(rollout_id) if m["wave"] == wave]
        self._collect(rollout_id, spec, members, now)
        members = [m for m in self._members(rollout_id) if m["wave"] == wave]
        if any(m["state"] == "assigned" for m in members):
            return
        if row["bake_until"] is None:
            bake_until = now + dt.timedelta(seconds=spec.bake_s)
            self._set(rollout_id, bake_until=_iso(bake_until))
            if spec.bake_s > 0:
                return
        elif now < dt.datetime.fromisoformat(row["bake_until"]):
            return
        judgement = self.judge(rollout_id)
        self._set(rollout_id, judgement=json.dumps(judgement))
        fired = [r for r in judgement if r["verdict"] == "abort"]
        unjudged = [r["rule"] for r in judgement if r["verdict"] == "no data" and r["canary"] is None]
        waited_s = (now - dt.datetime.fromisoformat(row["bake_until"] or _iso(now))).total_seconds()
        if unjudged and not fired and waited_s < max(spec.bake_s, 60.0):
            # the canaries have not reported the figures a rule needs yet: wait for them (up to
            # another bake, at least a minute) rather than go on blind
            self._set(rollout_id, reason=f"waiting for canary figures: {', '.join(unjudged)}")
            return
        if fired:
            reasons = "; ".join(
                f"{r['rule']} (canary {r['canary']}, threshold {r['threshold']})" for r in fired
            )
            self._abort(rollout_id, f"wave {wave + 1}: {reasons}")
        elif wave + 1 >= len(spec.waves):
            note = f"completed without figures for {', '.join(unjudged)}" if unjudged else None
            self._set(rollout_id, state="completed", reason=note)
            logger.info("rollout %s completed", rollout_id)
        else:
            self._start_wave(rollout_id, spec, wave + 1)

    def _start_wave(self, rollout_id: str, spec: RolloutSpec, wave: int) -> None:
        self._set(rollout_id, wave=wave, bake_until=None, reason=None)
        for member in self._members(rollout_id):
            if member["wave"] != wave or member["state"] != "waiting":
                continue
            try:
                self.assign(member["device_id"], spec.release, Action.INSTALL, rollout_id)
                state, detail = "assigned", None
            except UserInputError as e:  # e.g. the device was removed
                state, detail = "failed", str(e)
            self._set_member(
                rollout_id, member["device_id"], state=state, detail=detail, assigned_at=_iso(self.clock())
            )
        logger.info("rollout %s: wave %d started", rollout_id, wave + 1)

    def _collect(
        self, rollout_id: str, spec: RolloutSpec, members: list[dict[str, Any]], now: dt.datetime
    ) -> None:
        """Installed (the device reports the release), or timed out."""
        for member in members:
            if member["state"] != "assigned":
                continue
            device = self.registry.get(member["device_id"])
            if device.installed_release == spec.release:
                self._set_member(rollout_id, device.id, state="installed", finished_at=_iso(now))
            elif now - dt.datetime.fromisoformat(member["assigned_at"]) > dt.timedelta(
                seconds=spec.device_timeout_s
            ):
                self._set_member(
                    rollout_id, device.id, state="timed-out", finished_at=_iso(now), detail="no answer"
                )

    def on_event(self, device_id: str, event: dict[str, Any]) -> None:
        """A device's install event: ``committed`` or ``refused`` settles its part."""
        kind, release = event.get("event"), event.get("release")
        if kind not in ("committed", "refused") or not isinstance(release, str):
            return
        with self.registry.engine.connect() as conn:
            rows = conn.execute(
                text(
                    "SELECT r.id FROM rollouts r JOIN rollout_devices m ON m.rollout_id = r.id "
                    "WHERE m.device_id = :d AND m.state = 'assigned' AND r.release = :release "
                    "AND r.state IN ('running', 'paused')"
                ),
                {"d": device_id, "release": release},
            ).all()
        now = _iso(self.clock())
        for (rollout_id,) in rows:
            if kind == "committed":
                self._set_member(rollout_id, device_id, state="installed", finished_at=now)
            else:
                detail = f"refused at {event.get('step')}: {event.get('detail')}"
                self._set_member(rollout_id, device_id, state="failed", finished_at=now, detail=detail)

    def _abort(self, rollout_id: str, reason: str) -> None:
        logger.warning("rollout %s aborted: %s", rollout_id, reason)
        self._set(rollout_id, state="aborted", reason=reason)
        self._roll_back(rollout_id, ("installed", "assigned"))

    def _roll_back(self, rollout_id: str, states: tuple[str, ...]) -> None:
        for member in self._members(rollout_id):
            if member["state"] not in states:
                continue
            previous = member["from_release"]
            if not previous:
                self._set_member(rollout_id, member["device_id"], detail="nothing to roll back to")
                continue
            try:
                self.assign(member["device_id"], previous, Action.ROLLBACK, rollout_id)
                self._set_member(
                    rollout_id, member["device_id"], state="rolled-back", detail=f"back to {previous}"
                )
            except UserInputError as e:
                self._set_member(rollout_id, member["device_id"], detail=f"rollback failed: {e}")

    # -- figures ----------------------------------------------------------------------------------
    def _cohorts(self, rollout_id: str) -> tuple[list[dict[str, Any]], dict[str, Any], dict[str, Any]]:
        """The members the rollout has reached, and the canary and control cohorts' figures.

        The figures come from every telemetry window a device sent during the current judgement
        period, not its last one: a canary's windows since it installed the release, a control
        device's since the current wave began (sub-millisecond p95s of single windows swing
        several-fold on a busy device)."""
        row = self._rollout_row(rollout_id)
        release = row["release"]
        members = self._members(rollout_id)
        wave = int(row["wave"])
        started = [m for m in members if m["wave"] is not None and m["wave"] <= wave]
        canary = {m["device_id"]: m["finished_at"] for m in started if m["state"] == "installed"}
        current = [m["assigned_at"] for m in started if m["wave"] == wave and m["assigned_at"]]
        wave_start = min(current) if current else _iso(self.clock())
        control = [m["device_id"] for m in members if m["state"] == "waiting"]
        since = min([wave_start, *(t for t in canary.values() if t)])
        history = self.registry.windows([*canary, *control], since)
        canary_windows = {
            d: [w for w in history[d] if w.get("model") == release and w["received_at"] >= (t or "")]
            for d, t in canary.items()
        }
        control_windows = {d: [w for w in history[d] if w.get("model") != release] for d in control}
        return started, self._figures(canary_windows), self._figures(control_windows)

    @staticmethod
    def _figures(windows: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
        """A cohort's figures: latency per device the median of its windows, then the median
        over devices; error rate over every request; drift the verdict most windows gave."""
        reporting = {d: ws for d, ws in windows.items() if ws}
        every = [w for ws in reporting.values() for w in ws]
        figures: dict[str, Any] = {"devices": len(reporting), "windows": len(every)}
        for key in ("p50_ms", "p95_ms", "p99_ms"):
            per_device = [
                statistics.median(values)
                for ws in reporting.values()
                if (values := [w[key] for w in ws if isinstance(w.get(key), (int, float))])
            ]
            figures[key] = round(statistics.median(per_device), 3) if per_device else None
        requests = sum(int(w.get("requests", 0)) for w in every)
        errors = sum(int(w.get("errors", 0)) for w in every)
        figures["error_rate"] = round(errors / requests, 5) if requests else None
        verdicts = Counter(w["drift"] for w in every if w.get("drift"))
        order = {"drift": 2, "warn": 1, "ok": 0}
        figures["drift"] = max(verdicts, key=lambda v: (verdicts[v], order.get(v, 0))) if verdicts else None
        return figures

    def judge(self, rollout_id: str) -> list[dict[str, Any]]:
        """Each abort rule with the canary and control figures behind it."""
        row = self._rollout_row(rollout_id)
        spec, _ = _stored_spec(row)
        started, canary_figures, control_figures = self._cohorts(rollout_id)
        settled = [m for m in started if m["state"] in ("installed", *FAILED)]
        failures = [m for m in settled if m["state"] in FAILED]
        canary_figures["install_failure_rate"] = round(len(failures) / len(settled), 4) if settled else None
        results = []
        for text_rule in spec.abort_if if spec is not None else []:
            rule = parse_rule(text_rule)
            canary_value, control_value = canary_figures.get(rule.metric), control_figures.get(rule.metric)
            fired, threshold = rule.fires(canary_value, control_value)
            verdict = "abort" if fired else "ok" if fired is False else "no data"
            results.append(
                {
                    "rule": text_rule,
                    "canary": canary_value,
                    "control": control_value if rule.of_control else None,
                    "threshold": round(threshold, 4) if isinstance(threshold, float) else threshold,
                    "verdict": verdict,
                }
            )
        return results

    # -- views --------------------------------------------------------------------------------------
    def status(self, rollout_id: str) -> dict[str, Any]:
        row = self._rollout_row(rollout_id)
        spec, problem = _stored_spec(row)
        members = self._members(rollout_id)
        labels: list[str | None] = list(spec.waves) if spec is not None else []
        if spec is None:  # still show the waves it drew
            labels = [None] * (1 + max((m["wave"] for m in members if m["wave"] is not None), default=-1))
        waves = []
        for index, label in enumerate(labels):
            in_wave = [m for m in members if m["wave"] == index]
            counts = Counter(m["state"] for m in in_wave)
            waves.append({"wave": index + 1, "size": label, "devices": len(in_wave), **dict(counts)})
        _, canary, control = self._cohorts(rollout_id)
        judged = json.loads(row["judgement"]) if row["judgement"] else []
        extra = {} if problem is None else {"spec_error": problem}
        return {
            "id": row["id"],
            "release": row["release"],
            "group": row["group_name"],
            "state": row["state"],
            "wave": int(row["wave"]) + 1,
            "waves": waves,
            "bake_until": row["bake_until"],
            "reason": row["reason"],
            "created_by": row["created_by"],
            "created_at": row["created_at"],
            "updated_at": row["updated_at"],
            "spec": None if spec is None else spec.model_dump(mode="json"),
            **extra,
            # live figures while it runs; once it ended, those it was judged on
            "rules": self.judge(rollout_id) if row["state"] in ("running", "paused") else judged,
            "last_judgement": judged,  # the rules as judged at the end of the last bake
            "canary": canary,
            "control": control,
            "devices": [
                {
                    "device": m["device_id"],
                    "wave": None if m["wave"] is None else m["wave"] + 1,
                    "state": m["state"],
                    "from": m["from_release"],
                    "detail": m["detail"],
                }
                for m in members
            ],
        }

    def list(self) -> list[dict[str, Any]]:
        with self.registry.engine.connect() as conn:
            rows = conn.execute(text("SELECT * FROM rollouts ORDER BY created_at, id")).all()
        result = []
        for r in rows:
            spec, _ = _stored_spec(dict(r._mapping))
            result.append(
                {
                    "id": r.id,
                    "release": r.release,
                    "group": r.group_name,
                    "state": r.state,
                    "wave": f"{int(r.wave) + 1}/{len(spec.waves) if spec is not None else '?'}",
                    "created_at": r.created_at,
                    "reason": r.reason,
                }
            )
        return result
