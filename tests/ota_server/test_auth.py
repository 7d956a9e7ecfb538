"""Who calls the operator API: named static tokens (both config forms), roles in order, and
JWT sign-in with keys made in the test, from a JWKS file and from a JWKS URL served by a real
HTTP server on 127.0.0.1 (fetched, cached, refreshed on schedule and on a new key id, never more
often than allowed, and kept when a fetch fails). The attacks are in tests/security/test_jwt_attacks.py.
"""

from __future__ import annotations

import hashlib
import json
import time
import tomllib
import urllib.error
import urllib.request

import pytest
from pydantic import ValidationError

from ota_server.auth import Authenticator, AuthError, ForbiddenError, Principal, Role, token_grants
from ota_server.jwt_auth import JwksError, JwtSettings, JwtVerifier
from ota_server.server import HttpSettings
from tests._jwt_issuer import AUDIENCE, ISSUER, Clock, Issuer, serve_jwks
from tests.ota_server.test_broker_acl import broker  # noqa: F401  (fixture)
from tests.ota_server.test_server_process import server_config  # noqa: F401  (fixture)


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _settings(**overrides) -> JwtSettings:
    return JwtSettings(issuer=ISSUER, audience=AUDIENCE, **overrides)


@pytest.fixture(scope="module")
def issuer() -> Issuer:
    return Issuer.with_keys("RS256", "ES256", "EdDSA")


@pytest.fixture
def auth(issuer, tmp_path) -> Authenticator:
    jwks = issuer.write_jwks(tmp_path / "jwks.json")
    return Authenticator({"static-op": Role.OPERATOR}, jwt=JwtVerifier(_settings(jwks_file=jwks)))


# -- static tokens -----------------------------------------------------------------------------
def _http_settings(toml: str) -> HttpSettings:
    return HttpSettings(**tomllib.loads(toml)["http"])


def test_old_form_digest_config_still_works_and_is_named_by_its_digest():
    http = _http_settings(f'[http.tokens]\n"{_digest("tok-1")}" = "operator"\n')
    auth = Authenticator(static=token_grants(http.tokens))
    assert auth.principal("Bearer tok-1", Role.OPERATOR) == Principal(_digest("tok-1")[:12], Role.OPERATOR)


def test_named_static_token_signs_in_as_its_name_beside_the_old_form():
    toml = (
        f'[http.tokens]\n"{_digest("old-tok")}" = "viewer"\n\n'
        f'[http.tokens.ci-bot]\nsha256 = "{_digest("ci-tok")}"\nrole = "operator"\n'
    )
    auth = Authenticator(static=token_grants(_http_settings(toml).tokens))
    assert auth.principal("Bearer ci-tok", Role.OPERATOR) == Principal("ci-bot", Role.OPERATOR, "token")
    assert auth.principal("Bearer old-tok", Role.VIEWER).name == _digest("old-tok")[:12]
    with pytest.raises(AuthError, match="unknown token"):
        auth.principal("Bearer other", Role.VIEWER)


@pytest.mark.parametrize(
    ("toml", "fragment"),
    [
        ('"not-a-digest" = "admin"', "not a sha256 hex digest"),
        (f'"{_digest("x")}" = "root"', "viewer"),
        (f'[http.tokens.{_digest("x")}]\nsha256 = "{_digest("x")}"\nrole = "admin"', "name it"),
        ('[http.tokens."bad name"]\nsha256 = "' + _digest("x") + '"\nrole = "admin"', "token name"),
        ('[http.tokens.a]\nsha256 = "abc"\nrole = "admin"', "not a sha256 hex digest"),
        ('[http.tokens.a]\nsha256 = "' + _digest("x") + '"\nrole = "admin"\nextra = 1', "extra"),
        (
            f'[http.tokens.a]\nsha256 = "{_digest("x")}"\nrole = "admin"\n'
            f'[http.tokens.b]\nsha256 = "{_digest("x")}"\nrole = "viewer"',
            "twice",
        ),
    ],
)
def test_token_config_that_fits_neither_form_is_refused(toml, fragment):
    if not toml.startswith("["):
        toml = "[http.tokens]\n" + toml
    with pytest.raises(ValidationError, match=fragment):
        _http_settings(toml + "\n")


def test_roles_are_ordered_a_viewer_cannot_do_an_operators_things():
    auth = Authenticator({"v": Role.VIEWER, "o": Role.OPERATOR, "a": Role.ADMIN})
    with pytest.raises(ForbiddenError, match="a viewer token cannot do this; it needs operator"):
        auth.principal("Bearer v", Role.OPERATOR)
    with pytest.raises(ForbiddenError, match="needs admin"):
        auth.principal("Bearer o", Role.ADMIN)
    assert auth.principal("Bearer o", Role.VIEWER).role is Role.OPERATOR
    assert auth.principal("Bearer a", Role.OPERATOR).role is Role.ADMIN
    with pytest.raises(AuthError, match="missing bearer token"):
        auth.principal(None, Role.VIEWER)


def test_a_jwt_shaped_static_token_is_still_looked_up_as_a_static_token(auth):
    shaped = Authenticator({"aaa.bbb.ccc": Role.VIEWER})
    assert shaped.principal("Bearer aaa.bbb.ccc", Role.VIEWER).via == "token"


def test_a_jwt_to_a_server_without_jwt_config_says_so(issuer):
    with pytest.raises(AuthError, match=r"no \[http.jwt\]"):
        Authenticator({"t": Role.ADMIN}).principal(f"Bearer {issuer.token()}", Role.VIEWER)


# -- JWT sign-in ---------------------------------------------------------------------------------
@pytest.mark.parametrize("kid", ["rs256-1", "es256-1", "eddsa-1"])
def test_good_jwt_signs_in_as_its_subject_with_the_mapped_role(auth, issuer, kid):
    token = issuer.token(kid, sub="alice@example.test", edgec_role="operator")
    found = auth.principal(f"Bearer {token}", Role.OPERATOR)
    assert (found.name, found.role, found.via) == ("alice@example.test", Role.OPERATOR, "jwt")
    assert found.expires_at is not None
    assert found.expires_at > time.time()
    with pytest.raises(ForbiddenError, match="needs admin"):
        auth.principal(f"Bearer {token}", Role.ADMIN)


def test_a_role_list_signs_in_with_the_highest_known_role(auth, issuer):
    token = issuer.token(edgec_role=["viewer", "something-else", "admin", "operator"])
    assert auth.principal(f"Bearer {token}", Role.ADMIN).role is Role.ADMIN


def test_role_map_and_subject_claim_follow_the_identity_providers_names(issuer, tmp_path):
    settings = _settings(
        jwks_file=issuer.write_jwks(tmp_path / "jwks.json"),
        role_claim="groups",
        role_map={"edge-viewers": "viewer", "edge-ops": "operator"},
        subject_claim="email",
    )
    auth = Authenticator(jwt=JwtVerifier(settings))
    token = issuer.token(groups=["staff", "edge-ops"], email="bob@example.test", edgec_role=None)
    assert auth.principal(f"Bearer {token}", Role.OPERATOR).name == "bob@example.test"
    # the map replaces the identity default: a raw "admin" value grants nothing here
    with pytest.raises(ForbiddenError, match="maps to no edgec role"):
        auth.principal(f"Bearer {issuer.token(groups='admin', email='eve@example.test')}", Role.VIEWER)


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        ({"algorithms": ["none"]}, "'none' is refused"),
        ({"algorithms": ["RS256", "HS256"]}, "key confusion"),
        ({"algorithms": ["HS512"]}, "HMAC"),
        ({"algorithms": ["XX999"]}, "unknown algorithm"),
        ({"algorithms": []}, "at least 1"),
        ({"jwks_url": "http://idp.example.test/jwks.json"}, "loopback"),
        ({"jwks_url": "ftp://127.0.0.1/jwks.json"}, "https://"),
        ({"jwks_url": "https://idp.example.test/jwks", "jwks_file": "/x"}, "exactly one"),
        ({}, "exactly one"),
        ({"jwks_file": "/x", "role_map": {"boss": "root"}}, "viewer"),
        ({"jwks_file": "/x", "leeway": 5}, "Extra inputs"),
    ],
)
def test_unsafe_or_unclear_jwt_config_is_refused_with_a_reason(overrides, fragment):
    with pytest.raises(ValidationError, match=fragment):
        _settings(**overrides)


def test_http_jwt_table_in_the_server_config(issuer, tmp_path):
    jwks = issuer.write_jwks(tmp_path / "jwks.json")
    toml = (
        f'[http.jwt]\nissuer = "{ISSUER}"\naudience = "{AUDIENCE}"\njwks_file = "{jwks}"\n'
        'role_claim = "roles"\nalgorithms = ["RS256"]\n'
    )
    http = _http_settings(toml)
    assert http.jwt is not None
    assert http.jwt.role_claim == "roles"
    assert http.jwt.leeway_s == 30
    auth = Authenticator(jwt=JwtVerifier(http.jwt))
    assert auth.principal(f"Bearer {issuer.token(roles='viewer')}", Role.VIEWER).role is Role.VIEWER


def test_an_unreadable_jwks_file_is_a_config_error_at_start(tmp_path):
    with pytest.raises(JwksError, match="cannot read"):
        JwtVerifier(_settings(jwks_file=tmp_path / "missing.json"))
    (tmp_path / "empty.json").write_text('{"keys": []}')
    with pytest.raises(JwksError, match="no usable signing key"):
        JwtVerifier(_settings(jwks_file=tmp_path / "empty.json"))


# -- JWKS over HTTP ------------------------------------------------------------------------------
def _url_verifier(url: str, clock: Clock, **overrides) -> JwtVerifier:
    options = {"jwks_refresh_s": 600, "jwks_min_refetch_s": 30, **overrides}
    return JwtVerifier(_settings(jwks_url=url, **options), clock=clock)


def test_jwks_url_is_fetched_once_and_cached():
    issuer = Issuer.with_keys("RS256")
    clock = Clock()
    with serve_jwks(issuer.jwks()) as jwks:
        auth = Authenticator(jwt=_url_verifier(jwks.url, clock))
        for _ in range(5):
            assert auth.principal(f"Bearer {issuer.token()}", Role.OPERATOR).via == "jwt"
        assert jwks.requests == 1
        assert jwks.paths == ["/jwks.json"]
        clock.advance(599)
        auth.principal(f"Bearer {issuer.token()}", Role.OPERATOR)
        assert jwks.requests == 1
        clock.advance(2)  # past jwks_refresh_s: one refresh
        auth.principal(f"Bearer {issuer.token()}", Role.OPERATOR)
        auth.principal(f"Bearer {issuer.token()}", Role.OPERATOR)
        assert jwks.requests == 2


def test_a_rotated_key_is_fetched_on_its_first_token_and_not_before_the_interval():
    issuer = Issuer.with_keys("RS256")
    clock = Clock()
    with serve_jwks(issuer.jwks()) as jwks:
        auth = Authenticator(jwt=_url_verifier(jwks.url, clock))
        issuer.add("rs256-2", "RS256")
        jwks.document = issuer.jwks()
        # within jwks_min_refetch_s of the first fetch: the new kid is not fetched yet
        with pytest.raises(AuthError, match="unknown JWT key id 'rs256-2'"):
            auth.principal(f"Bearer {issuer.token('rs256-2')}", Role.VIEWER)
        assert jwks.requests == 1
        clock.advance(31)
        assert auth.principal(f"Bearer {issuer.token('rs256-2')}", Role.VIEWER).via == "jwt"
        assert jwks.requests == 2


def test_a_failed_fetch_keeps_the_cached_keys():
    issuer = Issuer.with_keys("ES256")
    clock = Clock()
    with serve_jwks(issuer.jwks()) as jwks:
        verifier = _url_verifier(jwks.url, clock)
        auth = Authenticator(jwt=verifier)
        jwks.status = 500
        clock.advance(700)  # refresh due: it fails, the keys stay
        assert auth.principal(f"Bearer {issuer.token()}", Role.VIEWER).via == "jwt"
        assert jwks.requests == 2
        assert "HTTP 500" in (verifier.keys.last_error or "")
        jwks.status = 200
        jwks.document = b'{"keys": "not a list"}'
        clock.advance(31)
        assert auth.principal(f"Bearer {issuer.token()}", Role.VIEWER).via == "jwt"
        assert jwks.requests == 3
        assert "keys" in (verifier.keys.last_error or "")
    clock.advance(31)  # the server is gone
    assert auth.principal(f"Bearer {issuer.token()}", Role.VIEWER).via == "jwt"
    assert "cannot fetch" in (verifier.keys.last_error or "")


def test_an_issuer_down_at_start_is_retried_on_use():
    issuer = Issuer.with_keys("RS256")
    clock = Clock()
    with serve_jwks(issuer.jwks()) as jwks:
        jwks.status = 503
        auth = Authenticator(jwt=_url_verifier(jwks.url, clock))
        with pytest.raises(AuthError, match="unknown JWT key id"):
            auth.principal(f"Bearer {issuer.token()}", Role.VIEWER)
        jwks.status = 200
        clock.advance(31)
        assert auth.principal(f"Bearer {issuer.token()}", Role.VIEWER).via == "jwt"


def test_a_slow_jwks_url_times_out_and_a_large_one_is_cut_off():
    issuer = Issuer.with_keys("RS256")
    clock = Clock()
    with serve_jwks(issuer.jwks()) as jwks:
        jwks.stall_s = 2.0
        started = time.monotonic()
        verifier = _url_verifier(jwks.url, clock, jwks_timeout_s=0.3)
        assert time.monotonic() - started < 1.5
        assert verifier.keys.keys == {}
        assert "timed out" in (verifier.keys.last_error or "")
        jwks.stall_s = 0
        jwks.document = json.dumps({"keys": [], "pad": "x" * 5000}).encode()
        verifier = _url_verifier(jwks.url, clock, jwks_max_bytes=4096)
        assert "over the limit of 4,096 bytes" in (verifier.keys.last_error or "")


def test_jwt_through_the_operator_api_names_the_caller(issuer, tmp_path):
    """The real HTTP API: a viewer's JWT reads, is refused an operator's route (403), and an
    expired JWT is refused (401) with the reason in the JSON error."""
    from ota_server.http_api import HttpApi
    from ota_server.registry import Registry
    from ota_server.repository import ImageRepository
    from tests.security.test_image_repository import PASS

    repo = ImageRepository.init(tmp_path / "repo", PASS, {}, keys=tmp_path / "keys")
    registry = Registry.open(f"sqlite:///{tmp_path / 'fleet.db'}")
    verifier = JwtVerifier(_settings(jwks_file=issuer.write_jwks(tmp_path / "jwks.json")))
    api = HttpApi(repo, registry, {}, authenticator=Authenticator(jwt=verifier))
    port = api.serve()
    try:

        def call(method: str, path: str, token: str) -> tuple[int, dict]:
            request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method)
            request.add_header("Authorization", f"Bearer {token}")
            if method == "POST":
                request.data = b'{"release": "model:1.0.0", "group": "canary"}'
                request.add_header("Content-Type", "application/json")
            try:
                with urllib.request.urlopen(request, timeout=10) as response:
                    return response.status, json.loads(response.read())
            except urllib.error.HTTPError as e:
                return e.code, json.loads(e.read())

        viewer = issuer.token(sub="vera", edgec_role="viewer")
        assert call("GET", "/v1/devices", viewer)[0] == 200
        status, answer = call("POST", "/v1/rollouts", viewer)
        assert status == 403
        assert "needs operator" in answer["error"]
        status, answer = call("GET", "/v1/devices", issuer.token(exp=int(time.time()) - 3600))
        assert status == 401
        assert "expired" in answer["error"]
    finally:
        api.close()


# -- the server process --------------------------------------------------------------------------
def test_server_process_takes_named_tokens_and_jwts_from_its_config(server_config):  # noqa: F811
    """``edgec server run`` with the old form, a named token and ``[http.jwt]`` (JWKS over HTTP):
    each signs in, and a viewer's JWT is refused an operator's route."""
    from tests._services import MOSQUITTO
    from tests.ota_server.test_server_process import _start, _stop

    if MOSQUITTO is None:
        pytest.skip("the mosquitto binary is not installed")
    issuer = Issuer.with_keys("ES256")
    with serve_jwks(issuer.jwks()) as jwks:
        with server_config["config"].open("a") as f:
            f.write(
                f'\n[http.tokens.ci-bot]\nsha256 = "{_digest("ci-bot-token")}"\nrole = "viewer"\n\n'
                f'[http.jwt]\nissuer = "{ISSUER}"\naudience = "{AUDIENCE}"\njwks_url = "{jwks.url}"\n'
            )
        proc = _start(server_config)
        try:
            base = f"http://127.0.0.1:{server_config['http']}"

            def status(method: str, path: str, token: str) -> int:
                data = b"{}" if method == "POST" else None
                request = urllib.request.Request(base + path, method=method, data=data)
                request.add_header("Authorization", f"Bearer {token}")
                try:
                    with urllib.request.urlopen(request, timeout=10) as response:
                        return response.status
                except urllib.error.HTTPError as e:
                    return e.code

            assert status("GET", "/v1/devices", server_config["token"]) == 200  # the old form
            assert status("GET", "/v1/devices", "ci-bot-token") == 200
            assert status("GET", "/v1/devices", issuer.token(edgec_role="viewer")) == 200
            assert status("POST", "/v1/rollouts", issuer.token(edgec_role="viewer")) == 403
            assert status("GET", "/v1/devices", issuer.token(aud="other")) == 401
            assert jwks.requests == 1
        finally:
            _stop(proc)
