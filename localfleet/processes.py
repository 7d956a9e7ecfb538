"""The processes of a fleet on one machine: a broker, the OTA server, agents.

``Service`` is one background process with its log file (``stop_services`` ends them:
SIGTERM, then SIGKILL to the process group). ``find_mosquitto`` finds Debian's broker;
``choose_broker`` picks it, else ``EmbeddedBroker`` (amqtt in a thread of this process, for
``edgec demo`` on a machine without Mosquitto). ``HarnessError`` says which step failed and
where its log is.
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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgec.errors import EdgecError, OptionError

__all__ = [
    "START_TIMEOUT_S",
    "EmbeddedBroker",
    "HarnessError",
    "Service",
    "choose_broker",
    "find_mosquitto",
    "free_port",
    "log_tail",
    "port_open",
    "start_service",
    "stop_process",
    "stop_services",
    "wait_for",
]

START_TIMEOUT_S = 60.0


class HarnessError(EdgecError):
    """A step of the local fleet failed; the message says which and where its log is."""


def find_mosquitto() -> str | None:
    """The Mosquitto binary (Debian installs it in /usr/sbin, often not on a user's PATH)."""
    found = shutil.which("mosquitto")
    if found is None and Path("/usr/sbin/mosquitto").exists():
        found = "/usr/sbin/mosquitto"
    return found


def choose_broker(choice: str) -> str:
    """A path to the Mosquitto binary, or ``"embedded"``; fails early, before any build."""
    import importlib.util

    mosquitto = find_mosquitto()
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


def wait_for(predicate: Callable[[], object], seconds: float = 10.0, step_s: float = 0.05) -> bool:
    """Poll ``predicate`` until it is true or ``seconds`` pass; its last answer."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step_s)
    return bool(predicate())


def log_tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def stop_process(proc: subprocess.Popen[bytes], timeout_s: float = 20.0) -> None:
    """SIGTERM, wait, then SIGKILL (to its process group where it leads one)."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                if os.getpgid(proc.pid) == proc.pid:
                    os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait(timeout=5)


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
                raise HarnessError(
                    f"{self.name} did not start ({why}); its log {self.log}:\n{log_tail(self.log)}"
                )
            time.sleep(0.05)

    def running(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout_s: float = 20.0) -> None:
        stop_process(self.proc, timeout_s)

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)


def start_service(
    name: str,
    argv: Sequence[str],
    log: Path,
    *,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    new_session: bool = False,
) -> Service:
    """Start ``argv`` in the background, its output appended to ``log`` (a file, never a pipe
    nobody reads, which would stall the process once full)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        proc = subprocess.Popen(
            list(argv), cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=new_session
        )
    return Service(name, proc, log)


def stop_services(services: Sequence[Service], timeout_s: float = 15.0) -> None:
    """SIGTERM to all, wait, then SIGKILL to each one still there."""
    for service in services:
        if service.proc.poll() is None:
            service.proc.terminate()
    deadline = time.monotonic() + timeout_s
    for service in services:
        stop_process(service.proc, max(deadline - time.monotonic(), 0.1))


class EmbeddedBroker:
    """amqtt in a thread of this process, for machines without Mosquitto: it checks the device
    and server passwords (Argon2 hashes of the ones ``edgec devices add`` and ``edgec broker
    config`` made), but not the per-device ACL."""

    def __init__(self, port: int, folder: Path, device_configs: Sequence[Path]) -> None:
        self.port = port
        self.folder = folder
        self.device_configs = list(device_configs)
        self.thread: threading.Thread | None = None
        self.loop: Any = None
        self.broker: Any = None
        self.log_handler: Any = None

    def _password_file(self) -> Path:
        from pwdlib.hashers.argon2 import Argon2Hasher

        from ota_server.broker import SERVER_USER

        hasher = Argon2Hasher()
        users = {SERVER_USER: (self.folder / "server.secret").read_text().strip()}
        for config in self.device_configs:
            mqtt = tomllib.loads(config.read_text())["mqtt"]
            users[mqtt["username"]] = mqtt["password"]
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
            raise HarnessError(f"the embedded broker did not start: {failure[0] if failure else 'timed out'}")

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
