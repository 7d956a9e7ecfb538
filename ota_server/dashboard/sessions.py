"""Browser sessions of the dashboard: a signed-in principal behind an opaque cookie.

An operator signs in once with a token (or an identity provider's JWT); the server checks it
with the same ``Authenticator`` as the API and keeps a session: a random id in an
``HttpOnly``, ``SameSite=Strict`` cookie, and a CSRF token the page holds (a ``<meta>``) and
sends back in ``X-CSRF-Token`` on every request that changes something. The credential
itself never reaches the browser's script.

Sessions live in the registry (``dashboard_sessions``), so every server replica sharing it
honours them and a restart signs nobody out. A row is keyed by the sha256 of the cookie's id:
whoever reads the database cannot ride a session. They are bounded in number (the oldest go
first) and age, end after an idle time, and a JWT's session ends when the JWT expires. The
time of last use is written at most once a minute, not on every poll.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import text

from ota_server.auth import Principal, Role
from ota_server.registry import Registry

__all__ = ["COOKIE", "CSRF_HEADER", "Session", "SessionStore"]

COOKIE = "edgec_session"
CSRF_HEADER = "x-csrf-token"
TOUCH_EVERY_S = 60.0  # last use is written at most this often per session
PRUNE_EVERY_S = 60.0


@dataclass(frozen=True)
class Session:
    principal: Principal
    csrf: str
    created: float  # unix seconds
    expires: float  # unix seconds

    def csrf_ok(self, sent: str | None) -> bool:
        return sent is not None and hmac.compare_digest(self.csrf.encode(), sent.encode())


def _key(sid: str) -> str:
    return hashlib.sha256(sid.encode()).hexdigest()


class SessionStore:
    """At most ``max_sessions`` (the oldest go first), each for at most ``max_age_s`` and
    ``idle_s`` without use; in the registry's ``dashboard_sessions``."""

    def __init__(
        self,
        registry: Registry,
        max_sessions: int = 1000,
        max_age_s: float = 8 * 3600,
        idle_s: float = 3600,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.registry = registry
        self.max_sessions = max_sessions
        self.max_age_s = max_age_s
        self.idle_s = idle_s
        self.clock = clock
        self._pruned = 0.0

    def create(self, principal: Principal, expires_at: float | None = None) -> tuple[str, Session]:
        """A new session for ``principal``; ``expires_at`` (unix time, e.g. a JWT's ``exp``) caps it."""
        now = self.clock()
        expires = now + self.max_age_s
        if expires_at is not None:
            expires = min(expires, max(expires_at, now))
        session = Session(principal, secrets.token_urlsafe(24), now, expires)
        sid = secrets.token_urlsafe(32)
        row = {
            "k": _key(sid),
            "n": principal.name[:256],
            "r": int(principal.role),
            "v": principal.via[:16],
            "c": session.csrf,
            "t": now,
            "e": expires,
        }
        with self.registry.engine.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO dashboard_sessions (sid_hash, name, role, via, csrf, created, expires, "
                    "last_used) VALUES (:k, :n, :r, :v, :c, :t, :e, :t)"
                ),
                row,
            )
            count = int(conn.execute(text("SELECT COUNT(*) FROM dashboard_sessions")).scalar_one())
            if count > self.max_sessions:  # the oldest go first
                conn.execute(
                    text(
                        "DELETE FROM dashboard_sessions WHERE sid_hash IN (SELECT sid_hash FROM "
                        "dashboard_sessions ORDER BY created, sid_hash LIMIT :n)"
                    ),
                    {"n": count - self.max_sessions},
                )
        self._prune(now)
        return sid, session

    def get(self, sid: str | None) -> Session | None:
        if not sid or len(sid) > 128:
            return None
        now = self.clock()
        key = _key(sid)
        with self.registry.engine.connect() as conn:
            row = conn.execute(
                text("SELECT * FROM dashboard_sessions WHERE sid_hash = :k"), {"k": key}
            ).first()
        if row is None:
            return None
        if now > row.expires or now - row.last_used > self.idle_s:
            self.drop(sid)
            return None
        if now - row.last_used > TOUCH_EVERY_S:
            with self.registry.engine.begin() as conn:
                conn.execute(
                    text("UPDATE dashboard_sessions SET last_used = :t WHERE sid_hash = :k"),
                    {"t": now, "k": key},
                )
        principal = Principal(row.name, Role(row.role), row.via, None if row.via != "jwt" else row.expires)
        return Session(principal, row.csrf, row.created, row.expires)

    def drop(self, sid: str | None) -> None:
        """Sign out: the session ends on every replica."""
        if not sid or len(sid) > 128:
            return
        with self.registry.engine.begin() as conn:
            conn.execute(text("DELETE FROM dashboard_sessions WHERE sid_hash = :k"), {"k": _key(sid)})

    def _prune(self, now: float) -> None:
        """Expired and idle sessions go, now and then."""
        if now - self._pruned < PRUNE_EVERY_S:
            return
        self._pruned = now
        with self.registry.engine.begin() as conn:
            conn.execute(
                text("DELETE FROM dashboard_sessions WHERE expires < :t OR last_used < :idle"),
                {"t": now, "idle": now - self.idle_s},
            )
