"""Devices' answers to a rollout's director documents, settled into its members.

The server's report writer hands every install event over in batches; an answer settles the
member of each running or paused rollout of the release that waits for it: ``committed``
installs an assigned member, ``shadowed`` brings a shadowing member's figures (it is then
``shadowed``, waiting for the wave's shadow verdict), ``refused`` fails either. A member still
waiting in the wave being sent is settled too (its device's answer can outrun the record that
it was sent). Every write is a compare-and-set on the state the member was read in.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import Any

from sqlalchemy import Engine, or_, select

from edgec.reports import SHADOW_FIGURES, EventKind
from edgec.rollout_spec import MemberState, RolloutState
from ota_server._rollout_tables import MEMBERS, ROLLOUTS, MemberChange, chunks, write_members

__all__ = ["Answer", "settle_answers"]

Answer = tuple[str, dict[str, Any]]  # (device id, an install event as ``Event.model_dump`` gives it)

# what a member keeps of its device's ``shadowed`` event
_KEPT = frozenset({*SHADOW_FIGURES, "outputs", "skipped"})
_ANSWERS = (EventKind.COMMITTED, EventKind.REFUSED, EventKind.SHADOWED)


def settle_answers(engine: Engine, events: Sequence[Answer], now: dt.datetime) -> None:
    """Settle the members ``events`` answer for, in one query and one transaction: each by its
    device's first answer for the rollout's release; ``committed`` does not settle a shadowing
    member, nor ``shadowed`` an assigned one (a late answer, or an operator's own document)."""
    answers = [
        (device, event)
        for device, event in events
        if event.get("event") in _ANSWERS and isinstance(event.get("release"), str)
    ]
    if not answers:
        return
    open_parts: dict[str, list[tuple[str, str, MemberState]]] = {}
    with engine.connect() as conn:
        for ids in chunks(sorted({device for device, _ in answers})):
            for rollout_id, device, release, state in conn.execute(_open_parts(ids)):
                open_parts.setdefault(device, []).append((rollout_id, release, MemberState(state)))
    settled: dict[tuple[str, str], MemberChange] = {}
    for device, event in answers:
        for rollout_id, release, state in open_parts.get(device, ()):
            if release != event["release"] or (rollout_id, device) in settled:
                continue
            kind = event.get("event")
            if (kind == EventKind.SHADOWED and state is MemberState.ASSIGNED) or (
                kind == EventKind.COMMITTED and state is MemberState.SHADOWING
            ):
                continue
            settled[rollout_id, device] = MemberChange(device, state, _answered(event, now))
    if settled:
        with engine.begin() as conn:
            for rollout_id in sorted({r for r, _ in settled}):
                write_members(conn, rollout_id, [c for (r, _), c in settled.items() if r == rollout_id])


def _open_parts(devices: Sequence[str]) -> Any:
    """The running or paused rollouts' members among ``devices`` that an answer settles."""
    active = (RolloutState.RUNNING.value, RolloutState.PAUSED.value)
    waiting = (MemberState.ASSIGNED.value, MemberState.SHADOWING.value)
    being_sent = (MEMBERS.c.state == MemberState.WAITING.value) & (MEMBERS.c.wave == ROLLOUTS.c.wave)
    return (
        select(ROLLOUTS.c.id, MEMBERS.c.device_id, ROLLOUTS.c.release, MEMBERS.c.state)
        .join(MEMBERS, MEMBERS.c.rollout_id == ROLLOUTS.c.id)
        .where(
            MEMBERS.c.device_id.in_(devices),
            ROLLOUTS.c.state.in_(active),
            or_(MEMBERS.c.state.in_(waiting), being_sent),
        )
    )


def _answered(event: dict[str, Any], now: dt.datetime) -> dict[str, Any]:
    """A member's fields once its device answered: ``committed`` installs, ``shadowed`` brings
    its shadow figures, ``refused`` fails."""
    if event.get("event") == EventKind.COMMITTED:
        return {"state": MemberState.INSTALLED, "finished_at": now}
    if event.get("event") == EventKind.SHADOWED:
        figures = {k: v for k, v in event.items() if k in _KEPT}
        return {"state": MemberState.SHADOWED, "shadow": figures, "detail": event.get("detail")}
    detail = f"refused at {event.get('step')}: {event.get('detail')}"
    return {"state": MemberState.FAILED, "finished_at": now, "detail": detail}
