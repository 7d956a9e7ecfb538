"""Who is calling the operator API: a principal (a name and a role) from a bearer credential.

A static token is kept as its sha256 digest (a config file holds only those) and compared in
constant time; each has a name, so the audit log says who. Roles are ordered: a viewer reads,
an operator also assigns releases and steers rollouts, an admin does everything.

``Authenticator.principal(header, needed)`` is the one check every route makes: 401 for a
missing or unknown credential, 403 for a role below the one needed.

A credential shaped like a JWT (three base64url parts joined by dots) that is not a static
token is checked as a JWT when ``[http.jwt]`` is configured (``ota_server.jwt_auth``). Every
credential is bounded in size before it is hashed or parsed.

In the server's config, ``[http.tokens]`` holds both forms (``token_grants`` reads them):

    [http.tokens]
    "<64 hex: sha256 of the token>" = "operator"   # old form, named after the digest's first 12
    [http.tokens.ci-bot]                           # named form: the key is the token's name
    sha256 = "<64 hex>"
    role = "operator"
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from edgec.errors import EdgecError
from edgec.names import check_name

if TYPE_CHECKING:
    from ota_server.jwt_auth import JwtVerifier

__all__ = [
    "AuthError",
    "Authenticator",
    "ForbiddenError",
    "NamedToken",
    "Principal",
    "Role",
    "StaticToken",
    "is_jwt_shaped",
    "token_grants",
]

MAX_TOKEN_BYTES = 8192  # a bearer credential's bound when no [http.jwt] sets another
_DIGEST = re.compile(r"[0-9a-f]{64}")
_JWT_SHAPE = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")  # an unsigned one too


class Role(enum.IntEnum):
    VIEWER = 1
    OPERATOR = 2
    ADMIN = 3


@dataclass(frozen=True)
class Principal:
    """Who made a request: ``name`` (a token's name, or a JWT's subject), its role, and how it
    signed in (``"token"``, ``"jwt"``; ``"anonymous"`` for routes that need none);
    ``expires_at``: when the credential ends (a JWT's ``exp``, unix seconds; None for a token)."""

    name: str
    role: Role
    via: str = "token"
    expires_at: float | None = None


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


def is_jwt_shaped(credential: str) -> bool:
    """Whether a credential looks like a JWT: three base64url parts (the last may be empty)."""
    return _JWT_SHAPE.fullmatch(credential) is not None


def _digest(value: str) -> str:
    digest = value.lower()
    if not _DIGEST.fullmatch(digest):
        raise ValueError(f"{value[:70]!r} is not a sha256 hex digest (64 hex digits; edgec server token)")
    return digest


class NamedToken(BaseModel):
    """A named static token in ``[http.tokens.NAME]``: its digest and role."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    sha256: Annotated[str, Field(max_length=64)]  # hex digest of the token (edgec server token prints it)
    role: Literal["viewer", "operator", "admin"]

    @field_validator("sha256")
    @classmethod
    def _is_digest(cls, value: str) -> str:
        return _digest(value)


def token_grants(tokens: Mapping[str, str | NamedToken]) -> list[StaticToken]:
    """``[http.tokens]`` as named static tokens; ``ValueError`` (a pydantic validator's error)
    for a key that fits neither form, or a digest or name given twice.

    A string value is the old form: the key is a digest, the name its first 12 hex digits. A
    table is the named form: the key is the name (``edgec.names``), and may not be a digest, so
    that the two forms cannot be mistaken for each other."""
    grants: list[StaticToken] = []
    for key, value in tokens.items():
        if isinstance(value, NamedToken):
            if _DIGEST.fullmatch(key.lower()):
                raise ValueError(
                    f"[http.tokens.{key[:12]}...] names a token with a digest: "
                    "name it (e.g. [http.tokens.ci-bot])"
                )
            grants.append(StaticToken(check_name(key, "token name"), value.sha256, Role[value.role.upper()]))
        elif value in ("viewer", "operator", "admin"):
            digest = _digest(key)
            grants.append(StaticToken(digest[:12], digest, Role[value.upper()]))
        else:
            raise ValueError(f"token {key[:70]!r}: role {str(value)[:20]!r} is not viewer, operator or admin")
    for field in ("sha256", "name"):
        seen = [getattr(g, field) for g in grants]
        twice = sorted({v for v in seen if seen.count(v) > 1})
        if twice:
            raise ValueError(
                f"[http.tokens] has the {field} {twice[0][:64]} twice: give each token one entry"
            )
    return grants


class Authenticator:
    """Checks bearer credentials against static tokens (and, where configured, JWTs)."""

    def __init__(
        self,
        tokens: Mapping[str, Role] = {},
        static: list[StaticToken] | None = None,
        *,
        jwt: JwtVerifier | None = None,
    ) -> None:
        """``tokens``: plain token → role (tests, a one-off server); ``static``: named digests;
        ``jwt``: the check of an identity provider's JWTs, if any."""
        self._static = list(static or [])
        for token, role in tokens.items():
            digest = hashlib.sha256(token.encode()).hexdigest()
            self._static.append(StaticToken(digest[:12], digest, role))
        self._jwt = jwt
        self.max_token_bytes = jwt.settings.max_token_bytes if jwt is not None else MAX_TOKEN_BYTES

    def principal(self, header: str | None, needed: Role) -> Principal:
        """The caller behind an ``Authorization`` header, allowed ``needed``; else ``AuthError`` or
        ``ForbiddenError``."""
        if not header or not header.startswith("Bearer "):
            raise AuthError("missing bearer token (Authorization: Bearer TOKEN)")
        credential = header.removeprefix("Bearer ").strip()
        if len(credential) > self.max_token_bytes or len(credential.encode()) > self.max_token_bytes:
            raise AuthError(f"bearer token is over the limit of {self.max_token_bytes:,} bytes")
        found = self._static_principal(credential)
        if found is None and is_jwt_shaped(credential):
            if self._jwt is None:
                raise AuthError("a JWT was sent but this server takes no JWTs (no [http.jwt] in its config)")
            found = self._jwt.principal(credential)
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
