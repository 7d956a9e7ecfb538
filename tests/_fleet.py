"""The end-to-end tests' fleet: ``localfleet.LocalFleet`` (a real Mosquitto with the generated
config and ACL, the real OTA server process, real agent processes, driven through the command
line) plus what only tests need: a monitor that sees every message on the broker, the registry
read directly, and short probation and telemetry windows.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt

from localfleet import AgentProcess, LocalFleet, code_env, http_status
from ota_server.registry import Registry
from ota_server.repository import ImageRepository
from tests._releases import PROFILE
from tests._services import add_broker_login

__all__ = ["FLEET", "PASS", "Fleet", "Monitor", "code_env", "down", "http_get", "new_fleet", "simulate", "up"]

PASS = b"e2e passphrase"
FLEET = "lab"
http_get = http_status

# short windows, so that an install, its probation and its reports take seconds
TEST_AGENT_SETTINGS: dict[str, dict[str, Any]] = {
    "install": {"probation_s": 2.0, "probation_min_requests": 10, "chunk_timeout_s": 3.0},
    "telemetry": {"window_s": 1.0},
    "mqtt": {"reconnect_max_s": 2.0},
}


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
class Fleet(LocalFleet):
    monitor: Monitor | None = None

    @property
    def repo(self) -> ImageRepository:
        return ImageRepository(self.repo_dir, online_keys=self.online_keys)

    def device(self, device: str) -> dict[str, Any]:
        """The device's row, read from the registry itself."""
        registry = Registry.open(self.db)
        try:
            return registry.get(device).as_dict()
        finally:
            registry.engine.dispose()

    def add_agent(  # type: ignore[override]
        self, device: str, *, tls: bool = False, **overrides: dict[str, Any]
    ) -> AgentProcess:
        settings = {section: dict(values) for section, values in TEST_AGENT_SETTINGS.items()}
        for section, values in overrides.items():
            settings.setdefault(section, {}).update(values)
        return super().add_agent(device, PROFILE, "g", tls=tls, settings=settings)

    def add_sim_devices(  # type: ignore[override]
        self, count: int, group: str, prefix: str = "sim-", profile: str = PROFILE
    ) -> list[Any]:
        return super().add_sim_devices(count, group, prefix, profile)


def simulate(fleet: Fleet, configs: list[Any], behaviours: dict[str, dict[str, Any]], seed: int = 7) -> Any:
    """Start ``sim``'s devices (``configs`` from ``add_sim_devices``) on the fleet's broker, each
    provisioned with the repository's root and director key, with short windows and probation;
    the running ``SimFleet``, once every device is connected."""
    from agent.config import InstallSettings, TrustSettings
    from sim import SimBehaviours, SimFleet, SimSettings

    root, director_key = fleet.provisioning()
    settings = SimSettings(
        port=fleet.broker_port,
        window_s=1.0,
        install=InstallSettings(probation_s=0.5, probation_min_requests=3, warmup_runs=1),
        seed=seed,
    )
    sim = SimFleet(
        configs,
        trust=TrustSettings(root=root, director_key=director_key),
        behaviours=SimBehaviours(behaviours),
        settings=settings,
    )
    sim.start()
    assert sim.wait_connected(len(configs), 60)
    return sim


def new_fleet(tmp_path: Path) -> Fleet:
    """Keys and a repository, a registry; services start in ``up``."""
    fleet = Fleet.create(tmp_path, fleet=FLEET)
    assert isinstance(fleet, Fleet)
    fleet.init_keys(PASS)
    return fleet


def up(fleet: Fleet) -> None:
    """The broker's files from the registry (devices added by now) with the monitor's login,
    then the broker, the monitor and the server."""
    fleet.configure_broker()
    monitor_password = add_broker_login(fleet.broker_dir, "e2e-monitor")
    fleet.start_broker()
    fleet.monitor = Monitor(fleet.broker_port, monitor_password)
    fleet.start_server()


def down(fleet: Fleet) -> None:
    if fleet.monitor is not None:
        fleet.monitor.close()
        fleet.monitor = None
    fleet.down()
