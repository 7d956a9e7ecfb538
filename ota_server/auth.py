"""Who is calling the operator API: a principal (a name and a role) from a bearer credential.

A static token is kept as its sha256 digest (a config file holds only those) and compared in
constant time; each has a name, so the audit log says who. Roles are ordered: a viewer reads,
an operator also assigns releases and steers rollouts, an admin does everything.

``Authenticator.principal(header, needed)`` is the one check every route makes: 401 for a
missing or unknown credential, 403 for a role below the one needed.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
from collections.abc import Mapping
from dataclasses import dataclass

from edgec.errors import EdgecError

__all__ = ["AuthError", "Authenticator", "ForbiddenError", "Principal", "Role", "StaticToken"]


class Role(enum.IntEnum):
    VIEWER = 1
    OPERATOR = 2
    ADMIN = 3


@dataclass(frozen=True)
class Principal:
    """Who made a request: ``name`` (a token's name, or a JWT's subject), its role, and how it
    signed in (``"token"``, ``"jwt"``; ``"anonymous"`` for routes that need none)."""

    name: str
    role: Role
    via: str = "token"


ANONYMOUS = Principal("anonymous", Role.VIEWER, "anonymous")


class AuthError(EdgecError):
    """No credential, or one that is not valid (HTTP 401); the message says which."""


class ForbiddenError(EdgecError):
    """A valid credential whose role is below what the request needs (HTTP 403)."""


@dataclass(frozen=True)
class StaticToken:
    name: str
    sha256: str  # hex digest of the token
    role: Role


class Authenticator:
    """Checks bearer credentials against static tokens (and, where configured, JWTs)."""

    def __init__(self, tokens: Mapping[str, Role] = {}, static: list[StaticToken] | None = None) -> None:
        """``tokens``: plain token → role (tests, a one-off server); ``static``: named digests."""
        self._static = list(static or [])
        for token, role in tokens.items():
            digest = hashlib.sha256(token.encode()).hexdigest()
            self._static.append(StaticToken(digest[:12], digest, role))

    def principal(self, header: str | None, needed: Role) -> Principal:
        """The caller behind an ``Authorization`` header, allowed ``needed``; else ``AuthError`` or
        ``ForbiddenError``."""
        if not header or not header.startswith("Bearer "):
            raise AuthError("missing bearer token (Authorization: Bearer TOKEN)")
        credential = header.removeprefix("Bearer ").strip()
        found = self._static_principal(credential)
        if found is None:
            raise AuthError("unknown token")
        if found.role < needed:
            raise ForbiddenError(
                f"a {found.role.name.lower()} token cannot do this; it needs {needed.name.lower()}"
            )
        return found

    def _static_principal(self, credential: str) -> Principal | None:
        digest = hashlib.sha256(credential.encode()).hexdigest()
        match = None
        for token in self._static:  # every digest compared: the time says nothing of which matched
            if hmac.compare_digest(token.sha256, digest):
                match = token
        return None if match is None else Principal(match.name, match.role, "token")
