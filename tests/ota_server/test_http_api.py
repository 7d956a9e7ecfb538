"""The HTTP side: repository files with Range, and the operator API's tokens and errors."""

from __future__ import annotations

import hashlib
import json
import os
import re
import urllib.error
import urllib.request
from email.message import Message

import pytest

from edgec.director import Action, SignedDirectorDocument
from edgec.errors import ConflictError, NotFoundError, UserInputError
from ota_server.director import DirectorIssuer, release_files
from ota_server.http_api import HttpApi, Role
from ota_server.registry import Registry
from ota_server.repository import ImageRepository
from ota_server.rollouts import Rollouts
from tests.security.test_image_repository import PASS
from tests.security.test_image_repository import bundle as bundle  # noqa: PLC0414  (fixture)

TOKENS = {"view-token": Role.VIEWER, "op-token": Role.OPERATOR}


@pytest.fixture
def api(tmp_path, bundle):
    repo = ImageRepository.init(tmp_path / "repo", PASS, {}, keys=tmp_path / "keys")
    repo.publish([bundle], PASS)
    (repo.targets_dir / "big.bin").write_bytes(os.urandom(5 * 1024 * 1024 + 7))
    registry = Registry.open(f"sqlite:///{tmp_path / 'fleet.db'}")
    registry.add_device("pi-01", "lab", "canary", "x86-64-cpu")
    issuer = DirectorIssuer(registry, repo.director_signer(PASS))

    def assign(
        device_id: str, release: str, action: Action, rollout: str = "manual"
    ) -> SignedDirectorDocument:
        device = registry.get(device_id)  # what OtaServer.assign does, less the MQTT publish
        files = release_files(repo.load("targets").signed.targets, release, device.profile)
        return issuer.issue(
            fleet=device.fleet,
            device=device.id,
            profile=device.profile,
            rollout=rollout,
            action=action,
            release=release,
            files=files,
        )

    def bundle_profiles(release: str) -> set[str]:
        return {r.profile for r in repo.releases() if f"{r.name}:{r.version}" == release}

    rollouts = Rollouts(registry, assign, bundle_profiles)
    server = HttpApi(repo, registry, TOKENS, assign=assign, rollouts=rollouts)
    port = server.serve()
    yield {"base": f"http://127.0.0.1:{port}", "repo": repo}
    server.close()


def _call(
    api,
    method: str,
    path: str,
    token: str | None = None,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, Message, bytes]:
    request = urllib.request.Request(api["base"] + path, data=body, method=method, headers=headers or {})
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.headers, response.read()  # any case of a name
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


def test_no_token_gets_401_and_a_viewer_reads(api):
    status, _, body = _call(api, "GET", "/v1/devices")
    assert status == 401
    assert "bearer" in json.loads(body)["error"]
    assert _call(api, "GET", "/v1/devices", "wrong-token")[0] == 401
    status, _, body = _call(api, "GET", "/v1/devices", "view-token")
    assert status == 200
    assert [d["id"] for d in json.loads(body)] == ["pi-01"]
    status, _, body = _call(api, "GET", "/v1/devices/pi-01", "view-token")
    assert json.loads(body)["group"] == "canary"
    assert _call(api, "GET", "/v1/devices/nope", "view-token")[0] == 404
    status, _, body = _call(api, "GET", "/v1/releases", "view-token")
    assert json.loads(body)[0]["profile"] == "x86-64-cpu"


def test_a_viewer_cannot_start_a_rollout_an_operator_can(api):
    body = json.dumps({"release": "model:1.0.0", "group": "canary"}).encode()
    status, _, answer = _call(api, "POST", "/v1/rollouts", "view-token", body)
    assert status == 403
    assert "operator" in json.loads(answer)["error"]
    status, _, answer = _call(api, "POST", "/v1/rollouts", "op-token", body)
    assert status == 201
    created = json.loads(answer)
    assert (created["release"], created["group"], created["state"]) == ("model:1.0.0", "canary", "pending")
    status, _, answer = _call(api, "GET", "/v1/rollouts", "view-token")
    assert [r["id"] for r in json.loads(answer)] == [created["id"]]


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (b"{not json", "not JSON"),
        (b"[1, 2]", "expected"),
        (b'{"release": 5, "group": "g"}', "expected"),
        (b'{"release": "model:9.9.9", "group": "g"}', "not published"),
        (b'{"release": "model:1.0.0", "group": "g", "abort_if": ["p95>2"]}', "bad abort rule"),
        (b'{"release": "model:1.0.0", "group": "nobody"}', "no devices"),
        (b"\xff\xfe", "not JSON"),
    ],
)
def test_malformed_requests_get_a_4xx_with_a_message(api, body, fragment):
    status, _, answer = _call(api, "POST", "/v1/rollouts", "op-token", body)
    assert 400 <= status < 500
    assert fragment in json.loads(answer)["error"]


def test_oversized_body_and_unknown_route(api):
    assert _call(api, "POST", "/v1/rollouts", "op-token", b"x" * (65 * 1024))[0] == 413
    assert _call(api, "DELETE", "/v1/everything", "op-token")[0] == 404


def test_openapi_document(api):
    status, _, body = _call(api, "GET", "/openapi.json")
    document = json.loads(body)
    assert status == 200
    assert document["openapi"].startswith("3.")
    assert "post" in document["paths"]["/v1/rollouts"]


def test_range_resume_of_a_5_mb_target(api):
    blob = (api["repo"].targets_dir / "big.bin").read_bytes()
    status, headers, first = _call(
        api, "GET", "/v1/repo/targets/big.bin", headers={"Range": "bytes=0-2621439"}
    )
    assert status == 206
    assert headers["Content-Range"] == f"bytes 0-2621439/{len(blob)}"
    # the connection broke here; the download resumes from the next byte
    status, _, rest = _call(api, "GET", "/v1/repo/targets/big.bin", headers={"Range": f"bytes={len(first)}-"})
    assert status == 206
    assert first + rest == blob
    status, _, whole = _call(api, "GET", "/v1/repo/targets/big.bin")
    assert (status, whole) == (200, blob)
    assert _call(api, "GET", "/v1/repo/targets/big.bin", headers={"Range": "bytes=99999999-"})[0] == 416
    assert _call(api, "GET", "/v1/repo/targets/big.bin", headers={"Range": "lines=1-2"})[0] == 416


def test_keys_and_paths_outside_the_repository_are_not_served(api):
    assert _call(api, "GET", "/v1/repo/keys/root-1.pem")[0] == 404
    assert _call(api, "GET", "/v1/repo/../fleet.db")[0] == 404
    assert _call(api, "GET", "/v1/repo/metadata/1.root.json")[0] == 200


def test_assigning_a_release_needs_an_operator_and_a_matching_bundle(api):
    body = json.dumps({"release": "model:1.0.0"}).encode()
    assert _call(api, "POST", "/v1/devices/pi-01/assign", "view-token", body)[0] == 403
    status, _, answer = _call(api, "POST", "/v1/devices/pi-01/assign", "op-token", body)
    assert status == 200
    document = SignedDirectorDocument.model_validate_json(answer)
    assert (document.signed.device, document.signed.version, document.signed.action) == (
        "pi-01",
        1,
        "install",
    )
    again = SignedDirectorDocument.model_validate_json(
        _call(api, "POST", "/v1/devices/pi-01/assign", "op-token", body)[2]
    )
    assert again.signed.version == 2  # strictly increasing per device
    cases = [
        ("pi-01", b"{not json", 400, "not JSON"),
        ("pi-01", b'{"release": "model:9.9.9"}', 400, "no bundle"),
        ("pi-01", b'{"release": "model:1.0.0", "action": "explode"}', 400, "install, rollback or shadow"),
        ("pi-99", body, 404, "no device"),
    ]
    for device, payload, expected, fragment in cases:
        status, _, answer = _call(api, "POST", f"/v1/devices/{device}/assign", "op-token", payload)
        assert status == expected, answer
        assert fragment in json.loads(answer)["error"]


def _refused_by(tmp_path, refuse) -> tuple[int, str]:
    """The answer to an assign that ``refuse(device_id)`` refuses, through the real HTTP stack."""
    repo = ImageRepository.init(tmp_path / "repo", PASS, {}, keys=tmp_path / "keys")
    registry = Registry.open(f"sqlite:///{tmp_path / 'fleet.db'}")
    registry.add_device("pi-01", "lab", "canary", "x86-64-cpu")

    def assign(
        device_id: str, release: str, action: Action, rollout: str = "manual"
    ) -> SignedDirectorDocument:
        refuse(registry, device_id)
        raise AssertionError("refuse() must raise")

    server = HttpApi(repo, registry, TOKENS, assign=assign)
    api = {"base": f"http://127.0.0.1:{server.serve()}"}
    try:
        body = json.dumps({"release": "model:1.0.0"}).encode()
        status, _, answer = _call(api, "POST", "/v1/devices/pi-01/assign", "op-token", body)
    finally:
        server.close()
    return status, json.loads(answer)["error"]


def _raise(error: Exception):
    def refuse(_registry: Registry, _device_id: str) -> None:
        raise error

    return refuse


@pytest.mark.parametrize(
    ("refuse", "status", "message"),
    [
        # the text says the opposite of the type: the type decides
        (_raise(NotFoundError("it already exists: a conflict")), 404, "it already exists: a conflict"),
        (_raise(ConflictError("no such device, not found")), 409, "no such device, not found"),
        (_raise(UserInputError("not found; already exists")), 400, "not found; already exists"),
        # a real conflict from the registry: the device is there already
        (
            lambda registry, device_id: registry.add_device(device_id, "lab", "canary", "x86-64-cpu"),
            409,
            "device 'pi-01' already exists; choose another id",
        ),
    ],
    ids=["not-found", "conflict", "bad-input", "device-exists"],
)
def test_operator_api_answers_a_refusal_by_its_type_not_its_text(tmp_path, refuse, status, message):
    assert _refused_by(tmp_path, refuse) == (status, message)


ROUTES = {
    ("/v1/repo/{path}", "get"),
    ("/v1/repo/{path}", "head"),
    ("/v1/devices", "get"),
    ("/v1/devices/{device_id}", "get"),
    ("/v1/devices/{device_id}/assign", "post"),
    ("/v1/releases", "get"),
    ("/v1/rollouts", "get"),
    ("/v1/rollouts", "post"),
    ("/v1/rollouts/{rollout_id}", "get"),
    *{
        (f"/v1/rollouts/{{rollout_id}}/{action}", "post")
        for action in ("pause", "resume", "abort", "rollback")
    },
}


def test_openapi_is_generated_with_every_route_and_the_bearer_scheme(api):
    status, _, body = _call(api, "GET", "/openapi.json")
    assert status == 200
    document = json.loads(body)
    assert {(path, method) for path, ops in document["paths"].items() for method in ops} == ROUTES
    scheme = document["components"]["securitySchemes"]["bearer"]
    assert (scheme["type"], scheme["scheme"]) == ("http", "bearer")
    for path, method in ROUTES:
        operation = document["paths"][path][method]
        public = path.startswith("/v1/repo/")
        assert operation.get("security") == (None if public else [{"bearer": []}]), (path, method)
        if not public:
            assert "401" in operation["responses"]
    bodies = {
        path: document["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]["$ref"]
        for path in ("/v1/devices/{device_id}/assign", "/v1/rollouts")
    }
    assert bodies == {
        "/v1/devices/{device_id}/assign": "#/components/schemas/AssignRequest",
        "/v1/rollouts": "#/components/schemas/RolloutSpec",
    }
    assert "waves" in document["components"]["schemas"]["RolloutSpec"]["properties"]


def test_docs_page_loads_with_no_external_url(api):
    status, headers, body = _call(api, "GET", "/docs")
    assert status == 200
    assert headers["Content-Type"].startswith("text/html")
    html = body.decode()
    assert not re.search(r"(?:https?:)?//\w", html), "the docs page must work offline (no CDN)"
    assert "url: '/openapi.json'" in html
    assert '"validatorUrl": null' in html  # Swagger UI's default would ask validator.swagger.io
    assets = re.findall(r'(?:src|href)="([^"]+)"', html)
    assert {a.rsplit("/", 1)[1] for a in assets} == {
        "swagger-ui-bundle.js",
        "swagger-ui.css",
        "favicon-32x32.png",
    }
    for asset in assets:
        status, _, data = _call(api, "GET", asset)
        assert status == 200, asset
        assert len(data) > 500, asset
    assert b"SwaggerUIBundle" in _call(api, "GET", "/static/vendor/swagger-ui-bundle.js")[2]
    assert _call(api, "GET", "/static/vendor/nope.js")[0] == 404
    assert _call(api, "GET", "/static/../http_api.py")[0] == 404


def test_refusals_say_what_would_be_accepted(api):
    status, headers, body = _call(api, "DELETE", "/v1/rollouts", "op-token")
    assert status == 405
    assert set(headers["Allow"].split(", ")) == {"GET", "POST"}
    assert "DELETE" in json.loads(body)["error"]
    status, headers, body = _call(api, "GET", "/v1/devices", "nope")
    assert (status, headers["WWW-Authenticate"]) == (401, "Bearer")
    assert _call(api, "POST", "/v1/rollouts/r-1/explode", "op-token", b"")[0] == 404


def test_the_caller_is_recorded_on_what_it_starts(api):
    body = json.dumps({"release": "model:1.0.0", "group": "canary"}).encode()
    status, _, answer = _call(api, "POST", "/v1/rollouts", "op-token", body)
    assert status == 201
    rollout = json.loads(_call(api, "GET", f"/v1/rollouts/{json.loads(answer)['id']}", "view-token")[2])
    assert rollout["created_by"] == hashlib.sha256(b"op-token").hexdigest()[:12]  # the token's name
    status, _, answer = _call(api, "POST", f"/v1/rollouts/{rollout['id']}/pause", "op-token", b"")
    assert status == 200, answer
