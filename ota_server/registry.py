"""The fleet registry: devices, groups, profiles, installed and desired releases, last seen.

SQLite by default (one file, nothing to start); PostgreSQL through the same code when server
replicas share the work (``postgresql+psycopg://...``). The schema is created and upgraded
by numbered migrations, each applied once, in order, inside a transaction.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import json
import logging
import secrets
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, Engine, bindparam, create_engine, event, text
from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError

from edgec.errors import ConflictError, NotFoundError, UserInputError
from edgec.names import check_name
from ota_server._migrations import MIGRATIONS
from ota_server.logins import SERVER_USER, is_server_login

__all__ = ["SERVER_USER", "Device", "DeviceExistsError", "Registry", "hash_password", "verify_password"]


logger = logging.getLogger(__name__)

PBKDF2_ITERATIONS = 101  # Mosquitto's default for its $7$ (PBKDF2-SHA512) password hashes
MAX_IN_LIST = 1000  # windows() filters by device in SQL up to this many devices, else in Python
ISSUING_LOCKS = 64  # one device's director documents are issued one at a time (striped locks)


class DeviceExistsError(ConflictError):
    """``devices add`` with an id the registry already has."""


@dataclass(frozen=True)
class Device:
    id: str
    fleet: str
    group: str
    profile: str
    created_at: str
    last_seen: str | None
    installed_release: str | None
    desired_release: str | None
    status: str  # an edgec.reports.DeviceStatus value ("new" before the first report), or a newer agent's
    telemetry: dict[str, Any] | None

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def hash_password(password: str, salt: bytes | None = None) -> str:
    """A Mosquitto-compatible ``$7$`` hash, so the broker's password file can be generated."""
    salt = salt or secrets.token_bytes(12)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, PBKDF2_ITERATIONS)
    return f"$7${PBKDF2_ITERATIONS}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def verify_password(password: str, stored: str) -> bool:
    _, kind, iterations, salt, digest = stored.split("$")
    if kind != "7":
        return False
    computed = hashlib.pbkdf2_hmac("sha512", password.encode(), base64.b64decode(salt), int(iterations))
    return hmac.compare_digest(computed, base64.b64decode(digest))


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def _sqlite_settings(connection: Any, _record: Any) -> None:
    """Write-ahead logging: the CLI reads while the server writes, and each report costs one
    fsync at checkpoints instead of two per transaction (synchronous=NORMAL is crash-safe in WAL)."""
    cursor = connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.close()


class Registry:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._issuing = [threading.Lock() for _ in range(ISSUING_LOCKS)]

    @classmethod
    def open(cls, url: str) -> Registry:
        """Connect and bring the schema up to date. Raises ``UserInputError`` on a bad URL."""
        try:
            engine = create_engine(url, future=True)
            if engine.dialect.name == "sqlite":
                event.listen(engine, "connect", _sqlite_settings)
            registry = cls(engine)
            registry.migrate()
        except (OperationalError, ProgrammingError) as e:
            raise UserInputError(
                f"cannot open the fleet database {url}: {str(e.orig).strip().splitlines()[0]}"
            ) from e
        except Exception as e:  # a malformed URL
            if isinstance(e, UserInputError):
                raise
            raise UserInputError(f"cannot open the fleet database {url!r}: {e}") from e
        return registry

    def schema_version(self) -> int:
        with self.engine.connect() as conn:
            return int(conn.execute(text("SELECT MAX(version) FROM schema_migrations")).scalar() or 0)

    def migrate(self) -> int:
        with self.engine.begin() as conn:
            conn.execute(
                text(
                    "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, "
                    "applied_at VARCHAR(40) NOT NULL)"
                )
            )
        current = self.schema_version()
        for version, statements in MIGRATIONS:
            if version <= current:
                continue
            with self.engine.begin() as conn:
                for statement in statements:
                    conn.execute(text(statement))
                conn.execute(
                    text("INSERT INTO schema_migrations (version, applied_at) VALUES (:v, :t)"),
                    {"v": version, "t": _now()},
                )
            logger.info("fleet database migrated to schema %d", version)
        return self.schema_version()

    def add_device(self, device_id: str, fleet: str, group: str, profile: str) -> tuple[Device, str]:
        """Create the device and its MQTT password; the password is returned once, stored hashed.
        Every id is a checked name (``InvalidNameError``): they become topic levels, broker
        password and ACL lines, and file names."""
        check_name(device_id, "device id")
        check_name(fleet, "fleet")
        check_name(group, "group")
        check_name(profile, "profile")
        if is_server_login(device_id):
            raise UserInputError(f"device id {device_id!r} is a server replica's login; choose another id")
        password = secrets.token_urlsafe(24)
        try:
            with self.engine.begin() as conn:
                conn.execute(
                    text(
                        "INSERT INTO devices (id, fleet, group_name, profile, password_hash, created_at) "
                        "VALUES (:id, :fleet, :group, :profile, :hash, :now)"
                    ),
                    {
                        "id": device_id,
                        "fleet": fleet,
                        "group": group,
                        "profile": profile,
                        "hash": hash_password(password),
                        "now": _now(),
                    },
                )
        except IntegrityError as e:
            raise DeviceExistsError(f"device {device_id!r} already exists; choose another id") from e
        return self.get(device_id), password

    def _row(self, row: Any) -> Device:
        return Device(
            id=row.id,
            fleet=row.fleet,
            group=row.group_name,
            profile=row.profile,
            created_at=row.created_at,
            last_seen=row.last_seen,
            installed_release=row.installed_release,
            desired_release=row.desired_release,
            status=row.status,
            telemetry=json.loads(row.telemetry) if row.telemetry else None,
        )

    def get(self, device_id: str) -> Device:
        with self.engine.connect() as conn:
            row = conn.execute(text("SELECT * FROM devices WHERE id = :id"), {"id": device_id}).first()
        if row is None:
            raise NotFoundError(f"no device {device_id!r} in the registry (see edgec fleet ls)")
        return self._row(row)

    def remove_device(self, device_id: str) -> Device:
        """Delete the device and its telemetry history; the device as it was. Its director
        document versions are kept: a device re-added under the same id must not be sent a
        version it has already seen (it would refuse it as a replay)."""
        device = self.get(device_id)
        with self.engine.begin() as conn:
            conn.execute(text("DELETE FROM telemetry_windows WHERE device_id = :id"), {"id": device_id})
            conn.execute(text("DELETE FROM devices WHERE id = :id"), {"id": device_id})
        return device

    def password_hash(self, device_id: str) -> str:
        with self.engine.connect() as conn:
            value = conn.execute(
                text("SELECT password_hash FROM devices WHERE id = :id"), {"id": device_id}
            ).scalar()
        if value is None:
            raise NotFoundError(f"no device {device_id!r} in the registry")
        return str(value)

    def devices(self, fleet: str | None = None, group: str | None = None) -> list[Device]:
        conditions, params = [], {}
        if fleet is not None:
            conditions.append("fleet = :fleet")
            params["fleet"] = fleet
        if group is not None:
            conditions.append("group_name = :group")
            params["group"] = group
        where = f" WHERE {' AND '.join(conditions)}" if conditions else ""
        with self.engine.connect() as conn:
            rows = conn.execute(text(f"SELECT * FROM devices{where} ORDER BY id"), params).all()
        return [self._row(r) for r in rows]

    def update(self, device_id: str, **fields: Any) -> None:
        """Set ``last_seen``, ``installed_release``, ``desired_release``, ``status`` or ``telemetry``."""
        allowed = {"last_seen", "installed_release", "desired_release", "status", "telemetry"}
        unknown = set(fields) - allowed
        if unknown:
            raise ValueError(f"unknown device fields {sorted(unknown)}")
        if "telemetry" in fields and fields["telemetry"] is not None:
            fields["telemetry"] = json.dumps(fields["telemetry"], sort_keys=True)
        assignments = ", ".join(f"{name} = :{name}" for name in fields)
        with self.engine.begin() as conn:
            conn.execute(
                text(f"UPDATE devices SET {assignments} WHERE id = :id"), {**fields, "id": device_id}
            )

    def add_window(self, device_id: str, window: dict[str, Any], received_at: str) -> bool:
        """Keep one telemetry window; a window already kept (QoS 1 sends again) is ignored."""
        try:
            with self.engine.begin() as conn:
                conn.execute(
                    text(
                        "INSERT INTO telemetry_windows (device_id, ended_at, received_at, model, figures) "
                        "VALUES (:d, :e, :r, :m, :w)"
                    ),
                    {
                        "d": device_id,
                        "e": window.get("ended_at") or received_at,
                        "r": received_at,
                        "m": window.get("model"),
                        "w": json.dumps(window, sort_keys=True),
                    },
                )
        except IntegrityError:
            return False
        return True

    def windows(self, devices: list[str], since: str) -> dict[str, list[dict[str, Any]]]:
        """Each device's windows received at or after ``since`` (the server's clock, added to each
        window as ``received_at``), oldest first."""
        found: dict[str, list[dict[str, Any]]] = {d: [] for d in devices}
        if not devices:
            return found
        query = "SELECT device_id, figures, received_at FROM telemetry_windows WHERE received_at >= :since"
        params: dict[str, Any] = {"since": since}
        if len(devices) <= MAX_IN_LIST:  # a device's page or a group: only their rows are read
            query += " AND device_id IN :devices"
            params["devices"] = list(devices)
        statement = text(query + " ORDER BY received_at")
        if "devices" in params:
            statement = statement.bindparams(bindparam("devices", expanding=True))
        with self.engine.connect() as conn:
            rows = conn.execute(statement, params).all()
        for device_id, figures, received_at in rows:
            if device_id in found:
                found[device_id].append({**json.loads(figures), "received_at": received_at})
        return found

    def prune_windows(self, before: str) -> int:
        with self.engine.begin() as conn:
            result = conn.execute(text("DELETE FROM telemetry_windows WHERE received_at < :t"), {"t": before})
        return int(result.rowcount or 0)

    # -- director document versions ------------------------------------------------------------
    def director_version(self, fleet: str, device_id: str) -> int:
        """The last director document version issued to the device (0: none yet)."""
        with self.engine.connect() as conn:
            value = conn.execute(
                text("SELECT version FROM director_versions WHERE fleet = :f AND device_id = :d"),
                {"f": fleet, "d": device_id},
            ).scalar()
        return int(value or 0)

    @contextmanager
    def next_director_version(self, fleet: str, device_id: str, release: str) -> Iterator[int]:
        """Take the device's next director document version, recording ``release`` as its
        desired release in the same transaction, and hold the device's issuing lock until the
        block ends: sign and publish the document inside it.

        The version is committed before it is yielded, so a document never leaves with a version
        the registry could hand out again (a crash wastes a version, never repeats one). The lock
        keeps one device's documents in version order on their way to the broker: a lock per
        device in this process and, on PostgreSQL, an advisory lock across server replicas."""
        key = f"{fleet}/{device_id}"
        with self._issuing[hash(key) % ISSUING_LOCKS], self.engine.connect() as conn:
            advisory = self.engine.dialect.name == "postgresql"
            digest = hashlib.sha256(f"edgec director {key}".encode()).digest()
            lock = {"k": int.from_bytes(digest[:8], "big", signed=True)}  # PostgreSQL's lock ids are int8
            if advisory:
                conn.execute(text("SELECT pg_advisory_lock(:k)"), lock)
                conn.commit()  # the lock is the session's: it outlives this transaction
            try:
                version = conn.execute(
                    text(
                        "INSERT INTO director_versions (fleet, device_id, version) VALUES (:f, :d, 1) "
                        "ON CONFLICT (fleet, device_id) "
                        "DO UPDATE SET version = director_versions.version + 1 RETURNING version"
                    ),
                    {"f": fleet, "d": device_id},
                ).scalar_one()
                conn.execute(
                    text("UPDATE devices SET desired_release = :r WHERE id = :d"),
                    {"r": release, "d": device_id},
                )
                conn.commit()
                yield int(version)
            finally:
                if advisory:
                    self._advisory_unlock(conn, lock)

    @staticmethod
    def _advisory_unlock(conn: Connection, lock: dict[str, int]) -> None:
        try:
            conn.rollback()
            conn.execute(text("SELECT pg_advisory_unlock(:k)"), lock)
            conn.commit()
        except Exception:  # the session is broken: closing it for good releases its locks
            logger.warning("could not release a director issuing lock; dropping the connection")
            conn.invalidate()

    def import_director_versions(self, versions: Mapping[tuple[str, str], int]) -> None:
        """Raise each ``(fleet, device)`` counter to at least the given version, never lower
        it: importing the same counters twice changes nothing."""
        if not versions:
            return
        with self.engine.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO director_versions (fleet, device_id, version) VALUES (:f, :d, :v) "
                    "ON CONFLICT (fleet, device_id) DO UPDATE SET version = CASE "
                    "WHEN director_versions.version >= excluded.version THEN director_versions.version "
                    "ELSE excluded.version END"
                ),
                [{"f": fleet, "d": device, "v": v} for (fleet, device), v in sorted(versions.items())],
            )
