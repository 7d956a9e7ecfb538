"""The rollout tables as the registry's migrations made them (the registry owns the schema),
and their rows as typed values: the store's side of ``ota_server.rollouts``."""

from __future__ import annotations

import datetime as dt
import enum
import logging
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError
from sqlalchemy import Column, Integer, MetaData, String, Table, Text

from edgec.rollout_spec import MemberState, RolloutSpec, RolloutState
from ota_server.rollout_policy import Member

__all__ = ["MEMBERS", "ROLLOUTS", "RolloutRow", "iso", "member_of", "moment", "stored"]

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
)


def iso(when: dt.datetime) -> str:
    return when.isoformat(timespec="milliseconds")


def moment(value: str | None) -> dt.datetime | None:
    return None if value is None else dt.datetime.fromisoformat(value)


def stored(fields: dict[str, Any]) -> dict[str, Any]:
    """Column values as the database keeps them: times as ISO text, states as their names."""
    return {k: iso(v) if isinstance(v, dt.datetime) else _plain(v) for k, v in fields.items()}


def _plain(value: Any) -> Any:
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
    r = {k: v for k, v in row._mapping.items() if k != "rollout_id"}
    times = {"assigned_at": moment(r["assigned_at"]), "finished_at": moment(r["finished_at"])}
    return Member(**{**r, **times, "state": MemberState(r["state"])})
