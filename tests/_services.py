"""Real services the integration tests start: Mosquitto on a free port (``localfleet``'s
process helpers), and a test's own broker login."""

from __future__ import annotations

import os
import secrets
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from localfleet import (
    HarnessError,
    find_mosquitto,
    free_port,
    port_open,
    start_service,
    stop_process,
    wait_for,
)
from localfleet.database import postgres_database

__all__ = [
    "MOSQUITTO",
    "add_broker_login",
    "free_port",
    "needs_mosquitto",
    "port_open",
    "postgres_url",
    "start_mosquitto",
    "stop",
    "wait_for",
]

MOSQUITTO = find_mosquitto()
needs_mosquitto = pytest.mark.skipif(
    MOSQUITTO is None, reason="the mosquitto binary is not installed (make test installs it)"
)
stop = stop_process


PG_ADMIN = os.environ.get("EDGEC_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")


def postgres_url() -> Iterator[str]:
    """Create a fresh database on the machine's PostgreSQL; yield its URL; drop it."""
    pytest.importorskip("psycopg")
    database = postgres_database(PG_ADMIN, "edgec_test")
    try:
        url = database.__enter__()
    except HarnessError as e:
        pytest.skip(str(e))
    try:
        yield url
    finally:
        database.__exit__(None, None, None)


def add_broker_login(folder: Path, user: str, access: str = "readwrite edgec/v1/#") -> str:
    """A test's own login beside those ``edgec broker config`` wrote in ``folder`` (before the
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
    """Start Mosquitto on its generated config; its log goes to a file beside the config."""
    assert MOSQUITTO is not None
    service = start_service("mosquitto", [MOSQUITTO, "-c", str(config)], config.parent / "mosquitto.log")
    try:
        service.wait_for_port(port, 10)
    except HarnessError as e:
        service.proc.kill()
        pytest.fail(str(e))
    return service.proc
