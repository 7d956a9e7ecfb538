"""A fleet on one machine for the end-to-end tests and the benchmarks: a real Mosquitto with
the generated config and ACL, the real OTA server process, and real agent processes, driven
through the command line as an operator and a device would.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pwd
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt

from ota_server.broker import write_broker_config
from ota_server.registry import Registry
from ota_server.repository import ImageRepository
from tests._cli import ROOT, run_edgec
from tests._releases import PROFILE
from tests._services import add_broker_login, free_port, port_open, start_mosquitto, stop, wait_for

PASS = b"e2e passphrase"
FLEET = "lab"


def code_env(code: Path | None) -> dict[str, str] | None:
    """The environment that runs ``code`` (a source tree of another release) instead of this
    checkout: it goes first on the module path, before the installed editable package."""
    if code is None:
        return None
    return {**os.environ, "PYTHONPATH": str(code)}


# -- the fleet ------------------------------------------------------------------------------
@dataclass
class AgentProcess:
    device: str
    config: Path
    state: Path
    http_port: int
    log: Path
    proc: subprocess.Popen[bytes] | None = None
    code: Path | None = None  # another release's source tree to run (version skew); None: this one

    def start(self) -> None:
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "edgec", "-v", "agent", "run", "--config", str(self.config)],
                cwd=self.code or ROOT,
                env=code_env(self.code),
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        assert wait_for(lambda: port_open(self.http_port), 30), self.log.read_text()[-3000:]

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None:
            stop(self.proc)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.http_port}{path}"

    def infer(self, x: np.ndarray, timeout_s: float = 10) -> tuple[str, np.ndarray]:
        """``(model_version, logits)`` for one input through the v2 HTTP API."""
        body = {
            "inputs": [{"name": "x", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]
        }
        request = urllib.request.Request(
            self.url("/v2/models/digits/infer"), data=json.dumps(body).encode(), method="POST"
        )
        request.add_header("Content-Type", "application/json")
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            answer = json.loads(response.read())
        out = answer["outputs"][0]
        return answer["model_version"], np.asarray(out["data"], dtype=np.float32).reshape(out["shape"])

    def journal(self) -> dict[str, Any] | None:
        path = self.state / "install.json"
        try:
            return json.loads(path.read_text())
        except (FileNotFoundError, ValueError):
            return None


class Monitor:
    """The operator's view of the broker: everything on the fleet's topics, in arrival order
    (a login of its own that may publish anywhere, as an attacker who holds the broker; a
    persistent session, so nothing is lost across a broker restart)."""

    def __init__(self, port: int, password: str) -> None:
        self.messages: list[tuple[str, bytes]] = []
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id="e2e-monitor",
            clean_session=False,
            protocol=mqtt.MQTTv311,
        )
        self.client.username_pw_set("e2e-monitor", password)
        self.client.on_connect = lambda c, *_: c.subscribe("edgec/v1/#", qos=1)
        self.client.on_message = lambda _c, _u, m: self.messages.append((m.topic, bytes(m.payload)))
        self.client.reconnect_delay_set(1, 2)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def of(self, device: str, kind: str) -> list[dict[str, Any]]:
        topic = f"edgec/v1/{FLEET}/devices/{device}/{kind}"
        found = []
        for t, payload in list(self.messages):
            if t == topic and payload:
                with contextlib.suppress(ValueError):
                    found.append(json.loads(payload))
        return found

    def events(self, device: str, kind: str | None = None) -> list[dict[str, Any]]:
        return [e for e in self.of(device, "events") if kind in (None, e.get("event"))]

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


@dataclass
class Fleet:
    root: Path
    repo: ImageRepository
    db: str
    broker_port: int
    tls_port: int
    broker_config: Path
    http_port: int
    token: str
    server_password: str
    broker: subprocess.Popen[bytes] | None = None
    server: subprocess.Popen[bytes] | None = None
    agents: dict[str, AgentProcess] = field(default_factory=dict)
    monitor: Monitor | None = None
    server_code: Path | None = None  # another release's source tree for the server (version skew)

    # the operator's side
    def publish(self, *bundles: Path) -> None:
        result = run_edgec(
            "publish",
            *bundles,
            "--repo",
            self.repo.folder,
            "--keys",
            self.root / "keys",
            "--passphrase-file",
            self.root / "passphrase",
        )
        assert result.returncode == 0, result.stderr

    def api_args(self) -> tuple[str, ...]:
        return ("--server", f"http://127.0.0.1:{self.http_port}", "--token", self.token)

    def assign(self, device: str, release: str, *extra: str) -> None:
        result = run_edgec("fleet", "assign", device, release, *extra, *self.api_args())
        assert result.returncode == 0, result.stderr

    def device(self, device: str) -> dict[str, Any]:
        registry = Registry.open(self.db)
        try:
            return registry.get(device).as_dict()
        finally:
            registry.engine.dispose()

    # services
    def start_broker(self) -> None:
        self.broker = start_mosquitto(self.broker_config, self.broker_port)

    def stop_broker(self) -> None:
        assert self.broker is not None
        stop(self.broker)
        self.broker = None

    def start_server(self) -> None:
        log = (self.root / "server.log").open("ab")
        self.server = subprocess.Popen(
            [sys.executable, "-m", "edgec", "server", "run", "--config", str(self.root / "server.toml")],
            cwd=self.server_code or ROOT,
            env=code_env(self.server_code),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        assert wait_for(lambda: port_open(self.http_port), 30), (self.root / "server.log").read_text()
        time.sleep(0.5)  # its MQTT subscriptions

    def add_sim_devices(
        self, count: int, group: str, prefix: str = "sim-", profile: str = PROFILE
    ) -> list[Any]:
        """Register ``count`` simulated devices straight in the registry (before ``up``: their
        passwords go into the broker's file); their ``sim.SimDeviceConfig`` s."""
        from sim import SimDeviceConfig, device_ids

        registry = Registry.open(self.db)
        try:
            configs = []
            for device in device_ids(prefix, count):
                _, password = registry.add_device(device, FLEET, group, profile)
                state = self.root / "sim" / device
                configs.append(SimDeviceConfig(device, password, state, FLEET, profile))
            return configs
        finally:
            registry.engine.dispose()

    def rollout(self, release: str, *options: str) -> str:
        """``edgec rollout start``; the rollout's id."""
        result = run_edgec("rollout", "start", release, *options, *self.api_args())
        assert result.returncode == 0, result.stderr
        return result.stdout.split()[1].rstrip(":")

    def rollout_status(self, rollout_id: str) -> dict[str, Any]:
        request = urllib.request.Request(f"http://127.0.0.1:{self.http_port}/v1/rollouts/{rollout_id}")
        request.add_header("Authorization", f"Bearer {self.token}")
        with urllib.request.urlopen(request, timeout=30) as response:
            status: dict[str, Any] = json.loads(response.read())
        return status

    def steer(self, rollout_id: str, action: str) -> None:
        result = run_edgec("rollout", action, rollout_id, *self.api_args())
        assert result.returncode == 0, result.stderr

    def add_agent(self, device: str, tls: bool = False, **overrides: Any) -> AgentProcess:
        """Register the device (before the broker starts: its password goes into the broker's
        file) and write its agent config, as ``edgec devices add`` makes it, plus test settings."""
        config = self.root / f"{device}.agent.toml"
        result = run_edgec(
            "devices", "add", device, "--profile", PROFILE, "--group", "g", "--fleet", FLEET,
            "--broker", f"127.0.0.1:{self.broker_port}", "--repo", self.repo.folder,
            "--db", self.db, "--out", config,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        state = self.root / f"{device}-state"
        http_port = free_port()
        settings = {
            "http": {"port": http_port},
            "install": {"probation_s": 2.0, "probation_min_requests": 10, "chunk_timeout_s": 3.0},
            "telemetry": {"window_s": 1.0},
            "mqtt": {"reconnect_max_s": 2.0},
        }
        if tls:  # the broker's TLS listener, checked against the CA edgec broker config made
            settings["mqtt"].update(port=self.tls_port, ca_file=str(self.root / "broker" / "ca.crt"))
        for section, values in overrides.items():
            settings.setdefault(section, {}).update(values)
        text = config.read_text().replace('state_dir = "/var/lib/edgec"', f'state_dir = "{state}"')
        for section, values in settings.items():
            lines = "".join(f"{k} = {json.dumps(v)}\n" for k, v in values.items())
            if f"[{section}]\n" in text:  # mqtt: the section the file has; these keys win
                start = text.index(f"[{section}]\n") + len(f"[{section}]\n")
                end = text.find("\n[", start)
                end = len(text) if end < 0 else end + 1
                kept = [
                    line
                    for line in text[start:end].splitlines(keepends=True)
                    if line.split("=")[0].strip() not in values
                ]
                text = text[:start] + lines + "".join(kept) + text[end:]
            else:
                text += f"\n[{section}]\n{lines}"
        config.write_text(text)
        agent = AgentProcess(device, config, state, http_port, self.root / f"{device}.log")
        self.agents[device] = agent
        return agent


def new_fleet(tmp_path: Path) -> Fleet:
    """Keys and a repository, a registry, and the server's config; services start in ``up``."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    passphrase = tmp_path / "passphrase"
    passphrase.write_bytes(PASS)
    repo = ImageRepository.init(tmp_path / "repo", PASS, {}, keys=tmp_path / "keys")
    db = f"sqlite:///{tmp_path / 'fleet.db'}"
    Registry.open(db).engine.dispose()
    token = "e2e-operator-token"
    http_port, broker_port = free_port(), free_port()
    (tmp_path / "server.toml").write_text(
        f'repo = "{repo.folder}"\nonline_keys = "{repo.online_keys}"\ndb = "{db}"\n'
        f'passphrase_file = "{passphrase}"\nrollout_tick_s = 0.5\n\n'
        f'[mqtt]\nport = {broker_port}\npassword_file = "{tmp_path / "broker" / "server.secret"}"\n'
        f'client_id = "edgec-server-e2e"\n\n[http]\nport = {http_port}\n\n'
        f'[http.tokens]\n"{hashlib.sha256(token.encode()).hexdigest()}" = "operator"\n'
    )
    broker_config = tmp_path / "broker" / "mosquitto.conf"
    fleet = Fleet(tmp_path, repo, db, broker_port, free_port(), broker_config, http_port, token, "")
    return fleet


def down(fleet: Fleet) -> None:
    for agent in fleet.agents.values():
        agent.stop()
    if fleet.monitor is not None:
        fleet.monitor.close()
    if fleet.server is not None:
        stop(fleet.server)
    if fleet.broker is not None:
        stop(fleet.broker)


def up(fleet: Fleet) -> None:
    """Write the broker's files from the registry (devices added by now), start broker and server."""
    registry = Registry.open(fleet.db)
    user = pwd.getpwuid(os.getuid()).pw_name
    files = write_broker_config(
        registry, fleet.root / "broker", port=fleet.broker_port, tls_port=fleet.tls_port, run_as=user
    )
    assert files.ca_cert == fleet.root / "broker" / "ca.crt"
    registry.engine.dispose()
    fleet.server_password = files.server_password
    monitor_password = add_broker_login(files.config.parent, "e2e-monitor")
    fleet.start_broker()
    fleet.monitor = Monitor(fleet.broker_port, monitor_password)
    fleet.start_server()


def http_get(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as e:
        return int(e.code)
    except OSError:
        return 0
