"""The processes ``edgec demo`` runs: background services, the devices, and an embedded broker.

``Service`` is one background process (broker, server, agent) with its log file;
``stop_services`` ends them (SIGTERM, then SIGKILL to the process group). ``choose_broker``
picks Mosquitto, else ``EmbeddedBroker``, which runs amqtt in a thread of this process.
``DemoError`` says which step failed and where its log is.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgec.errors import EdgecError, OptionError

__all__ = [
    "START_TIMEOUT_S",
    "DemoError",
    "Device",
    "EmbeddedBroker",
    "Service",
    "choose_broker",
    "free_port",
    "log_tail",
    "port_open",
    "stop_services",
]

START_TIMEOUT_S = 60.0


class DemoError(EdgecError):
    """A step of the demo failed; the message says which and where its log is."""


def _mosquitto() -> str | None:
    found = shutil.which("mosquitto")
    if found is None and Path("/usr/sbin/mosquitto").exists():
        found = "/usr/sbin/mosquitto"
    return found


def choose_broker(choice: str) -> str:
    """A path to the Mosquitto binary, or ``"embedded"``; fails early, before any build."""
    import importlib.util

    mosquitto = _mosquitto()
    has_amqtt = importlib.util.find_spec("amqtt") is not None
    if choice in ("auto", "mosquitto") and mosquitto:
        return mosquitto
    if choice in ("auto", "embedded") and has_amqtt:
        return "embedded"
    if choice == "embedded":
        raise OptionError("the embedded broker needs amqtt: pip install 'edgec[demo]' -c constraints.txt")
    raise OptionError(
        "no MQTT broker: install Mosquitto (sudo apt-get install mosquitto; make demo does it where it "
        "can), or pip install 'edgec[demo]' for an embedded one"
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def log_tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


@dataclass
class Service:
    """A background process (broker, server, agent) with its log file."""

    name: str
    proc: subprocess.Popen[bytes]
    log: Path

    def wait_for_port(self, port: int, timeout_s: float = START_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout_s
        while not port_open(port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                why = f"exited with {self.proc.returncode}" if self.proc.poll() is not None else "timed out"
                raise DemoError(
                    f"{self.name} did not start ({why}); its log {self.log}:\n{log_tail(self.log)}"
                )
            time.sleep(0.1)


def stop_services(services: list[Service], timeout_s: float = 15.0) -> None:
    """SIGTERM to all, wait, then SIGKILL to each process group still there."""
    for service in services:
        if service.proc.poll() is None:
            service.proc.terminate()
    deadline = time.monotonic() + timeout_s
    for service in services:
        try:
            service.proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(service.proc.pid, signal.SIGKILL)
            service.proc.wait(timeout=5)


@dataclass
class Device:
    id: str
    profile: str
    config: Path
    http_port: int = 0


class EmbeddedBroker:
    """amqtt in a thread of this process, for machines without Mosquitto: it checks the device
    and server passwords (Argon2 hashes of the ones ``edgec devices add`` and ``edgec broker
    config`` made), but not the per-device ACL."""

    def __init__(self, port: int, folder: Path, devices: list[Device]) -> None:
        self.port = port
        self.folder = folder
        self.devices = devices
        self.thread: threading.Thread | None = None
        self.loop: Any = None
        self.broker: Any = None
        self.log_handler: Any = None

    def _password_file(self) -> Path:
        from pwdlib.hashers.argon2 import Argon2Hasher

        from ota_server.broker import SERVER_USER

        hasher = Argon2Hasher()
        users = {SERVER_USER: (self.folder / "server.secret").read_text().strip()}
        for d in self.devices:
            users[d.id] = tomllib.loads(d.config.read_text())["mqtt"]["password"]
        path = self.folder / "amqtt-passwords"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.writelines(f"{user}:{hasher.hash(password)}\n" for user, password in users.items())
        return path

    def start(self) -> None:
        import asyncio
        import logging

        from amqtt.broker import Broker

        config = {
            "listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{self.port}"}},
            "plugins": {
                "amqtt.plugins.authentication.FileAuthPlugin": {"password_file": str(self._password_file())}
            },
        }
        self.log_handler = logging.FileHandler(self.folder / "amqtt.log")
        logger = logging.getLogger("amqtt")
        logger.addHandler(self.log_handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()
        failure: list[BaseException] = []

        def serve() -> None:
            asyncio.set_event_loop(self.loop)
            try:
                self.broker = Broker(config, loop=self.loop)
                self.loop.run_until_complete(self.broker.start())
            except Exception as e:
                failure.append(e)
                ready.set()
                return
            ready.set()
            self.loop.run_forever()

        self.thread = threading.Thread(target=serve, name="amqtt", daemon=True)
        self.thread.start()
        ready.wait(START_TIMEOUT_S)
        if failure or not port_open(self.port):
            raise DemoError(f"the embedded broker did not start: {failure[0] if failure else 'timed out'}")

    def stop(self) -> None:
        import asyncio
        import logging

        if self.thread is None or self.loop is None:
            return
        if self.broker is not None and self.loop.is_running():
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(self.broker.shutdown(), self.loop).result(10)
            self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        if not self.thread.is_alive():
            self.loop.close()
        if self.log_handler is not None:
            logging.getLogger("amqtt").removeHandler(self.log_handler)
            self.log_handler.close()
