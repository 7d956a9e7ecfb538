"""Sign-in with an identity provider's JWTs: the settings, the issuer's keys (JWKS), the check.

A bearer JWT is accepted when its signature verifies with a key the configured issuer publishes
(a JWKS file, or a URL fetched with a timeout and a size cap), it is within its lifetime (``exp``
required, ``nbf``/``iat`` honoured, ``leeway_s`` of clock skew), and its ``iss`` and ``aud`` are
the configured ones. Its subject becomes the principal's name and its role claim (a string or a
list of strings, mapped through ``role_map``; the highest known role wins) its role.

Only asymmetric algorithms are accepted, from an allowlist checked against the token's header
*before* any key is looked up: ``alg: none`` and HMAC algorithms (HS256: a public key used as a
shared secret, the key-confusion attack) cannot be configured and are refused in a token.
A key is used only for the algorithm family its type fits (an RSA key never checks an ES256
token). Header fields that name keys out of band (``jwk``, ``jku``, ``x5u``, ``x5c``) are ignored:
the keys are the configured issuer's, nothing a token carries.

A valid token whose role claim maps to no role is refused with 403 (``ForbiddenError``): the
caller is who they say, but the issuer grants them nothing here. Every other refusal is 401
(``AuthError``). A refusal's message says what was wrong, never the token.

JWKS from a URL are cached: refreshed every ``jwks_refresh_s``, and on a key id not in the cache
(a key rotation), but never fetched more often than once per ``jwks_min_refetch_s``, whatever
the tokens sent; a failed fetch keeps the keys already cached.
"""

from __future__ import annotations

import base64
import ipaddress
import logging
import math
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from http.client import HTTPException
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import jwt
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from edgec._bounded_json import JsonInputError, loads
from edgec.errors import UserInputError
from ota_server.auth import AuthError, ForbiddenError, Principal, Role

__all__ = ["ASYMMETRIC_ALGORITHMS", "JwksCache", "JwksError", "JwtSettings", "JwtVerifier"]

logger = logging.getLogger(__name__)

# The algorithms a config may allow: signatures with a public key. "none" and HS256/384/512
# are never among them; ES256K and ES521 (PyJWT's non-standard name) are left out on purpose.
ASYMMETRIC_ALGORITHMS = (
    "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA",
)  # fmt: skip
_KEY_TYPE = {  # which JWK kty (and crv) an algorithm may use
    **{alg: ("RSA", None) for alg in ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512")},
    "ES256": ("EC", "P-256"),
    "ES384": ("EC", "P-384"),
    "ES512": ("EC", "P-521"),
    "EdDSA": ("OKP", None),
}
MAX_SUBJECT_CHARS = 256  # a principal's name goes into the audit log and onto pages
MAX_ROLE_VALUES = 64  # a role claim's list
MAX_KID_CHARS = 256
MAX_JWKS_KEYS = 64
MAX_JSON_DEPTH = 16  # a token's header and payload, a JWKS document
RoleName = Literal["viewer", "operator", "admin"]


class JwksError(UserInputError):
    """The issuer's key set could not be read: not there, too large, too slow, or not a JWKS."""


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class JwtSettings(BaseModel):
    """``[http.jwt]`` of the server's config: which issuer's JWTs sign in, and how they map."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    issuer: Annotated[str, Field(min_length=1, max_length=1024)]  # the tokens' "iss", exactly
    audience: Annotated[str, Field(min_length=1, max_length=1024)]  # must be in the tokens' "aud"
    jwks_file: Path | None = None  # the issuer's public keys (a JWKS document), or:
    jwks_url: Annotated[str, Field(max_length=2048)] | None = None  # https, or http on loopback only
    role_claim: Annotated[str, Field(min_length=1, max_length=256)] = "edgec_role"
    # a role claim's value -> an edgec role; replaces (does not extend) the identity default
    role_map: Annotated[dict[str, RoleName], Field(max_length=256)] = {
        "viewer": "viewer",
        "operator": "operator",
        "admin": "admin",
    }
    subject_claim: Annotated[str, Field(min_length=1, max_length=256)] = "sub"  # the principal's name
    algorithms: Annotated[list[str], Field(min_length=1, max_length=len(ASYMMETRIC_ALGORITHMS))] = [
        "RS256",
        "ES256",
        "EdDSA",
    ]
    leeway_s: Annotated[float, Field(ge=0, le=600)] = 30.0  # clock skew allowed on exp, nbf, iat
    max_token_bytes: Annotated[int, Field(ge=512, le=65536)] = 8192
    jwks_refresh_s: Annotated[float, Field(ge=1, le=86400)] = 600.0  # a URL's keys are refetched this often
    jwks_min_refetch_s: Annotated[float, Field(ge=0, le=3600)] = 30.0  # and never more often than this
    jwks_timeout_s: Annotated[float, Field(gt=0, le=60)] = 5.0
    jwks_max_bytes: Annotated[int, Field(ge=1024, le=1 << 20)] = 64 * 1024

    @field_validator("algorithms")
    @classmethod
    def _only_asymmetric(cls, algorithms: list[str]) -> list[str]:
        for alg in algorithms:
            if alg.lower() == "none":
                raise ValueError("algorithm 'none' is refused: it accepts unsigned tokens")
            if alg.upper().startswith("HS"):
                raise ValueError(
                    f"algorithm {alg!r} is refused: HMAC algorithms take a shared secret, and a "
                    "public key used as one forges tokens (key confusion); use RS256, ES256 or EdDSA"
                )
            if alg not in ASYMMETRIC_ALGORITHMS:
                raise ValueError(f"unknown algorithm {alg[:20]!r}; known: {', '.join(ASYMMETRIC_ALGORITHMS)}")
        return algorithms

    @field_validator("jwks_url")
    @classmethod
    def _https_or_loopback(cls, url: str | None) -> str | None:
        if url is None:
            return None
        parts = urlsplit(url)
        if parts.scheme == "https" and parts.hostname:
            return url
        if parts.scheme == "http" and parts.hostname and _is_loopback(parts.hostname):
            return url
        raise ValueError(
            "jwks_url must be https:// (or http:// to a loopback address, 127.0.0.1, ::1 or "
            f"localhost), not {url[:80]!r}: keys fetched in the clear can be replaced on the way"
        )

    @model_validator(mode="after")
    def _one_key_source(self) -> JwtSettings:
        if (self.jwks_file is None) == (self.jwks_url is None):
            raise ValueError("set exactly one of jwks_file and jwks_url (where the issuer's public keys are)")
        return self


# -- the issuer's keys ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Jwk:
    """One verification key from a JWKS: its id, type, curve, declared algorithm, and the key."""

    kid: str | None
    kty: str
    crv: str | None
    alg: str | None
    key: Any  # a cryptography public key, as PyJWT's algorithms take it

    def fits(self, alg: str) -> bool:
        """Whether this key may check a token signed with ``alg`` (type, curve, declared alg)."""
        kty, crv = _KEY_TYPE.get(alg, ("", None))
        return self.kty == kty and (crv is None or self.crv == crv) and self.alg in (None, alg)


def parse_jwks(data: bytes, max_bytes: int) -> dict[str | None, Jwk]:
    """The signing keys of a JWKS document, by key id; symmetric, private and broken entries are
    skipped (and logged). ``JwksError`` if the document is not a JWKS or has no usable key."""
    try:
        document = loads(data, max_bytes=max_bytes, max_depth=MAX_JSON_DEPTH)
    except JsonInputError as e:
        raise JwksError(f"the JWKS is {e}") from None
    entries = document.get("keys") if isinstance(document, dict) else None
    if not isinstance(entries, list):
        raise JwksError('the JWKS is not a JSON object with a "keys" list')
    if len(entries) > MAX_JWKS_KEYS:
        raise JwksError(f"the JWKS has {len(entries)} keys, over the limit of {MAX_JWKS_KEYS}")
    keys: dict[str | None, Jwk] = {}
    for i, entry in enumerate(entries):
        reason = _unusable(entry)
        if reason is None:
            try:
                jwk = jwt.PyJWK(entry)
            except (jwt.PyJWTError, ValueError, TypeError) as e:
                reason = f"not a valid key ({type(e).__name__})"
        if reason is None and entry.get("kid") in keys:
            reason = "a key id already used by an earlier key"
        if reason is not None:
            logger.warning("JWKS key #%d skipped: %s", i, reason)
            continue
        kid = entry.get("kid")
        keys[kid] = Jwk(kid, entry["kty"], entry.get("crv"), entry.get("alg"), jwk.key)
    if not keys:
        raise JwksError("the JWKS has no usable signing key (RSA, EC or OKP public keys)")
    return keys


def _unusable(entry: object) -> str | None:
    """Why a JWKS entry cannot be a verification key, or None."""
    if not isinstance(entry, dict):
        return "not a JSON object"
    if entry.get("kty") not in ("RSA", "EC", "OKP"):
        return (
            f"key type {str(entry.get('kty'))[:10]!r} is not RSA, EC or OKP (symmetric keys are never used)"
        )
    if "d" in entry:
        return "it holds private key material (publish only public keys)"
    if entry.get("use", "sig") != "sig":
        return "its use is not sig"
    kid = entry.get("kid")
    if kid is not None and (not isinstance(kid, str) or len(kid) > MAX_KID_CHARS):
        return f"its kid is not a string of at most {MAX_KID_CHARS} characters"
    alg = entry.get("alg")
    if alg is not None and alg not in ASYMMETRIC_ALGORITHMS:
        return f"its alg {str(alg)[:20]!r} is not an asymmetric signature algorithm"
    return None


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """A JWKS URL is fetched where it says: a redirect (maybe to http://) is a failure."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


def fetch_url(url: str, timeout_s: float, max_bytes: int) -> bytes:
    """GET ``url``: at most ``max_bytes``, within about ``timeout_s``; ``JwksError`` otherwise."""
    handlers: list[urllib.request.BaseHandler] = [_NoRedirect()]
    if _is_loopback(urlsplit(url).hostname or ""):
        handlers.append(urllib.request.ProxyHandler({}))  # a loopback address is never proxied
    opener = urllib.request.build_opener(*handlers)
    request = urllib.request.Request(
        url, headers={"Accept": "application/json", "User-Agent": "edgec-server"}
    )
    deadline = time.monotonic() + timeout_s
    try:
        with opener.open(request, timeout=timeout_s) as response:
            if response.status != 200:
                raise JwksError(f"fetching the JWKS from {url} answered HTTP {response.status}")
            data = b""
            while chunk := response.read1(65536):
                data += chunk
                if len(data) > max_bytes:
                    raise JwksError(f"the JWKS at {url} is over the limit of {max_bytes:,} bytes")
                if time.monotonic() > deadline:
                    raise JwksError(f"fetching the JWKS from {url} took over {timeout_s:g} s")
            return data
    except urllib.error.HTTPError as e:
        raise JwksError(f"fetching the JWKS from {url} answered HTTP {e.code}") from None
    except urllib.error.URLError as e:
        raise JwksError(f"cannot fetch the JWKS from {url}: {e.reason}") from None
    except (TimeoutError, OSError, HTTPException, ValueError) as e:
        raise JwksError(f"cannot fetch the JWKS from {url}: {type(e).__name__}: {e}"[:300]) from None


class JwksCache:
    """The issuer's keys, loaded through ``load`` (a file read or a URL fetch) and cached.

    ``key(kid)`` never loads more often than once per ``min_refetch_s``: a periodic refresh every
    ``refresh_s`` (skipped, not waited for, while another thread loads), and one on a key id not
    in the cache. A failed load keeps the cached keys and is logged."""

    def __init__(
        self,
        load: Callable[[], bytes],
        *,
        where: str,
        refresh_s: float,
        min_refetch_s: float,
        max_bytes: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._load = load
        self.where = where
        self._refresh_s = refresh_s
        self._min_refetch_s = min_refetch_s
        self._max_bytes = max_bytes
        self._clock = clock
        self._lock = threading.Lock()
        self._keys: dict[str | None, Jwk] = {}
        self._attempted = -math.inf  # the last load, failed or not
        self._loaded = -math.inf  # the last load that gave keys
        self.loads = 0  # how many loads were tried (for tests and metrics)
        self.last_error: str | None = None

    @property
    def keys(self) -> dict[str | None, Jwk]:
        return self._keys

    def refresh(self, *, wait: bool = True) -> bool:
        """Load the keys now, unless a load ran less than ``min_refetch_s`` ago (or, with
        ``wait=False``, one is running); whether the cache now holds keys from this load."""
        if not self._lock.acquire(blocking=wait):
            return False
        try:
            now = self._clock()
            if now - self._attempted < self._min_refetch_s:
                return False
            self._attempted = now
            self.loads += 1
            try:
                self._keys = parse_jwks(self._load(), self._max_bytes)
            except JwksError as e:
                self.last_error = str(e)
                logger.warning(
                    "JWKS from %s not refreshed, keeping %d cached keys: %s", self.where, len(self._keys), e
                )
                return False
            self._loaded = now
            self.last_error = None
            return True
        finally:
            self._lock.release()

    def key(self, kid: str | None) -> Jwk | None:
        """The key with id ``kid`` (refreshing as the rules above allow), or None."""
        if self._clock() - self._loaded >= self._refresh_s:
            self.refresh(wait=False)
        found = self._keys.get(kid)
        if found is None and self.refresh():
            found = self._keys.get(kid)
        return found


# -- the check ------------------------------------------------------------------------------------
def _segment(part: str, what: str, max_bytes: int) -> Any:
    """A base64url JSON segment of a token, decoded and parsed with bounds."""
    try:
        raw = base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))
        return loads(raw, max_bytes=max_bytes, max_depth=MAX_JSON_DEPTH)
    except (ValueError, JsonInputError):
        raise AuthError(f"malformed JWT: its {what} is not base64url JSON") from None


def _shown(value: object, limit: int = 40) -> str:
    """A value from a token, for a message: repr'd and cut short."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class JwtVerifier:
    """Turns a bearer JWT into a ``Principal``, or refuses it (``AuthError``, ``ForbiddenError``)."""

    def __init__(
        self,
        settings: JwtSettings,
        *,
        clock: Callable[[], float] = time.monotonic,
        keys: JwksCache | None = None,
    ) -> None:
        """Loads the issuer's keys once now: a JWKS file that cannot be read is a config error
        (``JwksError``); a URL that cannot be fetched is logged and retried on use."""
        self.settings = settings
        if keys is None:
            keys = self._cache(settings, clock)
            if not keys.refresh() and settings.jwks_file is not None:
                raise JwksError(f"[http.jwt] jwks_file {settings.jwks_file}: {keys.last_error}")
        self.keys = keys

    @staticmethod
    def _cache(settings: JwtSettings, clock: Callable[[], float]) -> JwksCache:
        common: dict[str, Any] = {
            "refresh_s": settings.jwks_refresh_s,
            "min_refetch_s": settings.jwks_min_refetch_s,
            "max_bytes": settings.jwks_max_bytes,
            "clock": clock,
        }
        if settings.jwks_url is not None:
            url = settings.jwks_url
            return JwksCache(
                lambda: fetch_url(url, settings.jwks_timeout_s, settings.jwks_max_bytes), where=url, **common
            )
        path = settings.jwks_file
        assert path is not None  # JwtSettings: exactly one source

        def read() -> bytes:
            try:
                with path.open("rb") as f:
                    return f.read(settings.jwks_max_bytes + 1)
            except OSError as e:
                raise JwksError(f"cannot read {path}: {e.strerror}") from None

        return JwksCache(read, where=str(path), **common)

    def principal(self, token: str) -> Principal:
        """The principal a JWT signs in as; the steps in the module's docstring, in order."""
        s = self.settings
        if len(token.encode()) > s.max_token_bytes:
            raise AuthError(f"bearer token is over the limit of {s.max_token_bytes:,} bytes")
        parts = token.split(".")
        if len(parts) != 3:
            raise AuthError("malformed JWT: not three base64url parts")
        header = _segment(parts[0], "header", s.max_token_bytes)
        _segment(parts[1], "payload", s.max_token_bytes)  # bounded parse before PyJWT's own
        if not isinstance(header, dict):
            raise AuthError("malformed JWT: its header is not a JSON object")
        alg = header.get("alg")
        if isinstance(alg, str) and alg.lower() == "none":
            raise AuthError("unsigned JWT (alg none) refused")
        if alg not in s.algorithms:
            raise AuthError(
                f"JWT algorithm {_shown(alg, 24)} is not allowed (allowed: {', '.join(s.algorithms)})"
            )
        kid = header.get("kid")
        if kid is not None and (not isinstance(kid, str) or len(kid) > MAX_KID_CHARS):
            raise AuthError(f"malformed JWT: its kid is not a string of at most {MAX_KID_CHARS} characters")
        key = self._key(kid)
        if not key.fits(alg):
            raise AuthError(f"JWT algorithm {alg} does not fit key {_shown(kid)} ({key.kty} {key.alg or ''})")
        claims = self._verified_claims(token, key, alg)
        return Principal(self._subject(claims), self._role(claims), "jwt", self._expiry(claims))

    def _key(self, kid: str | None) -> Jwk:
        key = self.keys.key(kid)
        if key is not None:
            return key
        if kid is None:
            cached = list(self.keys.keys.values())
            if len(cached) == 1:  # a token without kid, an issuer with one key: that key
                return cached[0]
            raise AuthError(f"JWT has no kid and the issuer's JWKS has {len(cached)} keys: cannot choose one")
        raise AuthError(f"unknown JWT key id {_shown(kid)}: not in the issuer's JWKS")

    def _verified_claims(self, token: str, key: Jwk, alg: str) -> dict[str, Any]:
        s = self.settings
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key.key,
                algorithms=[alg],
                audience=s.audience,
                issuer=s.issuer,
                leeway=s.leeway_s,
                options={"require": ["exp", "iss", "aud"]},
            )
            return claims
        except jwt.ExpiredSignatureError:
            raise AuthError("JWT expired (exp is in the past); sign in again") from None
        except jwt.ImmatureSignatureError:
            raise AuthError("JWT not valid yet (nbf or iat is in the future)") from None
        except jwt.InvalidAudienceError:
            raise AuthError(f"JWT audience is not {s.audience!r}") from None
        except jwt.InvalidIssuerError:
            raise AuthError(f"JWT issuer is not {s.issuer!r}") from None
        except jwt.InvalidSignatureError:
            raise AuthError("JWT signature does not verify with the issuer's key") from None
        except jwt.MissingRequiredClaimError as e:
            raise AuthError(f"JWT lacks the {e.claim!r} claim") from None
        except jwt.InvalidTokenError as e:  # DecodeError, InvalidKeyError, InvalidIssuedAtError...
            raise AuthError(f"JWT refused: {type(e).__name__}") from None

    def _subject(self, claims: dict[str, Any]) -> str:
        name = self.settings.subject_claim
        subject = claims.get(name)
        if (
            not isinstance(subject, str)
            or not 0 < len(subject) <= MAX_SUBJECT_CHARS
            or not subject.isprintable()
        ):
            raise AuthError(
                f"JWT claim {name!r} (the caller's name) is missing or not "
                f"1-{MAX_SUBJECT_CHARS} printable characters"
            )
        return subject

    def _role(self, claims: dict[str, Any]) -> Role:
        """The highest role the role claim's values map to; 403 if none does."""
        name = self.settings.role_claim
        value = claims.get(name)
        values = [value] if isinstance(value, str) else value
        if not isinstance(values, list) or len(values) > MAX_ROLE_VALUES:
            raise ForbiddenError(
                f"JWT claim {name!r} is missing or not a string or a list of at most {MAX_ROLE_VALUES} "
                "strings: the issuer grants this caller no edgec role"
            )
        roles = [
            Role[self.settings.role_map[v].upper()]
            for v in values
            if isinstance(v, str) and v in self.settings.role_map
        ]
        if not roles:
            raise ForbiddenError(
                f"JWT claim {name!r} ({_shown(values, 60)}) maps to no edgec role: "
                "add it to [http.jwt] role_map"
            )
        return max(roles)

    @staticmethod
    def _expiry(claims: dict[str, Any]) -> float | None:
        exp = claims.get("exp")
        return float(exp) if isinstance(exp, int | float) else None
