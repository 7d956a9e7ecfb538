"""Real services the integration tests start: Mosquitto on a free port, and small helpers."""

from __future__ import annotations

import secrets
import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

MOSQUITTO = shutil.which("mosquitto") or (
    "/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None
)
needs_mosquitto = pytest.mark.skipif(
    MOSQUITTO is None, reason="the mosquitto binary is not installed (make test installs it)"
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(predicate: Callable[[], object], seconds: float = 10.0, step_s: float = 0.05) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step_s)
    return bool(predicate())


def port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def add_broker_login(folder: Path, user: str, access: str = "readwrite edgec/v1/#") -> str:
    """A test's own login beside those ``write_broker_config`` wrote in ``folder`` (before the
    broker starts); its password. Client ids are bound to usernames: a watcher that logged in
    as the server would take over the server's connection and session."""
    from ota_server.registry import hash_password

    password = secrets.token_urlsafe(16)
    with (folder / "passwords").open("a", encoding="utf-8") as f:
        f.write(f"{user}:{hash_password(password)}\n")
    with (folder / "acl").open("a", encoding="utf-8") as f:
        f.write(f"\nuser {user}\ntopic {access}\n")
    return password


def start_mosquitto(config: Path, port: int) -> subprocess.Popen[bytes]:
    """Start Mosquitto on its generated config; its log goes to a file beside the config
    (never a pipe nobody reads, which would stall the broker once full)."""
    assert MOSQUITTO is not None
    log = (config.parent / "mosquitto.log").open("ab")
    proc = subprocess.Popen([MOSQUITTO, "-c", str(config)], stdout=log, stderr=subprocess.STDOUT)
    if not wait_for(lambda: port_open(port), 10):
        proc.kill()
        pytest.fail(f"mosquitto did not start: {(config.parent / 'mosquitto.log').read_text()}")
    return proc


def stop(proc: subprocess.Popen[bytes], timeout_s: float = 20) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
