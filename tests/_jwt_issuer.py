"""A test's own identity provider: keys made in the test, tokens it signs, its JWKS as a file
and served over HTTP by a real ``http.server`` on 127.0.0.1.

``Issuer`` signs with real RSA, EC (P-256) and Ed25519 keys through PyJWT; ``forge`` builds a
token by hand (any header, any signature bytes) for the attacks PyJWT refuses to make.
``JwksServer`` counts the requests it answers and can be told to fail, stall, redirect or
answer too much, so tests see exactly when the server under test fetches.
"""

from __future__ import annotations

import base64
import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

ISSUER = "https://idp.example.test/realms/edge"
AUDIENCE = "edgec-operator-api"


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forge(header: dict[str, Any], claims: dict[str, Any], signature: bytes = b"") -> str:
    """A token assembled by hand: whatever header and signature bytes an attacker chooses."""
    head = b64(json.dumps(header).encode())
    body = b64(json.dumps(claims).encode())
    return f"{head}.{body}.{b64(signature)}"


def new_key(alg: str) -> Any:
    if alg.startswith(("RS", "PS")):
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    if alg == "ES256":
        return ec.generate_private_key(ec.SECP256R1())
    if alg == "EdDSA":
        return ed25519.Ed25519PrivateKey.generate()
    raise ValueError(alg)


def public_jwk(key: Any, kid: str | None) -> dict[str, Any]:
    public = key.public_key()
    if isinstance(key, rsa.RSAPrivateKey):
        jwk = RSAAlgorithm.to_jwk(public, as_dict=True)
    elif isinstance(key, ec.EllipticCurvePrivateKey):
        jwk = ECAlgorithm.to_jwk(public, as_dict=True)
    else:
        jwk = OKPAlgorithm.to_jwk(public, as_dict=True)
    if kid is not None:
        jwk["kid"] = kid
    return dict(jwk)


@dataclass
class Issuer:
    """Signing keys by kid (and the algorithm each signs with); ``jwks()`` publishes them."""

    keys: dict[str, tuple[str, Any]] = field(default_factory=dict)

    @classmethod
    def with_keys(cls, *algs: str) -> Issuer:
        issuer = cls()
        for alg in algs:
            issuer.add(f"{alg.lower()}-1", alg)
        return issuer

    def add(self, kid: str, alg: str) -> None:
        self.keys[kid] = (alg, new_key(alg))

    def jwks(self) -> dict[str, Any]:
        return {"keys": [public_jwk(key, kid) for kid, (_, key) in self.keys.items()]}

    def write_jwks(self, path: Path) -> Path:
        path.write_text(json.dumps(self.jwks()))
        return path

    def claims(self, **overrides: Any) -> dict[str, Any]:
        now = int(time.time())
        claims: dict[str, Any] = {
            "iss": ISSUER,
            "aud": AUDIENCE,
            "sub": "alice@example.test",
            "iat": now,
            "nbf": now,
            "exp": now + 300,
            "edgec_role": "operator",
        }
        claims.update(overrides)
        return {k: v for k, v in claims.items() if v is not None}  # None: leave the claim out

    def token(self, kid: str | None = None, headers: dict[str, Any] | None = None, **claims: Any) -> str:
        """A token signed by key ``kid`` (the first key by default) with ``claims`` over the defaults."""
        kid = kid or next(iter(self.keys))
        alg, key = self.keys[kid]
        return jwt.encode(self.claims(**claims), key, algorithm=alg, headers={"kid": kid, **(headers or {})})


@dataclass
class JwksServer:
    """What the JWKS endpoint answers, and how many times it was asked."""

    document: dict[str, Any] | bytes
    port: int = 0
    requests: int = 0
    status: int = 200
    stall_s: float = 0.0
    redirect_to: str | None = None
    paths: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/jwks.json"


@contextmanager
def serve_jwks(document: dict[str, Any] | bytes) -> Iterator[JwksServer]:
    """A real HTTP server on 127.0.0.1 answering ``GET`` with the JWKS (or as told)."""
    state = JwksServer(document)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            state.requests += 1
            state.paths.append(self.path)
            if state.stall_s:
                time.sleep(state.stall_s)
            if state.redirect_to:
                self.send_response(302)
                self.send_header("Location", state.redirect_to)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            document = state.document
            body = document if isinstance(document, bytes) else json.dumps(document).encode()
            self.send_response(state.status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            with suppress(BrokenPipeError, ConnectionResetError):
                self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    state.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, name="jwks", daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


class Clock:
    """A monotonic clock the test moves by hand (the JWKS cache's refresh timing)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds
