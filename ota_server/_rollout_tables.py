"""The rollout tables as the registry's migrations made them (the registry owns the schema),
their rows as typed values, and the reads and writes a tick makes: the store's side of
``ota_server.rollouts``.

A tick's cost does not grow in queries with the rollout: a wave's members and their devices'
installed releases are read in one query, a tick's member changes written in one transaction
(one executemany per set of columns). Every member write is a compare-and-set on the state it
was read in, so an event settled by the MQTT thread is never overwritten by the scheduler's
older view (nor the other way round)."""

from __future__ import annotations

import datetime as dt
import enum
import json
import logging
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from pydantic import ValidationError
from sqlalchemy import (
    Column,
    Connection,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    and_,
    bindparam,
    func,
    select,
    update,
)

from edgec.rollout_spec import MemberState, RolloutSpec, RolloutState
from ota_server.rollout_policy import Member

__all__ = [
    "DEVICES",
    "MAX_IN_LIST",
    "MEMBERS",
    "ROLLOUTS",
    "MemberChange",
    "RolloutRow",
    "assigned_in_wave",
    "chunks",
    "iso",
    "member_of",
    "moment",
    "read_members",
    "stored",
    "wave_counts",
    "write_members",
]

logger = logging.getLogger(__name__)

_TABLES = MetaData()
ROLLOUTS = Table(
    "rollouts",
    _TABLES,
    Column("id", String(64), primary_key=True),
    Column("release", String(256)),
    Column("group_name", String(128)),
    Column("state", String(32)),
    Column("created_by", String(128)),
    Column("created_at", String(40)),
    Column("spec", Text),
    Column("wave", Integer),
    Column("bake_until", String(40)),
    Column("reason", Text),
    Column("updated_at", String(40)),
    Column("judgement", Text),
)
MEMBERS = Table(
    "rollout_devices",
    _TABLES,
    Column("rollout_id", String(64), primary_key=True),
    Column("device_id", String(128), primary_key=True),
    Column("wave", Integer),
    Column("state", String(32)),
    Column("from_release", String(256)),
    Column("assigned_at", String(40)),
    Column("finished_at", String(40)),
    Column("detail", Text),
    Column("shadow", Text),  # JSON: the member's shadow run totals
)
DEVICES = Table(  # the registry's devices table: only the columns the scheduler reads
    "devices",
    _TABLES,
    Column("id", String(128), primary_key=True),
    Column("installed_release", String(256)),
)
MAX_IN_LIST = 1000  # ids per IN list: a statement's parameters stay well under every driver's limit

_T = TypeVar("_T")


def iso(when: dt.datetime) -> str:
    return when.isoformat(timespec="milliseconds")


def moment(value: str | None) -> dt.datetime | None:
    return None if value is None else dt.datetime.fromisoformat(value)


def stored(fields: dict[str, Any]) -> dict[str, Any]:
    """Column values as the database keeps them: times as ISO text, states as their names,
    mappings (a member's shadow figures) as JSON."""
    return {k: iso(v) if isinstance(v, dt.datetime) else _plain(v) for k, v in fields.items()}


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return json.dumps(dict(value), sort_keys=True)
    return value.value if isinstance(value, enum.Enum) else value


@dataclass(frozen=True)
class RolloutRow:
    """A rollout row, as stored."""

    id: str
    release: str
    group_name: str
    state: RolloutState
    created_by: str
    created_at: str
    spec: str
    wave: int  # 0-based; -1 before the first
    bake_until: str | None
    reason: str | None
    updated_at: str | None
    judgement: str | None

    @classmethod
    def of(cls, row: Any) -> RolloutRow:
        r = row._mapping
        return cls(**{**r, "state": RolloutState(r["state"]), "wave": int(r["wave"])})

    def parsed_spec(self) -> tuple[RolloutSpec | None, str | None]:
        """The spec, or None and why: a row an older version stored may hold values this one
        refuses (``bake_s`` stored as null from Infinity)."""
        try:
            return RolloutSpec.model_validate_json(self.spec), None
        except ValueError as e:  # pydantic's ValidationError is one
            errors = e.errors() if isinstance(e, ValidationError) else []
            if errors:
                where = ".".join(str(p) for p in errors[0]["loc"]) or "spec"
                return None, f"{where}: {errors[0]['msg']}"
            return None, (str(e).splitlines() or ["unreadable"])[0]


def member_of(row: Any) -> Member:
    """A ``rollout_devices`` row as the policy's ``Member``."""
    return _member_of_mapping(row._mapping)


def _member_of_mapping(mapping: Mapping[str, Any]) -> Member:
    r = {k: v for k, v in mapping.items() if k != "rollout_id"}
    times = {"assigned_at": moment(r["assigned_at"]), "finished_at": moment(r["finished_at"])}
    shadow = _shadow_figures(r.get("shadow"))
    return Member(**{**r, **times, "state": MemberState(r["state"]), "shadow": shadow})


def _shadow_figures(text: str | None) -> dict[str, Any] | None:
    try:
        value = json.loads(text) if text else None
    except ValueError:  # written by this module as JSON; anything else is not figures
        return None
    return value if isinstance(value, dict) else None


# -- reads and writes ---------------------------------------------------------------------------------
def chunks(items: Sequence[_T], size: int = MAX_IN_LIST) -> Iterator[Sequence[_T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def read_members(
    conn: Connection, rollout_id: str, wave: int | None = None, state: MemberState | None = None
) -> list[Member]:
    """A rollout's members (of one wave, in one state, where given), by wave and device."""
    query = select(MEMBERS).where(MEMBERS.c.rollout_id == rollout_id)
    if wave is not None:
        query = query.where(MEMBERS.c.wave == wave)
    if state is not None:
        query = query.where(MEMBERS.c.state == state.value)
    return [member_of(row) for row in conn.execute(query.order_by(MEMBERS.c.wave, MEMBERS.c.device_id))]


def wave_counts(conn: Connection, rollout_id: str, wave: int) -> Counter[MemberState]:
    """How many members of the wave are in each state."""
    query = (
        select(MEMBERS.c.state, func.count())
        .where(MEMBERS.c.rollout_id == rollout_id, MEMBERS.c.wave == wave)
        .group_by(MEMBERS.c.state)
    )
    return Counter({MemberState(state): int(n) for state, n in conn.execute(query)})


def assigned_in_wave(conn: Connection, rollout_id: str, wave: int) -> list[tuple[Member, str | None]]:
    """The wave's members waiting for their device (assigned, or shadowing), each with the
    release its device reports installed (None for a device since removed from the registry),
    in one query."""
    query = (
        select(MEMBERS, DEVICES.c.installed_release.label("installed_now"))
        .select_from(MEMBERS.outerjoin(DEVICES, DEVICES.c.id == MEMBERS.c.device_id))
        .where(
            MEMBERS.c.rollout_id == rollout_id,
            MEMBERS.c.wave == wave,
            MEMBERS.c.state.in_((MemberState.ASSIGNED.value, MemberState.SHADOWING.value)),
        )
        .order_by(MEMBERS.c.device_id)
    )
    found = []
    for row in conn.execute(query):
        r = row._mapping
        member = _member_of_mapping({c.name: r[c.name] for c in MEMBERS.c})
        found.append((member, r["installed_now"]))
    return found


@dataclass(frozen=True)
class MemberChange:
    """Set ``fields`` on a member, if it is still in state ``was`` (the state it was read in;
    None: whatever its state)."""

    device_id: str
    was: MemberState | None
    fields: Mapping[str, Any]


def write_members(conn: Connection, rollout_id: str, changes: Sequence[MemberChange]) -> None:
    """Every change in the caller's transaction: one executemany per set of columns written."""
    groups: dict[tuple[bool, tuple[str, ...]], list[dict[str, Any]]] = {}
    for change in changes:
        values = stored(dict(change.fields))
        row = {"_d": change.device_id, **{f"v_{k}": v for k, v in values.items()}}
        if change.was is not None:
            row["_was"] = change.was.value
        groups.setdefault((change.was is not None, tuple(sorted(values))), []).append(row)
    for (checked, columns), rows in groups.items():
        mine = and_(MEMBERS.c.rollout_id == rollout_id, MEMBERS.c.device_id == bindparam("_d"))
        if checked:
            mine = and_(mine, MEMBERS.c.state == bindparam("_was"))
        statement = update(MEMBERS).where(mine).values({c: bindparam(f"v_{c}") for c in columns})
        conn.execute(statement, rows)
