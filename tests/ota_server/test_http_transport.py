"""The operator API's transport limits, on a live ``HttpApi`` with short deadlines: clients
that send a head or a body too slowly, stop reading, open too many connections, send a head
too large, or half-close after their request."""

from __future__ import annotations

import json
import os
import socket
import time

import pytest

from ota_server.http_api import ApiLimits, HttpApi, Role
from ota_server.registry import Registry
from ota_server.repository import ImageRepository
from tests.security.test_image_repository import PASS

LIMITS = ApiLimits(head_timeout_s=1.0, body_timeout_s=1.0, idle_timeout_s=1.0, max_connections=4)
BIG = 8 * 1024 * 1024


@pytest.fixture(scope="module")
def port(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("transport")
    repo = ImageRepository.init(tmp / "repo", PASS, {}, keys=tmp / "keys")
    (repo.targets_dir / "big.bin").write_bytes(os.urandom(BIG))
    registry = Registry.open(f"sqlite:///{tmp / 'fleet.db'}")
    api = HttpApi(repo, registry, {"op-token": Role.OPERATOR}, limits=LIMITS)
    yield api.serve()
    api.close()


def _connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=10)


def _answer(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """Read one answer: status, headers (lower-case names), body."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed after {data!r}")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    while len(body) < int(headers.get("content-length", 0)):
        body += sock.recv(65536)
    return int(lines[0].split()[1]), headers, body


def _closed_within(sock: socket.socket, seconds: float) -> float:
    """Seconds until the server closed ``sock`` (reading and dropping what it sends)."""
    start = time.monotonic()
    sock.settimeout(seconds)
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        pass
    return time.monotonic() - start


def test_a_head_sent_a_byte_at_a_time_is_cut_off_with_408(port):
    """Slowloris: each byte would re-arm a per-read timeout; the head has one deadline."""
    with _connect(port) as sock:
        start = time.monotonic()
        status = None
        for byte in b"GET /v1/devices HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100:
            try:
                sock.send(bytes([byte]))
            except OSError:
                break
            time.sleep(0.05)
            if time.monotonic() - start > 3:
                pytest.fail("the server still reads a head that began 3 s ago")
        status, _, body = _answer(sock)
        assert status == 408
        assert "head" in json.loads(body)["error"]
        assert time.monotonic() - start < LIMITS.head_timeout_s + 1.5


def test_an_idle_keep_alive_connection_is_closed_after_the_head_timeout(port):
    with _connect(port) as sock:
        sock.sendall(b"GET /openapi.json HTTP/1.1\r\nHost: x\r\n\r\n")
        assert _answer(sock)[0] == 200
        assert _closed_within(sock, 5) < LIMITS.head_timeout_s + 1.5


def test_a_body_that_stalls_is_408(port):
    with _connect(port) as sock:
        head = b"POST /v1/rollouts HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer op-token\r\n"
        sock.sendall(head + b'Content-Length: 100\r\n\r\n{"release":')
        start = time.monotonic()
        status, headers, body = _answer(sock)
        assert status == 408
        assert "body" in json.loads(body)["error"]
        assert headers["connection"] == "close"
        assert time.monotonic() - start < LIMITS.body_timeout_s + 1.5


def test_a_client_that_stops_reading_is_cut_off(port):
    """8 MB asked for, a 4 KB receive window, nothing read: the write deadline ends it."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(10)
    sock.connect(("127.0.0.1", port))
    with sock:
        sock.sendall(b"GET /v1/repo/targets/big.bin HTTP/1.1\r\nHost: x\r\n\r\n")
        time.sleep(LIMITS.idle_timeout_s + 1.5)
        received = 0
        try:
            while chunk := sock.recv(1 << 20):
                received += len(chunk)
        except ConnectionResetError:
            pass
        assert received < BIG  # the connection ended before the answer did


def test_one_connection_over_the_limit_gets_503_at_once(port):
    held = [_connect(port) for _ in range(LIMITS.max_connections)]
    try:
        time.sleep(0.2)
        with _connect(port) as extra:
            status, headers, body = _answer(extra)
            assert status == 503
            assert headers["retry-after"] == "1"
            assert "connections" in json.loads(body)["error"]
    finally:
        for sock in held:
            sock.close()
    time.sleep(0.3)
    with _connect(port) as sock:  # the slots are free again
        sock.sendall(b"GET /openapi.json HTTP/1.1\r\nHost: x\r\n\r\n")
        assert _answer(sock)[0] == 200


def test_a_head_over_the_limit_is_431(port):
    with _connect(port) as sock:
        sock.sendall(b"GET /v1/devices HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (LIMITS.max_head_bytes + 1))
        status, _, body = _answer(sock)
        assert status == 431
        assert "head" in json.loads(body)["error"]


def test_a_client_that_half_closes_after_its_request_gets_the_answer(port):
    with _connect(port) as sock:
        sock.sendall(b"GET /v1/devices HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer op-token\r\n\r\n")
        sock.shutdown(socket.SHUT_WR)
        status, _, body = _answer(sock)
        assert (status, json.loads(body)) == (200, [])
    with _connect(port) as sock:  # a body cut short by the half-close: refused, not waited on
        head = b"POST /v1/rollouts HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer op-token\r\n"
        sock.sendall(head + b"Content-Length: 100\r\n\r\n{")
        sock.shutdown(socket.SHUT_WR)
        status, _, body = _answer(sock)
        assert status == 400
        assert json.loads(body)["error"]


def test_a_large_body_is_refused_from_its_declared_length(port):
    """413 from the head: nothing of the body sent, none waited for."""
    with _connect(port) as sock:
        head = b"POST /v1/rollouts HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer op-token\r\n"
        sock.sendall(head + f"Content-Length: {LIMITS.max_body_bytes + 1}\r\n\r\n".encode())
        status, headers, body = _answer(sock)
        assert status == 413
        assert headers["connection"] == "close"
        assert "over" in json.loads(body)["error"]
