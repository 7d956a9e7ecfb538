"""``edgec sim fleet``: simulated devices against a real Mosquitto and the real OTA server.

The devices run the agent's real install pipeline (director document, TUF refresh, chunks
over MQTT, probation); only the runtime is a stand-in whose behaviour is set per version.
"""

from __future__ import annotations

import json
import math
import os
import pwd
import stat
import statistics
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
import pytest

from agent.config import InstallSettings, TrustSettings
from edgec.errors import OptionError
from ota_server.broker import write_broker_config
from ota_server.registry import Registry
from ota_server.repository import ImageRepository
from ota_server.server import MqttSettings, OtaServer, ServerConfig
from sim import SimBehaviours, SimDeviceConfig, SimFleet, SimSettings, device_ids
from tests._releases import PROFILE
from tests._services import add_broker_login, free_port, needs_mosquitto, start_mosquitto, stop, wait_for
from tests.conftest import ROOT, run_edgec

PASS = b"sim passphrase"
FLEET = "sim"


# -- behaviours (no broker) ---------------------------------------------------------------------
def test_behaviour_specs_override_the_default_per_version():
    behaviours = SimBehaviours.parse(
        ["*:latency_ms=4,requests_per_s=50,drift=warn", "2.0.0:latency_ms=8,error_rate=0.02,psi=0.3"]
    )
    default, v2 = behaviours.for_version("1.0.0"), behaviours.for_version("2.0.0")
    assert (default.latency_ms, default.requests_per_s, default.drift) == (4.0, 50.0, "warn")
    assert (v2.latency_ms, v2.error_rate, v2.requests_per_s) == (8.0, 0.02, 50.0)
    assert v2.drift is None
    assert v2.expected_psi() == 0.3
    assert SimBehaviours.parse(["3.0.0:input_shift_sd=0.5"]).for_version("3.0.0").expected_psi() == 0.25


def test_behaviour_file_and_flags_combine(tmp_path):
    path = tmp_path / "behaviour.toml"
    path.write_text('["*"]\nlatency_ms = 6\n\n["2.0.0"]\nself_test = "fail"\n')
    behaviours = SimBehaviours.parse(["2.0.0:latency_ms=9"], SimBehaviours.load(path))
    assert behaviours.for_version("2.0.0").self_test == "fail"
    assert behaviours.for_version("2.0.0").latency_ms == 9.0
    assert behaviours.for_version("7.0.0").latency_ms == 6.0


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("2.0.0", "expected VERSION:field=value"),
        ("2.0.0:latency_ms", "is not field=value"),
        ("2.0.0:latency=8", "latency: Extra inputs are not permitted"),
        ("2.0.0:error_rate=2", "less than or equal to 1"),
        ("2.0.0:self_test=maybe", "self_test"),
        ("2.0.0:latency_ms=-1", "greater than 0"),
    ],
)
def test_bad_behaviour_specs_are_refused_with_the_reason(spec, message):
    with pytest.raises(OptionError, match=message):
        SimBehaviours.parse([spec])


def test_two_drift_settings_in_one_entry_are_refused(tmp_path):
    path = tmp_path / "b.json"
    path.write_text(json.dumps({"2.0.0": {"drift": "ok", "psi": 0.3}}))
    with pytest.raises(OptionError, match="one of drift, psi and input_shift_sd"):
        SimBehaviours.load(path)


def test_latency_spread_sets_the_p95():
    behaviour = SimBehaviours.parse(["*:latency_ms=10,latency_spread=0.3"]).for_version("1.0.0")
    samples = behaviour.latencies_ms(np.random.default_rng(0), 200_000)
    assert np.percentile(samples, 50) == pytest.approx(10.0, rel=0.01)
    assert np.percentile(samples, 95) == pytest.approx(behaviour.p95_ms, rel=0.01)
    assert behaviour.p95_ms == pytest.approx(10 * math.exp(1.645 * 0.3), rel=1e-3)


def test_sim_help_imports_no_ml_package():
    probe = (
        "import contextlib, io, sys\nfrom cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    for args in (['--help'], ['sim', '--help'], ['sim', 'fleet', '--help']):\n"
        "        try:\n            main(args)\n        except SystemExit:\n            pass\n"
        "print(' '.join(sorted({m.split('.')[0] for m in sys.modules})))\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=ROOT)
    loaded = set(out.stdout.split())
    assert not loaded & {"numpy", "paho", "agent", "ota_server", "onnxruntime"}, sorted(loaded)


# -- a world: repository, registry, Mosquitto, the OTA server -------------------------------------
class Monitor:
    """Everything on the fleet's topics, through a read-only login of its own (client ids are
    bound to usernames: the server's login would take over the server's connection)."""

    def __init__(self, port: int, password: str) -> None:
        self.messages: list[tuple[str, bytes]] = []
        self._lock = threading.Lock()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="sim-test-monitor")
        self.client.username_pw_set("sim-test-monitor", password)
        self.client.on_connect = lambda c, *_: c.subscribe(f"edgec/v1/{FLEET}/devices/#", qos=1)
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def _on_message(self, _c: Any, _u: Any, message: mqtt.MQTTMessage) -> None:
        with self._lock:
            self.messages.append((message.topic, bytes(message.payload)))

    def of(self, kind: str, device: str = "+") -> list[tuple[str, dict[str, Any]]]:
        """``(device, body)`` of every report of ``kind``, in arrival order."""
        with self._lock:
            messages = list(self.messages)
        found = []
        for topic, payload in messages:
            parts = topic.split("/")
            if parts[-1] == kind and device in ("+", parts[4]) and payload:
                found.append((parts[4], json.loads(payload)))
        return found

    def events(self, kind: str) -> list[tuple[str, dict[str, Any]]]:
        return [(d, e) for d, e in self.of("events") if e["event"] == kind]

    def last_state(self, device: str) -> dict[str, Any] | None:
        states = self.of("state", device)
        return states[-1][1] if states else None

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


@dataclass
class World:
    root: Path
    repo: ImageRepository
    db: str
    broker_port: int
    passwords: dict[str, str]
    server: OtaServer
    monitor: Monitor

    def installed(self, device: str) -> str | None:
        return self.server.registry.get(device).installed_release


def _publish(repo: ImageRepository, bundles: list[Path]) -> None:
    repo.publish(bundles, PASS)


@pytest.fixture
def world(tmp_path, releases) -> Iterator[World]:
    repo = ImageRepository.init(tmp_path / "repo", PASS, {}, keys=tmp_path / "keys")
    _publish(repo, [releases["1.0.0"], releases["2.0.0"], releases["3.0.0"]])
    db = f"sqlite:///{tmp_path / 'fleet.db'}"
    registry = Registry.open(db)
    passwords = {}
    for device in device_ids("sim-", 20):
        _, passwords[device] = registry.add_device(device, FLEET, "canary", PROFILE)
    broker_port = free_port()
    files = write_broker_config(
        registry,
        tmp_path / "broker",
        port=broker_port,
        tls_port=free_port(),
        run_as=pwd.getpwuid(os.getuid()).pw_name,
    )
    registry.engine.dispose()
    monitor_password = add_broker_login(files.config.parent, "sim-test-monitor", "read edgec/v1/#")
    broker = start_mosquitto(files.config, broker_port)
    (tmp_path / "passphrase").write_bytes(PASS)
    config = ServerConfig(
        repo=repo.folder,
        db=db,
        passphrase_file=tmp_path / "passphrase",
        mqtt=MqttSettings(
            port=broker_port, password_file=tmp_path / "broker" / "server.secret", client_id="sim-test-server"
        ),
    )
    config.http.port = free_port()
    server = OtaServer(config)
    server.start()
    monitor = Monitor(broker_port, monitor_password)
    try:
        yield World(tmp_path, repo, db, broker_port, passwords, server, monitor)
    finally:
        monitor.close()
        server.stop()
        stop(broker)


def _fleet(world: World, behaviours: SimBehaviours) -> SimFleet:
    root, director_key = world.repo.provisioning()
    configs = [
        SimDeviceConfig(device, password, world.root / "devices" / device, FLEET, PROFILE)
        for device, password in world.passwords.items()
    ]
    settings = SimSettings(
        port=world.broker_port,
        window_s=1.0,
        install_workers=8,
        install=InstallSettings(probation_s=0.3, probation_min_requests=3, warmup_runs=1, chunk_timeout_s=5),
        seed=7,
    )
    return SimFleet(
        configs,
        trust=TrustSettings(root=root, director_key=director_key),
        behaviours=behaviours,
        settings=settings,
    )


def _p95s(world: World, release: str, devices: set[str]) -> list[float]:
    return [
        w["p95_ms"]
        for device, w in world.monitor.of("telemetry")
        if w.get("model") == release and device in devices and w["requests"] - w["errors"] >= 100
    ]


# -- the rehearsal -------------------------------------------------------------------------------
@needs_mosquitto
@pytest.mark.slow
def test_twenty_devices_install_refuse_a_failing_self_test_and_report_latency_per_version(world, releases):
    behaviours = SimBehaviours.parse(
        [
            "*:requests_per_s=300",
            "1.0.0:latency_ms=3,latency_spread=0.2",
            "2.0.0:self_test=fail",
            "3.0.0:latency_ms=6,latency_spread=0.1,drift=warn",
        ]
    )
    devices = list(world.passwords)
    with _fleet(world, behaviours) as fleet:
        assert fleet.wait_connected(timeout_s=30), fleet.summary()

        # 1.0.0 to everyone: installed through the real pipeline, the server sees it
        for device in devices:
            world.server.assign(device, "digits:1.0.0")
        assert fleet.wait_for_release("digits:1.0.0", timeout_s=60), fleet.summary()
        assert wait_for(lambda: all(world.installed(d) == "digits:1.0.0" for d in devices), 15)

        # the registry's state and the monitor's events arrive over separate subscriptions
        def committed() -> set[str]:
            return {d for d, e in world.monitor.events("committed") if e["release"] == "digits:1.0.0"}

        assert wait_for(lambda: committed() == set(devices), 15), sorted(set(devices) - committed())
        model = (releases["1.0.0"] / "model.onnx").read_bytes()
        for device in devices:
            state = world.root / "devices" / device
            # TUF metadata trusted on the device, the bundle fetched in chunks over MQTT
            assert json.loads((state / "metadata" / "timestamp.json").read_text())["signed"]["version"] >= 1
            assert (state / "models" / "digits-1.0.0" / "model.onnx").read_bytes() == model
            fetched = [e for e in world.monitor.events("fetched") if e[0] == device]
            assert {e["detail"] for _, e in fetched} >= {"model.onnx", "manifest.json", "golden.npz"}

        # 2.0.0 fails the (stand-in) self-test everywhere: refused, 1.0.0 keeps serving
        for device in devices:
            world.server.assign(device, "digits:2.0.0")
        assert wait_for(lambda: len(world.monitor.events("refused")) >= len(devices), 60), fleet.summary()
        refused = world.monitor.events("refused")
        assert {d for d, _ in refused} == set(devices)
        assert all(e["release"] == "digits:2.0.0" and e["step"] == "self-test" for _, e in refused)
        assert all("self_test=fail" in e["detail"] for _, e in refused)
        for device in devices:
            assert wait_for(lambda d=device: (world.monitor.last_state(d) or {}).get("detail", "").startswith(
                "digits:2.0.0 refused"), 10)  # fmt: skip
            assert world.monitor.last_state(device)["installed"] == "digits:1.0.0"
        summary = fleet.summary()
        assert summary.installed == {"digits:1.0.0": 20}
        assert summary.failed == 20

        # 3.0.0 (slower, drifting) to five devices: telemetry follows the version each serves
        canaries = set(devices[:5])
        for device in sorted(canaries):
            world.server.assign(device, "digits:3.0.0")
        assert fleet.wait_for_release("digits:3.0.0", 5, timeout_s=60), fleet.summary()
        others = set(devices) - canaries
        assert wait_for(lambda: len(_p95s(world, "digits:3.0.0", canaries)) >= 10, 20)
        assert wait_for(lambda: len(_p95s(world, "digits:1.0.0", others)) >= 10, 20)
        fleet_summary = fleet.summary()

    v1, v3 = behaviours.for_version("1.0.0"), behaviours.for_version("3.0.0")
    p95_v1 = statistics.median(_p95s(world, "digits:1.0.0", others))
    p95_v3 = statistics.median(_p95s(world, "digits:3.0.0", canaries))
    assert p95_v1 == pytest.approx(v1.p95_ms, rel=0.1)  # 3 ms * e^(1.645 * 0.2) = 4.17 ms
    assert p95_v3 == pytest.approx(v3.p95_ms, rel=0.1)  # 6 ms * e^(1.645 * 0.1) = 7.07 ms
    windows = [w for d, w in world.monitor.of("telemetry") if d in canaries and w["model"] == "digits:3.0.0"]
    assert all(w["drift"] == "warn" for w in windows if w["requests"] >= 100)
    seqs = [w["seq"] for d, w in world.monitor.of("telemetry") if d == devices[0]]
    assert seqs == sorted(seqs)
    assert len(set(seqs)) == len(seqs)
    assert fleet_summary.installed == {"digits:1.0.0": 15, "digits:3.0.0": 5}
    # the server records each device's latest window
    assert wait_for(
        lambda: (world.server.registry.get(devices[0]).telemetry or {}).get("model") == "digits:3.0.0"
    )


# -- the command line ----------------------------------------------------------------------------
@needs_mosquitto
@pytest.mark.slow
def test_sim_fleet_command_registers_once_and_runs_against_the_broker(tmp_path, releases):
    repo = ImageRepository.init(tmp_path / "repo", PASS, {}, keys=tmp_path / "keys")
    _publish(repo, [releases["1.0.0"]])
    db = f"sqlite:///{tmp_path / 'fleet.db'}"
    state = tmp_path / "sim"
    port = free_port()
    args = (
        "sim", "fleet", "--devices", "3", "--group", "lab-sim", "--fleet", FLEET, "--repo", repo.folder,
        "--db", db, "--broker", f"127.0.0.1:{port}", "--state", state, "--window-s", "1",
        "--progress-s", "1", "--behaviour", "1.0.0:latency_ms=2",
    )  # fmt: skip

    # first run: no broker yet; the devices are registered and their passwords kept (0600)
    first = run_edgec(*args, "--duration", "2")
    assert first.returncode == 0, first.stderr
    assert "registered 3 new devices" in first.stdout
    assert "edgec broker config" in first.stdout
    assert "connected 0/3" in first.stdout
    passwords_file = state / "passwords.json"
    assert stat.S_IMODE(passwords_file.stat().st_mode) == 0o600
    passwords = json.loads(passwords_file.read_text())
    assert sorted(passwords) == ["sim-0001", "sim-0002", "sim-0003"]
    registry = Registry.open(db)
    assert [d.group for d in registry.devices(fleet=FLEET)] == ["lab-sim"] * 3

    # the broker learns them; a second run reuses the same devices and passwords and connects
    files = write_broker_config(
        registry,
        tmp_path / "broker",
        port=port,
        tls_port=free_port(),
        run_as=pwd.getpwuid(os.getuid()).pw_name,
    )
    registry.engine.dispose()
    broker = start_mosquitto(files.config, port)
    try:
        second = run_edgec(*args, "--duration", "4")
    finally:
        stop(broker)
    assert second.returncode == 0, second.stderr
    assert "registered" not in second.stdout
    assert "connected 3/3" in second.stdout, second.stdout
    assert json.loads(passwords_file.read_text()) == passwords

    # a device registered elsewhere under the same id is not taken over
    other = run_edgec(*args[:-2], "--group", "other", "--duration", "1")
    assert other.returncode == 2
    assert "already registered" in other.stderr
