"""Property-based fuzzing of the operator API over real HTTP.

Generated request lines, headers (Content-Length values, Authorization, Transfer-Encoding,
Range, Expect) and bodies (random bytes, deep and huge JSON, rollout and assign bodies of the
right shape with hostile values) go, as raw bytes on a socket, to one live ``HttpApi`` with a
registry, a published release and rollouts in a temporary folder. The property: every
answer has a status below 500 and a 4xx carries a one-line JSON error; nothing is logged as
an error; afterwards the server still answers a valid request.

The example budget comes from tests/security/conftest.py (``ci`` in make test, 10,000 in
``make fuzz``).
"""

from __future__ import annotations

import json
import logging
import re
import socket
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edgec.director import Action, SignedDirectorDocument
from ota_server.director import DirectorIssuer, release_files
from ota_server.http_api import ApiLimits, HttpApi, Role
from ota_server.registry import Registry
from ota_server.repository import ImageRepository
from ota_server.rollouts import Rollouts
from tests.security.test_image_repository import PASS
from tests.security.test_image_repository import bundle as bundle  # noqa: PLC0414  (fixture)

TOKENS = {"view-token": Role.VIEWER, "op-token": Role.OPERATOR}
LIMITS = ApiLimits(head_timeout_s=2, body_timeout_s=2, idle_timeout_s=2)
_STATUS = re.compile(rb"HTTP/1\.[01] (\d{3}) ")


class _Errors(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture(scope="module")
def live(tmp_path_factory, bundle):
    tmp = tmp_path_factory.mktemp("fuzz-api")
    repo = ImageRepository.init(tmp / "repo", PASS, {}, keys=tmp / "keys")
    repo.publish([bundle], PASS)
    registry = Registry.open(f"sqlite:///{tmp / 'fleet.db'}")
    registry.add_device("pi-01", "lab", "canary", "x86-64-cpu")
    issuer = DirectorIssuer(registry, repo.director_signer(PASS))

    def assign(
        device_id: str, release: str, action: Action, rollout: str = "manual"
    ) -> SignedDirectorDocument:
        device = registry.get(device_id)
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
    api = HttpApi(repo, registry, TOKENS, assign=assign, rollouts=rollouts, limits=LIMITS)
    errors = _Errors()
    logging.getLogger("ota_server").addHandler(errors)
    port = api.serve()
    yield {"port": port, "errors": errors}
    api.close()
    logging.getLogger("ota_server").removeHandler(errors)


# -- requests -------------------------------------------------------------------------------
_SAFE = st.characters(min_codepoint=0x21, max_codepoint=0x2FF, exclude_characters="\x7f")
_SEGMENT = st.one_of(
    st.sampled_from(["pi-01", "nope", "r-00000000", "..", "%2e%2e", "x" * 300, "pause", "assign"]),
    st.text(alphabet=_SAFE.filter(lambda c: c != "/"), min_size=1, max_size=30),
)
_PATH = st.one_of(
    st.sampled_from(
        [
            "/openapi.json",
            "/v1/devices",
            "/v1/devices/pi-01",
            "/v1/devices/pi-01/assign",
            "/v1/releases",
            "/v1/rollouts",
            "/v1/repo/metadata/1.root.json",
            "/v1/repo/targets/model/1.0.0/x86-64-cpu/manifest.json",
            "/v1/repo/keys/root-1.pem",
        ]
    ),
    st.builds(
        lambda base, parts: base + "/".join(parts),
        st.sampled_from(["/v1/devices/", "/v1/rollouts/", "/v1/repo/", "/"]),
        st.lists(_SEGMENT, min_size=1, max_size=4),
    ),
    st.builds(
        lambda rid, action: f"/v1/rollouts/{rid}/{action}",
        _SEGMENT,
        st.sampled_from(["pause", "resume", "abort", "rollback", "explode"]),
    ),
    st.text(alphabet=_SAFE, max_size=60).map(lambda s: "/" + s),
)
_METHOD = st.one_of(
    st.sampled_from(["GET", "POST", "HEAD", "PUT", "DELETE", "PATCH", "OPTIONS"]),
    st.from_regex(r"[A-Za-z]{1,12}", fullmatch=True),
)
_HEADER_TEXT = st.text(
    st.characters(min_codepoint=0x20, max_codepoint=0x2FF, exclude_characters="\x7f"), max_size=40
)
_AUTH = st.one_of(
    st.none(),
    st.sampled_from(
        ["Bearer op-token", "Bearer view-token", "Bearer ", "Basic b3A6dG9rZW4=", "bearer op-token"]
    ),
    _HEADER_TEXT.map(lambda s: "Bearer " + s),
    _HEADER_TEXT,
)
_JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=30),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5)
    ),
    max_leaves=20,
)
_RANGE = st.one_of(_HEADER_TEXT, st.from_regex(r"bytes=[0-9]{0,30}-[0-9]{0,30}", fullmatch=True))
_ROLLOUT = st.fixed_dictionaries(
    {"release": st.one_of(st.just("model:1.0.0"), _JSON), "group": st.one_of(st.just("canary"), _JSON)},
    optional={
        "waves": st.one_of(
            st.lists(st.sampled_from(["5%", "100%", "1", "0", "100.5%", "9" * 40]), max_size=5), _JSON
        ),
        "bake_s": st.one_of(st.floats(allow_nan=True, allow_infinity=True), _JSON),
        "device_timeout_s": st.one_of(st.floats(allow_nan=True, allow_infinity=True), _JSON),
        "abort_if": st.one_of(
            st.lists(
                st.sampled_from(["p95_ms>1.5*control", "error_rate>inf", "drift=drift", "x" * 200]),
                max_size=4,
            ),
            _JSON,
        ),
        "min_devices": st.one_of(st.integers(min_value=-5, max_value=10**9), _JSON),
        "fleet": _JSON,
        "extra": _JSON,
    },
)
_ASSIGN = st.fixed_dictionaries(
    {"release": st.one_of(st.sampled_from(["model:1.0.0", "model:9.9.9", "../x:1"]), _JSON)},
    optional={"action": st.one_of(st.sampled_from(["install", "rollback"]), _JSON)},
)


def _encode(value: Any) -> bytes:
    return json.dumps(value, allow_nan=True).encode()  # NaN and Infinity tokens, on purpose


_BODY = st.one_of(
    st.binary(max_size=300),
    st.integers(min_value=1, max_value=70_000).map(lambda n: b"[" * n),
    st.integers(min_value=1, max_value=20_000).map(lambda n: b'{"a":' * n),
    st.integers(min_value=1, max_value=70_000).map(lambda n: b'["' + b"x" * n + b'"]'),
    _JSON.map(_encode),
    _ROLLOUT.map(_encode),
    _ASSIGN.map(_encode),
    st.sampled_from([b'{"bake_s": 1e999}', b"NaN", b"-Infinity", b"1" * 5000, b"\xef\xbb\xbf{}"]),
)


@st.composite
def requests(draw: st.DrawFn) -> tuple[str, bytes]:
    method, path, body = draw(_METHOD), draw(_PATH), draw(_BODY)
    headers = ["Host: fuzz"]
    auth = draw(_AUTH)
    if auth is not None:
        headers.append(f"Authorization: {auth}")
    length = draw(
        st.one_of(
            st.just(str(len(body))),
            st.none(),
            st.integers(min_value=-10, max_value=10**8).map(str),
            st.sampled_from(["", "-1", "0x10", "1e3", "+5", " 7 ", "5, 5", "99999999999999999999999"]),
        )
    )
    if length is not None:
        headers.append(f"Content-Length: {length}")
        if draw(st.booleans()) and draw(st.booleans()):
            headers.append(f"Content-Length: {draw(st.integers(min_value=0, max_value=100))}")
    if draw(st.integers(min_value=0, max_value=9)) == 0:
        headers.append("Transfer-Encoding: chunked")
    if draw(st.integers(min_value=0, max_value=9)) == 0:
        headers.append("Expect: 100-continue")
    if draw(st.integers(min_value=0, max_value=4)) == 0:
        headers.append(f"Range: {draw(_RANGE)}")
    for name, value in draw(
        st.lists(
            st.tuples(st.from_regex(r"[A-Za-z][A-Za-z0-9-]{0,20}", fullmatch=True), _HEADER_TEXT), max_size=3
        )
    ):
        headers.append(f"{name}: {value}")
    head = f"{method} {path} HTTP/1.1\r\n" + "".join(h + "\r\n" for h in headers) + "\r\n"
    return method, head.encode() + body


def _exchange(port: int, data: bytes) -> tuple[bytes, bool]:
    """Send ``data``, half-close, read to the end; (what came back, whether sending broke off)."""
    broke = False
    with socket.create_connection(("127.0.0.1", port), timeout=15) as sock:
        try:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            broke = True  # the server answered early and closed (a 401 before a large body)
        received = b""
        try:
            while chunk := sock.recv(65536):
                received += chunk
        except ConnectionResetError:
            broke = True
    return received, broke


def _check_answer(method: str, received: bytes, broke: bool) -> None:
    statuses = [int(s) for s in _STATUS.findall(received)]
    assert statuses or broke, received[:300]
    assert all(s < 500 for s in statuses), received[:500]
    if not statuses or statuses[0] < 400 or method == "HEAD":
        return
    head, _, rest = received.partition(b"\r\n\r\n")
    length = int(re.search(rb"(?i)content-length: (\d+)", head)[1])  # type: ignore[index]  (any case)
    error = json.loads(rest[:length])["error"]
    assert isinstance(error, str)
    assert error
    assert "\n" not in error


def test_operator_api_answers_every_request_below_500(live):
    @given(request=requests())
    def fuzz(request: tuple[str, bytes]) -> None:
        method, data = request
        received, broke = _exchange(live["port"], data)
        _check_answer(method, received, broke)

    fuzz()
    # still serving, and nothing the server logged as an error
    received, _ = _exchange(
        live["port"], b"GET /v1/devices HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer view-token\r\n\r\n"
    )
    assert received.startswith(b"HTTP/1.1 200 ")
    assert b'"pi-01"' in received
    assert [r.getMessage() for r in live["errors"].records] == []
