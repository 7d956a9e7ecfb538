"""The audit log: who did what to the fleet, when, and how it ended, append-only and hash-chained.

Every operator action (a device assigned, a rollout started or paused, a release published, a
device added, a token created, keys rotated...) is one row of ``audit_log`` in the registry's
database, written by ``AuditLog.record``. The table and its head row are created by the
registry's migrations like every other table.

**The chain.** Rows are numbered 1, 2, 3... with no gaps (the number is taken from the head row
under its lock, never from a database sequence, which skips numbers on a rollback and would
look like a deletion). Each row stores the hash of the row before it (``prev_hash``; row 1
holds ``GENESIS``, 64 zeros) and its own hash::

    hash = sha256(prev_hash + canonical_json({id, at, actor, role, via, action, params, outcome}))

where ``canonical_json`` is JSON with sorted keys, no spaces and ASCII only, and ``params`` is
hashed as the exact text stored (itself canonical JSON). ``entry_hash`` computes it; anyone can
recompute the chain from a database dump with those two lines.

**The head.** ``audit_head`` holds one row: the last id and its hash, updated in the same
transaction as each append. It serializes writers (PostgreSQL: ``SELECT ... FOR UPDATE`` on it,
so server replicas append one at a time; SQLite: ``BEGIN IMMEDIATE`` takes the database's write
lock before the head is read) and it is what lets ``verify`` see that the newest rows were
deleted, which a chain alone cannot show.

**What ``verify`` detects**, naming the first bad row: a row whose fields were edited (its hash
no longer matches), a row deleted from the middle or the start (a gap in the ids), rows
reordered, replaced or inserted (a ``prev_hash`` that is not the previous row's hash), the
newest rows deleted (the head names more rows than there are), rows added without the head
(past the head), and, with an ``anchor``, any rewrite of history up to an anchored row.

**What it does not detect.** Whoever can write to the database can rewrite the whole chain
consistently: edit a row, recompute every hash after it and the head, and ``verify`` passes. A
hash chain inside the database it protects proves nothing against its administrator; it turns
a quiet edit into one that must rewrite everything after it. To close that, an operator anchors
the head outside the database: ``edgec audit verify`` prints ``ID:HASH`` of the newest row;
copy it somewhere the database's administrators cannot write (a ticket, a chat channel, a log
shipped off the host, a signed commit), and later run ``edgec audit verify --anchor ID:HASH``:
the row with that id must still have that hash, so nothing up to it was changed or removed.
Rows written after the last anchor are protected only by the chain. Row times (``at``) are the
writing server's clock; the id, not the time, is the order.
"""

from __future__ import annotations

import datetime as dt
import enum
import getpass
import hashlib
import logging
import os
import re
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    BigInteger,
    Column,
    Connection,
    Engine,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    insert,
    select,
    update,
)

from edgec._bounded_json import loads as bounded_loads
from edgec.errors import UserInputError
from ota_server._audit_chain import (
    GENESIS,
    AuditReport,
    AuditTamperedError,
    ChainWalk,
    Tamper,
    canonical_json,
    entry_hash,
)
from ota_server.registry import Registry

__all__ = [
    "AUDIT_HEAD",
    "AUDIT_LOG",
    "GENESIS",
    "PARAMS_MAX_BYTES",
    "AuditAction",
    "AuditEntry",
    "AuditFieldError",
    "AuditLog",
    "AuditReport",
    "AuditTamperedError",
    "Tamper",
    "Via",
    "canonical_json",
    "entry_hash",
    "failed",
    "local_actor",
    "refused",
]

logger = logging.getLogger(__name__)

PARAMS_MAX_BYTES = 4096  # canonical JSON; larger params are stored as their size and digest
PARAMS_MAX_DEPTH = 8
ACTOR_MAX = 256
OUTCOME_MAX = 512
PAGE_MAX = 1000  # entries() returns at most this many rows at once
VERIFY_BATCH = 1000  # verify() reads the chain this many rows at a time

_TABLES = MetaData()
AUDIT_LOG = Table(
    "audit_log",
    _TABLES,
    Column("id", BigInteger, primary_key=True, autoincrement=False),
    Column("at", String(40)),
    Column("actor", String(ACTOR_MAX)),
    Column("role", String(32)),
    Column("via", String(8)),
    Column("action", String(64)),
    Column("params", Text),
    Column("outcome", String(OUTCOME_MAX)),
    Column("prev_hash", String(64)),
    Column("hash", String(64)),
)
AUDIT_HEAD = Table(
    "audit_head",
    _TABLES,
    Column("id", Integer, primary_key=True),  # always 1: one row
    Column("last_id", BigInteger),
    Column("last_hash", String(64)),
)


class AuditAction(enum.StrEnum):
    """The operator actions the log records (a closed set: a typo in a caller fails loudly)."""

    DEVICE_ADD = "device.add"
    DEVICE_REMOVE = "device.remove"
    DEVICE_ASSIGN = "device.assign"
    ROLLOUT_START = "rollout.start"
    ROLLOUT_PAUSE = "rollout.pause"
    ROLLOUT_RESUME = "rollout.resume"
    ROLLOUT_ABORT = "rollout.abort"
    ROLLOUT_ROLLBACK = "rollout.rollback"
    RELEASE_PUBLISH = "release.publish"
    TOKEN_CREATE = "token.create"
    TOKEN_REVOKE = "token.revoke"
    KEYS_ROTATE = "keys.rotate"
    KEYS_REVOKE = "keys.revoke"


class Via(enum.StrEnum):
    """How the actor signed in: a static bearer token, a JWT, or the CLI on the server host."""

    TOKEN = "token"
    JWT = "jwt"
    CLI = "cli"


ROLES = frozenset({"viewer", "operator", "admin"})


class AuditFieldError(UserInputError):
    """A field given to ``record`` is outside its allowed values (a caller's bug)."""


@dataclass(frozen=True)
class AuditEntry:
    """One row as stored; ``params`` is the canonical JSON text that was hashed."""

    id: int
    at: str
    actor: str
    role: str
    via: str
    action: str
    params: str
    outcome: str
    prev_hash: str
    hash: str

    def params_dict(self) -> dict[str, Any]:
        """The parameters; a row whose text is not a JSON object (edited) shows it clipped."""
        try:
            value = bounded_loads(self.params.encode(), max_bytes=PARAMS_MAX_BYTES * 2, max_depth=32)
        except UserInputError:
            value = None
        return value if isinstance(value, dict) else {"_unreadable": self.params[:200]}

    def as_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "params": self.params_dict()}


def local_actor() -> str:
    """The actor of a CLI command run on the server host: ``local:<os user>``."""
    try:
        user = getpass.getuser()
    except (OSError, KeyError):  # no login name and no passwd entry (a bare container)
        user = f"uid-{os.getuid()}"
    return f"local:{user}"


def refused(reason: str) -> str:
    """The outcome of a request that was refused (bad input, a conflict, a missing role)."""
    return _clip(f"refused: {reason}")


def failed(reason: str) -> str:
    """The outcome of a request that failed on the server's side."""
    return _clip(f"error: {reason}")


def _clip(outcome: str) -> str:
    line = " ".join(outcome.split())  # one line
    return line if len(line) <= OUTCOME_MAX else line[: OUTCOME_MAX - 1] + "…"


_OUTCOME = re.compile(r"ok|(refused|error): \S.*")
_ACTOR = re.compile(r"[^\x00-\x1f\x7f]+")


def _depth(value: Any, limit: int) -> int:
    """Nesting depth of lists and dicts, counted no further than ``limit + 1``."""
    if not isinstance(value, dict | list | tuple) or limit < 0:
        return 0
    children = value.values() if isinstance(value, dict) else value
    return 1 + max((_depth(c, limit - 1) for c in children), default=0)


def _params_text(params: Mapping[str, Any]) -> str:
    """Canonical JSON of ``params``, or, past the bounds, a summary that says what was left out
    (an oversized request is still recorded, with its size and digest)."""
    if _depth(params, PARAMS_MAX_DEPTH) > PARAMS_MAX_DEPTH:
        return canonical_json({"_omitted": f"params nested deeper than {PARAMS_MAX_DEPTH}"})
    try:
        text = canonical_json(dict(params))
    except (TypeError, ValueError) as e:
        raise AuditFieldError(
            f"audit params must be JSON values (str, number, bool, null, lists, dicts): {e}"
        ) from e
    if len(text) > PARAMS_MAX_BYTES:
        digest = hashlib.sha256(text.encode("ascii")).hexdigest()
        return canonical_json(
            {"_omitted": f"params over {PARAMS_MAX_BYTES} bytes", "bytes": len(text), "sha256": digest}
        )
    return text


def _checked(actor: str, role: Any, via: Any, action: Any, outcome: str) -> dict[str, str]:
    """The fields ``record`` stores, checked against their closed sets and bounds."""
    role_name = role.name.lower() if isinstance(role, enum.Enum) and not isinstance(role, str) else str(role)
    if role_name not in ROLES:
        raise AuditFieldError(f"audit role {role_name!r} is not one of {', '.join(sorted(ROLES))}")
    try:
        via_value, action_value = Via(via).value, AuditAction(action).value
    except ValueError as e:
        known = ", ".join(a.value for a in AuditAction)
        raise AuditFieldError(f"{e}; audit actions: {known}; via: token, jwt, cli") from e
    if not 0 < len(actor) <= ACTOR_MAX or not _ACTOR.fullmatch(actor):
        raise AuditFieldError(f"audit actor must be 1-{ACTOR_MAX} printable characters, got {actor[:40]!r}")
    outcome = _clip(outcome)
    if not _OUTCOME.fullmatch(outcome):
        raise AuditFieldError(
            f"audit outcome must be 'ok', 'refused: REASON' or 'error: REASON', not {outcome!r}"
        )
    return {"actor": actor, "role": role_name, "via": via_value, "action": action_value, "outcome": outcome}


class AuditLog:
    """Append to and read the audit log in the registry's database (``Registry`` or its engine,
    migrated by ``Registry.open``). ``clock`` gives each row its time (UTC)."""

    def __init__(
        self,
        store: Registry | Engine,
        clock: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
    ) -> None:
        self.engine = store.engine if isinstance(store, Registry) else store
        self.clock = clock

    @contextmanager
    def _transaction(self, *, write: bool) -> Iterator[Connection]:
        """One transaction: a writer's holds the append lock from its start (SQLite's
        ``BEGIN IMMEDIATE``; PostgreSQL locks the head row with ``FOR UPDATE`` in ``record``);
        a reader's sees one snapshot (PostgreSQL ``REPEATABLE READ``; SQLite, in WAL mode, the
        snapshot its first read takes)."""
        with self.engine.connect() as conn:
            if conn.dialect.name == "sqlite":
                conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")
            elif not write:
                conn.execution_options(isolation_level="REPEATABLE READ")
            try:
                yield conn
            except BaseException:
                conn.rollback()
                raise
            conn.commit()

    def record(
        self,
        actor: str,
        role: Any,
        via: Via | str,
        action: AuditAction | str,
        *,
        params: Mapping[str, Any],
        outcome: str,
    ) -> AuditEntry:
        """Append one entry and move the head to it, in one transaction. ``role`` is a name
        (viewer, operator, admin) or the server's ``Role``; ``outcome`` is ``"ok"``,
        ``refused(reason)`` or ``failed(reason)``. Safe with any number of writers: appends
        take the head's lock one at a time."""
        fields: dict[str, Any] = _checked(actor, role, via, action, outcome)
        fields["params"] = _params_text(params)
        fields["at"] = self.clock().astimezone(dt.UTC).isoformat(timespec="milliseconds")
        with self._transaction(write=True) as conn:
            head = conn.execute(select(AUDIT_HEAD).where(AUDIT_HEAD.c.id == 1).with_for_update()).first()
            if head is None:
                raise AuditTamperedError(
                    "the audit log's head row is gone: the log was tampered with; nothing recorded",
                    None,
                    Tamper.HEAD,
                )
            fields["id"] = int(head.last_id) + 1
            fields["prev_hash"] = str(head.last_hash)
            fields["hash"] = entry_hash(fields["prev_hash"], fields)
            conn.execute(insert(AUDIT_LOG).values(fields))
            conn.execute(
                update(AUDIT_HEAD)
                .where(AUDIT_HEAD.c.id == 1)
                .values(last_id=fields["id"], last_hash=fields["hash"])
            )
        logger.info(
            "audit %d: %s by %s (%s): %s", fields["id"], fields["action"], actor, fields["role"], outcome
        )
        return AuditEntry(**fields)

    def entries(
        self, limit: int = 100, since_id: int = 0, action: str | None = None, *, newest: bool = False
    ) -> list[AuditEntry]:
        """Entries with an id over ``since_id`` (of one ``action`` if given), in id order: the
        first ``limit`` of them, or with ``newest`` the last ``limit``. ``limit`` is 1-1000."""
        if not 1 <= limit <= PAGE_MAX:
            raise UserInputError(f"limit must be 1-{PAGE_MAX}, got {limit}")
        query = select(AUDIT_LOG).where(AUDIT_LOG.c.id > since_id)
        if action is not None:
            query = query.where(AUDIT_LOG.c.action == action)
        order = AUDIT_LOG.c.id.desc() if newest else AUDIT_LOG.c.id
        with self._transaction(write=False) as conn:
            rows = [AuditEntry(**r._mapping) for r in conn.execute(query.order_by(order).limit(limit))]
        return sorted(rows, key=lambda e: e.id)

    def verify(self, anchor: tuple[int, str] | None = None) -> AuditReport:
        """Walk the chain in id order, then check it against the head row (and ``anchor``, an
        ``(id, hash)`` kept outside the database), in one snapshot. Returns the report; the first
        bad row ends the walk (``report.raise_if_tampered()`` makes it an error)."""
        with self._transaction(write=False) as conn:
            head = conn.execute(select(AUDIT_HEAD).where(AUDIT_HEAD.c.id == 1)).first()
            walk = ChainWalk()
            after = 0
            while walk.ok:
                query = select(AUDIT_LOG).where(AUDIT_LOG.c.id > after).order_by(AUDIT_LOG.c.id)
                batch = [AuditEntry(**r._mapping) for r in conn.execute(query.limit(VERIFY_BATCH))]
                for entry in batch:
                    if not walk.step(entry, anchor):
                        break
                if len(batch) < VERIFY_BATCH:
                    break
                after = batch[-1].id
        if walk.ok:
            walk.finish(None if head is None else (int(head.last_id), str(head.last_hash)), anchor)
        return walk.report()
