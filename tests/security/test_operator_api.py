"""The operator API of a real ``edgec server run`` process against unbounded input: bodies
read before the token is checked, bad lengths, deep JSON, infinite numbers, wrong types,
slow clients, and 500s that told the client where the server's files are."""

from __future__ import annotations

import contextlib
import json
import socket
import sqlite3
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from ota_server.repository import ImageRepository
from tests.ota_server.test_broker_acl import broker  # noqa: F401  (fixture)
from tests.ota_server.test_server_process import _start, _stop, _wait
from tests.ota_server.test_server_process import server_config as server_config  # noqa: PLC0414
from tests.security.test_image_repository import PASS
from tests.security.test_image_repository import bundle as bundle  # noqa: PLC0414  (fixture)

ROLLOUT = {"release": "model:1.0.0", "group": "g", "waves": ["100%"], "bake_s": 600}


def _configure(config: dict, top: str = "", http: str = "") -> None:
    """Add settings to the server.toml the fixture wrote (top-level keys, [http] keys)."""
    path: Path = config["config"]
    text = path.read_text()
    path.write_text(top + text.replace("[http]\n", f"[http]\n{http}", 1))


def _publish(config: dict, bundle: Path) -> None:
    ImageRepository(config["repo"], keys=config["repo"].parent / "keys").publish([bundle], PASS)


def _raw(port: int, request: bytes, timeout_s: float = 10.0, finish: bool = True) -> tuple[int, bytes]:
    """Send ``request`` as it is; the status and body of the answer. ``finish``: half-close
    after sending (the server sees the end of what we send)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as sock:
        sock.sendall(request)
        if finish:
            sock.shutdown(socket.SHUT_WR)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
        head, _, rest = data.partition(b"\r\n\r\n")
        length = next(
            (
                int(line.split(b":")[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            ),
            0,
        )
        while len(rest) < length:
            chunk = sock.recv(65536)
            if not chunk:
                break
            rest += chunk
    return int(head.split(b" ")[1]), rest


def _call(config: dict, method: str, path: str, body: bytes | None = None, token: str | None = None):
    request = urllib.request.Request(f"http://127.0.0.1:{config['http']}{path}", data=body, method=method)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _log(config: dict) -> str:
    return (config["config"].parent / "server.log").read_text(errors="replace")


@pytest.fixture
def server(broker, server_config, bundle):  # noqa: F811
    _publish(server_config, bundle)
    _configure(server_config, top="rollout_tick_s = 0.2\n")
    proc = _start(server_config)
    yield server_config
    _stop(proc)
    assert "Traceback" not in _log(server_config)


def test_negative_content_length_is_refused_before_reading(server):
    """Content-Length: -1 made the server read to the end of the connection, token or not.
    A length that is not one non-negative integer is a framing error: the HTTP parser answers
    400 at once, before any route or token is looked at."""
    for auth in (b"", f"Authorization: Bearer {server['token']}\r\n".encode()):
        request = b"POST /v1/rollouts HTTP/1.1\r\nHost: x\r\n" + auth + b"Content-Length: -1\r\n\r\n{"
        status, body = _raw(server["http"], request, finish=False)  # the connection stays open
        assert status == 400, body
        assert "Content-Length" in json.loads(body)["error"]
    for value in (b"abc", b"1e3", b"+5", b"5, 6", b" "):
        request = (
            b"POST /v1/rollouts HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + server["token"].encode()
        )
        status, _ = _raw(server["http"], request + b"\r\nContent-Length: " + value + b"\r\n\r\n")
        assert status == 400
    no_length = f"POST /v1/rollouts HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {server['token']}\r\n\r\n"
    no_length = no_length.encode()
    assert _raw(server["http"], no_length, finish=False)[0] == 411
    chunked = no_length.replace(b"\r\n\r\n", b"\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n")
    assert _raw(server["http"], chunked, finish=False)[0] == 411


def test_body_is_not_read_before_the_token_is_checked(server):
    """60 KB declared, none sent, no token: the 401 comes at once, not after the body."""
    for auth in (b"", b"Authorization: Bearer not-a-token\r\n"):
        request = b"POST /v1/rollouts HTTP/1.1\r\nHost: x\r\n" + auth + b"Content-Length: 60000\r\n\r\n"
        status, body = _raw(server["http"], request, timeout_s=10, finish=False)
        assert status == 401
        assert "token" in json.loads(body)["error"]


def test_deeply_nested_json_is_400(server):
    for body in (b"[" * 60_000, b'{"a":' * 10_000, b"[" * 33 + b"]" * 33):
        status, answer = _call(server, "POST", "/v1/rollouts", body, server["token"])
        assert status == 400, answer
        assert "nested deeper" in answer["error"]
    # brackets inside strings are text, not nesting
    text = json.dumps({**ROLLOUT, "group": "[" * 1000}).encode()
    status, answer = _call(server, "POST", "/v1/rollouts", text, server["token"])
    assert status == 400
    assert "nested" not in answer["error"]


def test_assign_action_list_is_400(server):
    for action in ([], {}, 5, None, "explode"):
        body = json.dumps({"release": "model:1.0.0", "action": action}).encode()
        status, answer = _call(server, "POST", "/v1/devices/dev-b/assign", body, server["token"])
        assert status == 400, answer
        assert "action" in answer["error"]
    for body in (b'{"release": []}', b'{"release": "model:1.0.0", "surprise": 1}', b'"model:1.0.0"'):
        assert _call(server, "POST", "/v1/devices/dev-b/assign", body, server["token"])[0] == 400


@pytest.mark.parametrize(
    "bake",
    [b"Infinity", b"1e999", b"1e12"],
)
def test_rollout_with_infinite_bake_is_400(server, bake):
    body = json.dumps(ROLLOUT).replace('"bake_s": 600', '"bake_s": BAKE').encode().replace(b"BAKE", bake)
    status, answer = _call(server, "POST", "/v1/rollouts", body, server["token"])
    assert status == 400, answer
    assert "\n" not in answer["error"]
    status, listed = _call(server, "GET", "/v1/rollouts", None, server["token"])
    assert (status, listed) == (200, [])


def test_rollout_stored_with_infinite_bake_does_not_break_status_or_tick(server):
    status, created = _call(server, "POST", "/v1/rollouts", json.dumps(ROLLOUT).encode(), server["token"])
    assert status == 201
    # what the old code stored for bake_s=Infinity: pydantic writes a non-finite float as null
    db = sqlite3.connect(server["db"].removeprefix("sqlite:///"))
    spec = json.loads(db.execute("SELECT spec FROM rollouts WHERE id = ?", (created["id"],)).fetchone()[0])
    with db:
        db.execute(
            "UPDATE rollouts SET spec = ? WHERE id = ?", (json.dumps({**spec, "bake_s": None}), created["id"])
        )
    db.close()

    def aborted() -> bool:
        return (
            _call(server, "GET", f"/v1/rollouts/{created['id']}", None, server["token"])[1]["state"]
            == "aborted"
        )

    assert _wait(aborted, 20)
    time.sleep(1.0)  # five more ticks
    status, shown = _call(server, "GET", f"/v1/rollouts/{created['id']}", None, server["token"])
    assert status == 200
    assert "bake_s" in shown["reason"]
    assert "bake_s" in shown["spec_error"]
    assert _call(server, "GET", "/v1/rollouts", None, server["token"])[0] == 200
    status, _answer = _call(server, "POST", f"/v1/rollouts/{created['id']}/abort", b"", server["token"])
    assert status == 409  # already aborted: a conflict, not a crash
    assert "could not advance" not in _log(server)


def test_internal_error_does_not_leak_paths(broker, server_config):  # noqa: F811
    proc = _start(server_config)
    try:
        # the targets metadata the server reads is now a folder: reading it fails inside the server
        for path in (server_config["repo"] / "metadata").glob("*.targets.json"):
            path.unlink()
            path.mkdir()
        status, answer = _call(server_config, "GET", "/v1/releases", None, server_config["token"])
        assert status == 500
        text = json.dumps(answer)
        for secret in (str(server_config["repo"]), "/tmp", "Errno", "Error:", "Traceback", ".json"):
            assert secret not in text
        error_id = answer["error"].split()[2].rstrip(";")
        assert error_id in _log(server_config)  # the operator finds the details in the log
        assert "Traceback" in _log(server_config)
        assert _call(server_config, "GET", "/v1/devices", None, server_config["token"])[0] == 200
    finally:
        _stop(proc)


def test_unknown_methods_and_paths_get_json_404_or_405(server):
    for method, path, expected in [
        ("PATCH", "/v1/rollouts", 405),
        ("DELETE", "/v1/devices/dev-a", 405),
        ("BREW", "/v1/devices", 405),
        ("GET", "/v1/devices/dev-a/assign", 405),
        ("GET", "/v2/anything", 404),
        ("FOO", "/nowhere", 404),
    ]:
        request = f"{method} {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {server['token']}\r\n\r\n"
        status, body = _raw(server["http"], request.encode())
        assert status == expected, (method, path, body)
        assert json.loads(body)["error"]
    # HTTP/1.1 without a Host header is malformed (RFC 9112): 400, in JSON
    status, body = _raw(server["http"], b"GET /v1/devices HTTP/1.1\r\n\r\n")
    assert status == 400
    assert "Host" in json.loads(body)["error"]


@pytest.mark.slow
def test_slow_client_does_not_hold_the_server(broker, server_config):  # noqa: F811
    """Slowloris: connections that never finish their head, some trickling a header line at a
    time. Each is cut off after the head timeout; a normal request is still answered."""
    _configure(server_config, http="head_timeout_s = 1.0\nmax_connections = 8\n")
    proc = _start(server_config)
    port = server_config["http"]
    slow = [socket.create_connection(("127.0.0.1", port), timeout=30) for _ in range(40)]
    stop = threading.Event()

    def trickle() -> None:
        while not stop.wait(0.3):
            for sock in slow[::2]:
                with contextlib.suppress(OSError):
                    sock.send(b"X-Slow: 1\r\n")

    try:
        for sock in slow:
            with contextlib.suppress(OSError):  # refused at once (503) and closed
                sock.sendall(b"GET /openapi.json HTTP/1.1\r\nHost: x\r\n")
        threading.Thread(target=trickle, daemon=True).start()

        def answered() -> bool:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/openapi.json", timeout=5) as response:
                    return response.status == 200
            except (urllib.error.HTTPError, OSError):
                return False  # 503 while the slow ones hold every slot

        assert _wait(answered, 30)
        deadline = time.monotonic() + 30
        for sock in slow:  # every slow connection is closed by the server (maybe after a 408/503)
            while True:
                sock.settimeout(max(deadline - time.monotonic(), 0.1))
                try:
                    if not sock.recv(65536):
                        break
                except ConnectionResetError:
                    break
                except TimeoutError:
                    pytest.fail("a slow client still holds its connection after 30 s")
        assert proc.poll() is None
    finally:
        stop.set()
        for sock in slow:
            sock.close()
        _stop(proc)
