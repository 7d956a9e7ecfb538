"""Browser sessions of the dashboard: a signed-in principal behind an opaque cookie.

An operator signs in once with a token (or an identity provider's JWT); the server checks it
with the same ``Authenticator`` as the API and keeps a session: a random id in an
``HttpOnly``, ``SameSite=Strict`` cookie, and a CSRF token the page holds (a ``<meta>``) and
sends back in ``X-CSRF-Token`` on every request that changes something. The credential
itself never reaches the browser's script. Sessions live in this process's memory, bounded
in number and age (a restart signs everyone out); a JWT's session ends when the JWT expires.
"""

from __future__ import annotations

import hmac
import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

from ota_server.auth import Principal

__all__ = ["COOKIE", "CSRF_HEADER", "Session", "SessionStore"]

COOKIE = "edgec_session"
CSRF_HEADER = "x-csrf-token"


@dataclass(frozen=True)
class Session:
    principal: Principal
    csrf: str
    created: float
    expires: float  # monotonic seconds

    def csrf_ok(self, sent: str | None) -> bool:
        return sent is not None and hmac.compare_digest(self.csrf.encode(), sent.encode())


class SessionStore:
    """At most ``max_sessions`` (the oldest goes first), each for at most ``max_age_s`` and
    ``idle_s`` without use."""

    def __init__(self, max_sessions: int = 1000, max_age_s: float = 8 * 3600, idle_s: float = 3600) -> None:
        self.max_sessions = max_sessions
        self.max_age_s = max_age_s
        self.idle_s = idle_s
        self._sessions: OrderedDict[str, tuple[Session, float]] = OrderedDict()
        self._lock = threading.Lock()

    def create(self, principal: Principal, expires_at: float | None = None) -> tuple[str, Session]:
        """A new session for ``principal``; ``expires_at`` (unix time, e.g. a JWT's ``exp``) caps it."""
        now = time.monotonic()
        expires = now + self.max_age_s
        if expires_at is not None:
            expires = min(expires, now + max(expires_at - time.time(), 0))
        session = Session(principal, secrets.token_urlsafe(24), now, expires)
        sid = secrets.token_urlsafe(32)
        with self._lock:
            self._sessions[sid] = (session, now)
            while len(self._sessions) > self.max_sessions:
                self._sessions.popitem(last=False)
        return sid, session

    def get(self, sid: str | None) -> Session | None:
        if not sid or len(sid) > 128:
            return None
        now = time.monotonic()
        with self._lock:
            found = self._sessions.get(sid)
            if found is None:
                return None
            session, last_used = found
            if now > session.expires or now - last_used > self.idle_s:
                del self._sessions[sid]
                return None
            self._sessions[sid] = (session, now)
            self._sessions.move_to_end(sid)
            return session

    def drop(self, sid: str | None) -> None:
        with self._lock:
            self._sessions.pop(sid or "", None)
