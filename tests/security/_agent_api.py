"""Helpers for the attacks on the agent's v2 API: a real bundle, a real ``edgec agent serve``
process, and raw HTTP over a socket (what an attacker sends is rarely what a client library
would)."""

from __future__ import annotations

import json
import re
import resource
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests._cli import DIGITS, ROOT, run_edgec

INFER = "/v2/models/digits/infer"
X = [0.25] * 64
INFER_BODY = json.dumps(
    {"inputs": [{"name": "x", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": X}]}
).encode()


@pytest.fixture(scope="module")
def agent_bundle(tmp_path_factory) -> Path:
    """The digits sample for x86-64-cpu (onnx fp32), built with the real command line."""
    out = tmp_path_factory.mktemp("agent-api-bundle")
    result = run_edgec(
        "build", DIGITS / "model.onnx", "--name", "digits", "--version", "1.0.0",
        "--target", "x86-64-cpu", "--precision", "fp32", "--out", out, "--no-cache",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return out / "digits-1.0.0-x86-64-cpu"


def request(method: str, target: str, body: bytes = b"", headers: dict[str, str] | None = None) -> bytes:
    lines = [f"{method} {target} HTTP/1.1", "Host: 127.0.0.1"]
    if body or method == "POST":
        lines.append(f"Content-Length: {len(body)}")
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


INFER_REQUEST = request("POST", INFER, INFER_BODY)
INFER_THEN_CLOSE = request("POST", INFER, INFER_BODY, {"Connection": "close"})


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> dict:
        return json.loads(self.body)


def read_answer(sock: socket.socket, buffer: bytearray | None = None) -> Answer | None:
    """One response from ``sock`` (None if the server closed first); ``buffer`` keeps what
    arrived past it, for the next call."""
    data = buffer if buffer is not None else bytearray()
    while True:
        end = data.find(b"\r\n\r\n")
        if end >= 0:
            lines = bytes(data[:end]).decode("latin-1").split("\r\n")
            status = int(lines[0].split(" ", 2)[1])
            headers = {
                k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])
            }
            length = int(headers.get("content-length", "0"))
            if status == 100:
                del data[: end + 4]
                continue
            if len(data) >= end + 4 + length:
                body = bytes(data[end + 4 : end + 4 + length])
                del data[: end + 4 + length]
                return Answer(status, headers, body)
        try:
            chunk = sock.recv(1 << 16)
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            return None
        data += chunk


def closed_by_server(sock: socket.socket, within_s: float) -> bool:
    """True once the server closes (or resets) the connection, reading away what comes."""
    sock.settimeout(within_s)
    deadline = time.monotonic() + within_s
    try:
        while time.monotonic() < deadline:
            if not sock.recv(1 << 16):
                return True
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False
    return False


def exchange(port: int, data: bytes, timeout_s: float = 10.0) -> tuple[list[Answer], bool]:
    """Send ``data`` on a new connection; (the answers, whether the server then closed)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as sock:
        sock.sendall(data)
        answers: list[Answer] = []
        buffer = bytearray()
        try:
            while (answer := read_answer(sock, buffer)) is not None:
                answers.append(answer)
                if answer.headers.get("connection") == "close":
                    return answers, read_answer(sock, buffer) is None
        except TimeoutError:
            return answers, False
        return answers, True


class AgentProcess:
    """``edgec agent serve BUNDLE --port 0 [--limit ...]``, optionally with a lower RLIMIT_NOFILE."""

    def __init__(self, bundle: Path, log: Path, limits: dict[str, object], nofile: int | None) -> None:
        def lower_fd_limit() -> None:
            if nofile is not None:
                _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
                resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, hard))

        command = [sys.executable, "-m", "edgec", "agent", "serve", str(bundle), "--port", "0"]
        for name, value in limits.items():
            command += ["--limit", f"{name}={value}"]
        self.log = log
        self._log_file = log.open("w")
        self.process = subprocess.Popen(
            command,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=self._log_file,
            text=True,
            preexec_fn=lower_fd_limit,  # noqa: PLW1509 (setrlimit only, before exec)
        )
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        found = re.search(r"http://127\.0\.0\.1:(\d+)", line)
        if not found:
            self.stop()
            raise AssertionError(f"edgec agent serve did not start: {line!r} {log.read_text()[-2000:]}")
        self.port = int(found.group(1))

    def rss_bytes(self) -> int:
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) * 1024

    def log_lines(self) -> list[str]:
        self._log_file.flush()
        return self.log.read_text(errors="replace").splitlines()

    def infer_ok(self, timeout_s: float = 10.0) -> bool:
        """A valid infer request on a new connection gets its 200."""
        try:
            answers, _ = exchange(self.port, INFER_THEN_CLOSE, timeout_s)
        except OSError:
            return False
        return bool(answers) and answers[0].status == 200

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log_file.close()


@contextmanager
def agent_process(
    bundle: Path, log: Path, nofile: int | None = None, **limits: object
) -> Iterator[AgentProcess]:
    agent = AgentProcess(bundle, log, limits, nofile)
    try:
        yield agent
    finally:
        agent.stop()
