"""Attacks on JWT sign-in, each refused with a one-line reason that never echoes the token.

Keys are made in the test; the issuer's JWKS is a file, or served by a real HTTP server on
127.0.0.1 where fetching matters. Tokens PyJWT will not make (``alg: none``, HS256 signed with
the public key, headers naming the attacker's key) are forged by hand.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time

import jwt
import pytest
from cryptography.hazmat.primitives import serialization

from ota_server.auth import Authenticator, AuthError, ForbiddenError, Role
from ota_server.jwt_auth import JwtSettings, JwtVerifier
from tests._jwt_issuer import AUDIENCE, ISSUER, Clock, Issuer, b64, forge, new_key, public_jwk, serve_jwks


@pytest.fixture(scope="module")
def issuer() -> Issuer:
    return Issuer.with_keys("RS256", "ES256")


@pytest.fixture
def auth(issuer, tmp_path) -> Authenticator:
    settings = JwtSettings(issuer=ISSUER, audience=AUDIENCE, jwks_file=issuer.write_jwks(tmp_path / "j.json"))
    return Authenticator({"static-admin": Role.ADMIN}, jwt=JwtVerifier(settings))


def _refused(auth: Authenticator, token: str, needed: Role = Role.VIEWER) -> str:
    """The one-line 401 message for ``token``; it must not contain the token or its parts."""
    with pytest.raises(AuthError) as caught:
        auth.principal(f"Bearer {token}", needed)
    message = str(caught.value)
    assert "\n" not in message
    assert token not in message
    assert all(part not in message for part in token.split(".") if len(part) > 8)
    return message


def _forbidden(auth: Authenticator, token: str) -> str:
    with pytest.raises(ForbiddenError) as caught:
        auth.principal(f"Bearer {token}", Role.VIEWER)
    return str(caught.value)


def test_expired_token_refused(auth, issuer):
    now = int(time.time())
    assert "expired" in _refused(auth, issuer.token(iat=now - 3600, nbf=now - 3600, exp=now - 60))


def test_expired_token_within_the_leeway_still_accepted_but_not_beyond(auth, issuer):
    now = int(time.time())
    assert auth.principal(f"Bearer {issuer.token(exp=now - 10)}", Role.VIEWER).via == "jwt"
    assert "expired" in _refused(auth, issuer.token(exp=now - 40))


def test_token_not_yet_valid_refused(auth, issuer):
    assert "not valid yet" in _refused(auth, issuer.token(nbf=int(time.time()) + 600))


def test_token_issued_in_the_future_refused(auth, issuer):
    assert "not valid yet" in _refused(auth, issuer.token(iat=int(time.time()) + 600, nbf=None))


def test_token_without_expiry_refused(auth, issuer):
    assert "lacks the 'exp' claim" in _refused(auth, issuer.token(exp=None))


def test_token_for_another_audience_refused(auth, issuer):
    assert f"audience is not {AUDIENCE!r}" in _refused(auth, issuer.token(aud="some-other-api"))
    assert "lacks the 'aud' claim" in _refused(auth, issuer.token(aud=None))


def test_token_from_another_issuer_refused(auth, issuer):
    assert f"issuer is not {ISSUER!r}" in _refused(auth, issuer.token(iss="https://evil.example.test"))


def test_token_from_another_issuer_signed_with_its_own_key_refused(auth, issuer):
    evil = Issuer()
    evil.add("rs256-1", "RS256")  # the same kid as the real issuer's key, another key
    assert "signature does not verify" in _refused(auth, evil.token())


@pytest.mark.parametrize("alg", ["none", "None", "NONE", "nOnE"])
def test_alg_none_token_refused(auth, issuer, alg):
    token = forge({"alg": alg, "typ": "JWT", "kid": "rs256-1"}, issuer.claims(edgec_role="admin"))
    assert token.endswith(".")  # no signature at all
    assert "unsigned JWT (alg none) refused" in _refused(auth, token)


def test_alg_none_token_with_a_signature_part_refused(auth, issuer):
    token = forge({"alg": "none"}, issuer.claims(edgec_role="admin"), b"anything")
    assert "alg none" in _refused(auth, token)


def test_hs256_key_confusion_with_the_public_key_refused(auth, issuer):
    """The classic: sign HS256 with the issuer's *public* key (PEM, and the JWK's n) as the HMAC
    secret; a verifier that lets the token choose the algorithm would accept it."""
    public = issuer.keys["rs256-1"][1].public_key()
    pem = public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    for secret in (pem, pem.strip(), public_jwk(issuer.keys["rs256-1"][1], None)["n"].encode()):
        header, claims = {"alg": "HS256", "typ": "JWT", "kid": "rs256-1"}, issuer.claims(edgec_role="admin")
        unsigned = forge(header, claims).rstrip(".")
        signature = hmac.new(secret, unsigned.encode(), hashlib.sha256).digest()
        message = _refused(auth, f"{unsigned}.{b64(signature)}")
        assert "algorithm 'HS256' is not allowed" in message


def test_algorithm_swap_to_another_allowed_family_refused(auth, issuer):
    """An ES256 token naming the RSA key's kid: the RSA key never checks an EC signature."""
    _, ec_key = issuer.keys["es256-1"]
    claims = issuer.claims(edgec_role="admin")
    token = jwt.encode(claims, ec_key, algorithm="ES256", headers={"kid": "rs256-1"})
    assert "does not fit key 'rs256-1'" in _refused(auth, token)


def test_unknown_kid_refused(auth, issuer):
    attacker = new_key("RS256")
    token = jwt.encode(issuer.claims(), attacker, algorithm="RS256", headers={"kid": "attacker-key"})
    assert "unknown JWT key id 'attacker-key'" in _refused(auth, token)


def test_unknown_kid_flood_fetches_the_jwks_at_most_once_per_interval():
    issuer = Issuer.with_keys("RS256")
    clock = Clock()
    with serve_jwks(issuer.jwks()) as jwks:
        settings = JwtSettings(issuer=ISSUER, audience=AUDIENCE, jwks_url=jwks.url, jwks_min_refetch_s=30)
        auth = Authenticator(jwt=JwtVerifier(settings, clock=clock))
        attacker = new_key("RS256")
        for i in range(50):
            token = jwt.encode(issuer.claims(), attacker, algorithm="RS256", headers={"kid": f"k{i}"})
            _refused(auth, token)
        assert jwks.requests == 1  # the start's fetch only
        clock.advance(30)
        for i in range(50):
            token = jwt.encode(issuer.claims(), attacker, algorithm="RS256", headers={"kid": f"j{i}"})
            _refused(auth, token)
        assert jwks.requests == 2


def test_embedded_jwk_header_is_not_trusted(auth, issuer):
    """A token that carries its own key (``jwk``) and no kid the issuer knows: the key is ignored."""
    attacker = new_key("RS256")
    headers = {"jwk": public_jwk(attacker, "evil"), "kid": "evil"}
    token = jwt.encode(issuer.claims(edgec_role="admin"), attacker, algorithm="RS256", headers=headers)
    assert "unknown JWT key id 'evil'" in _refused(auth, token)
    headers = {"jwk": public_jwk(attacker, "rs256-1"), "kid": "rs256-1"}
    token = jwt.encode(issuer.claims(edgec_role="admin"), attacker, algorithm="RS256", headers=headers)
    assert "signature does not verify" in _refused(auth, token)


def test_jku_header_is_never_fetched(auth, issuer):
    attacker = Issuer()
    attacker.add("rs256-1", "RS256")
    with serve_jwks(attacker.jwks()) as evil:
        token = attacker.token(headers={"jku": evil.url, "x5u": evil.url})
        assert "signature does not verify" in _refused(auth, token)
        assert evil.requests == 0


def test_tampered_payload_refused(auth, issuer):
    head, _, signature = issuer.token(edgec_role="viewer").split(".")
    escalated = b64(json.dumps(issuer.claims(edgec_role="admin")).encode())
    assert "signature does not verify" in _refused(auth, f"{head}.{escalated}.{signature}", Role.ADMIN)


def test_tampered_signature_refused(auth, issuer):
    token = issuer.token("es256-1")
    flipped = token[:-2] + ("A" if token[-2] != "A" else "B") + token[-1]
    assert "signature does not verify" in _refused(auth, flipped)


def test_role_claim_missing_is_forbidden(auth, issuer):
    assert "grants this caller no edgec role" in _forbidden(auth, issuer.token(edgec_role=None))


def test_role_claim_unknown_is_forbidden(auth, issuer):
    assert "maps to no edgec role" in _forbidden(auth, issuer.token(edgec_role="superuser"))
    assert "maps to no edgec role" in _forbidden(auth, issuer.token(edgec_role=["ADMIN", "root"]))
    assert "no edgec role" in _forbidden(auth, issuer.token(edgec_role={"admin": True}))
    assert "no edgec role" in _forbidden(auth, issuer.token(edgec_role=["viewer"] * 65))


def test_oversize_token_refused_before_parsing(auth, issuer):
    token = issuer.token(padding="x" * 9000)
    assert "over the limit of 8,192 bytes" in _refused(auth, token)
    assert "over the limit" in _refused(auth, "a" * 9000)  # a static token too


def test_deeply_nested_header_refused_without_a_crash(auth):
    header = b64(b"[" * 3000 + b"]" * 3000)
    assert "malformed JWT" in _refused(auth, f"{header}.{b64(b'{}')}.")


@pytest.mark.parametrize(
    "token",
    ["e30.e30.", "bm90anNvbg.e30.c2ln", "e30.bm90anNvbg.c2ln", "W10.e30.c2ln", "e30.e30.c2ln"],
    ids=["empty-header", "header-not-json", "payload-not-json", "header-a-list", "no-alg"],
)
def test_malformed_tokens_refused_with_a_reason(auth, token):
    message = _refused(auth, token)
    assert "malformed JWT" in message or "algorithm None is not allowed" in message


def test_subject_with_control_characters_refused(auth, issuer):
    """A subject goes into the audit log and onto pages: no newlines to forge a log line."""
    message = _refused(auth, issuer.token(sub="alice\nadmin logged in"))
    assert "printable" in message
    assert "printable" in _refused(auth, issuer.token(sub="x" * 300))
    assert "printable" in _refused(auth, issuer.token(sub=None))


def test_symmetric_and_private_keys_in_the_jwks_are_never_used(issuer, tmp_path):
    jwks = issuer.jwks()
    jwks["keys"].append({"kty": "oct", "kid": "shared", "k": b64(b"secret")})
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps(jwks))
    auth = Authenticator(jwt=JwtVerifier(JwtSettings(issuer=ISSUER, audience=AUDIENCE, jwks_file=path)))
    unsigned = forge({"alg": "HS256", "kid": "shared"}, issuer.claims(edgec_role="admin")).rstrip(".")
    signature = hmac.new(b"secret", unsigned.encode(), hashlib.sha256).digest()
    assert "not allowed" in _refused(auth, f"{unsigned}.{b64(signature)}")
    verifier = auth._jwt
    assert verifier is not None
    assert "shared" not in verifier.keys.keys


def test_jwks_redirect_is_not_followed():
    issuer = Issuer.with_keys("RS256")
    with serve_jwks(issuer.jwks()) as good, serve_jwks({"keys": []}) as redirecting:
        redirecting.redirect_to = good.url
        settings = JwtSettings(issuer=ISSUER, audience=AUDIENCE, jwks_url=redirecting.url)
        verifier = JwtVerifier(settings, clock=Clock())
        assert good.requests == 0
        assert "HTTP 302" in (verifier.keys.last_error or "")
