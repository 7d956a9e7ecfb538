"""The audit log's hash chain, with no database: how a row is hashed, and the walk that checks
rows in id order against the head row and an anchor (``ota_server.audit`` reads the rows and
explains what the chain does and does not protect against)."""

from __future__ import annotations

import enum
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from edgec.errors import TrustError

__all__ = [
    "GENESIS",
    "AuditReport",
    "AuditTamperedError",
    "ChainWalk",
    "Tamper",
    "canonical_json",
    "entry_hash",
]

GENESIS = "0" * 64  # the prev_hash of row 1
_FIELDS = ("id", "at", "actor", "role", "via", "action", "params", "outcome")  # hashed, in this order


class Tamper(enum.StrEnum):
    """What ``verify`` found wrong, by the first row it concerns."""

    EDITED = "edited"  # the row's hash does not match its fields
    MISSING = "missing"  # a gap in the ids: rows deleted from the start or the middle
    RELINKED = "relinked"  # prev_hash is not the previous row's hash: reordered, replaced, inserted
    TRUNCATED = "truncated"  # the head names rows that are gone: the newest rows deleted
    PAST_HEAD = "past-head"  # rows after the head: added without the log
    HEAD = "head"  # the head row is missing or does not match the newest row
    ANCHOR = "anchor"  # the anchored row is gone or has another hash


class AuditTamperedError(TrustError):
    """The audit log's chain is broken: ``row`` names the first bad row (None: the head row
    itself), ``tamper`` what is wrong with it."""

    def __init__(self, message: str, row: int | None, tamper: Tamper) -> None:
        super().__init__(message, "audit_log")
        self.row = row
        self.tamper = tamper


@dataclass(frozen=True)
class AuditReport:
    """The result of walking the chain. ``ok``: every row links and the head matches.
    ``count`` rows were checked; ``head_id``/``head_hash`` name the newest good row (the value
    to anchor outside the database). When not ok, ``row``, ``tamper`` and ``problem`` say
    where it first went wrong."""

    ok: bool
    count: int
    head_id: int
    head_hash: str
    row: int | None = None
    tamper: Tamper | None = None
    problem: str | None = None

    @property
    def anchor(self) -> str:
        return f"{self.head_id}:{self.head_hash}"

    def raise_if_tampered(self) -> None:
        if not self.ok:
            raise AuditTamperedError(
                self.problem or "audit log tampered", self.row, self.tamper or Tamper.HEAD
            )


def canonical_json(value: Any) -> str:
    """Sorted keys, no spaces, ASCII only, no NaN: one text for one value."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def entry_hash(prev_hash: str, fields: Mapping[str, Any]) -> str:
    """sha256 over ``prev_hash`` then the canonical JSON of the row's other fields (id, at,
    actor, role, via, action, params, outcome)."""
    body = {k: fields[k] for k in _FIELDS}
    return hashlib.sha256((prev_hash + canonical_json(body)).encode("ascii")).hexdigest()


class ChainWalk:
    """The chain check as a state machine over rows in id order: no I/O, one row at a time."""

    def __init__(self) -> None:
        self.last_id, self.last_hash = 0, GENESIS
        self.anchor_seen = False
        self.problem: tuple[int | None, Tamper, str] | None = None

    @property
    def ok(self) -> bool:
        return self.problem is None

    def _fail(self, row: int | None, tamper: Tamper, message: str) -> bool:
        self.problem = (row, tamper, f"audit log {message}")
        return False

    def step(self, entry: Any, anchor: tuple[int, str] | None) -> bool:
        expected = self.last_id + 1
        if entry.id != expected:
            gone = f"row {expected}" if entry.id == expected + 1 else f"rows {expected}-{entry.id - 1}"
            where = (
                f"row {self.last_id} is followed by row {entry.id}" if self.last_id else "they are the oldest"
            )
            return self._fail(expected, Tamper.MISSING, f"{gone} deleted ({where})")
        if entry.prev_hash != self.last_hash:
            before = f"row {self.last_id}'s hash" if self.last_id else "the genesis hash"
            return self._fail(
                entry.id,
                Tamper.RELINKED,
                f"row {entry.id}'s prev_hash is not {before}: rows reordered or inserted there, "
                f"or row {self.last_id} rewritten with a new hash",
            )
        if entry_hash(entry.prev_hash, entry.__dict__) != entry.hash:
            return self._fail(
                entry.id, Tamper.EDITED, f"row {entry.id} edited: its hash does not match its fields"
            )
        if anchor is not None and entry.id == anchor[0]:
            self.anchor_seen = True
            if entry.hash != anchor[1]:
                return self._fail(
                    entry.id,
                    Tamper.ANCHOR,
                    f"row {entry.id}'s hash {entry.hash[:16]}… is not the anchored {anchor[1][:16]}…: "
                    f"the log up to row {entry.id} was rewritten",
                )
        self.last_id, self.last_hash = entry.id, entry.hash
        return True

    def finish(self, head: tuple[int, str] | None, anchor: tuple[int, str] | None) -> None:
        """The newest row against the head row, and the anchor's row found."""
        if head is None:
            self._fail(None, Tamper.HEAD, "head row deleted: the count of rows cannot be checked")
        elif head[0] > self.last_id:
            gone = f"row {head[0]}" if head[0] == self.last_id + 1 else f"rows {self.last_id + 1}-{head[0]}"
            self._fail(self.last_id + 1, Tamper.TRUNCATED, f"{gone} deleted: the newest rows are gone")
        elif head[0] < self.last_id:
            self._fail(
                head[0] + 1, Tamper.PAST_HEAD, f"row {head[0] + 1} is past the head: added outside the log"
            )
        elif head[1] != self.last_hash:
            self._fail(
                self.last_id,
                Tamper.HEAD,
                f"row {self.last_id}'s hash is not the head's: the newest row was replaced",
            )
        elif anchor is not None and not self.anchor_seen:
            self._fail(
                anchor[0], Tamper.ANCHOR, f"anchored row {anchor[0]} is not in the log ({self.last_id} rows)"
            )

    def report(self) -> AuditReport:
        if self.problem is None:
            return AuditReport(True, self.last_id, self.last_id, self.last_hash)
        row, tamper, message = self.problem
        return AuditReport(False, self.last_id, self.last_id, self.last_hash, row, tamper, message)
