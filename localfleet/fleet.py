"""A fleet on one machine, driven through the real command line as an operator would.

``LocalFleet`` holds one work folder: the operator's keys and the image repository (``edgec
keys init``), a SQLite registry, devices (``edgec devices add``), the broker's files from the
registry (``edgec broker config``), an operator token (``edgec server token --json``), the
server's config, and the processes: Mosquitto (or an embedded broker), ``edgec server run``
and one ``edgec agent run`` per device. Releases are published with ``edgec publish``, assigned
with ``edgec fleet assign`` and rolled out with ``edgec rollout start --json``; the fleet's
state is read from the server's API. ``edgec demo``, the end-to-end tests and the benchmarks
all run on it; ``echo`` shows each command as a user would type it.

The server and the agents can run another release's source tree (``code``), for the version
skew test: that tree goes first on the module path.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import shlex
import sys
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from localfleet.agent_process import AgentProcess, Echo
from localfleet.commands import ROOT, CliResult, code_env, run_edgec
from localfleet.processes import (
    EmbeddedBroker,
    HarnessError,
    Service,
    find_mosquitto,
    free_port,
    start_service,
    stop_services,
    wait_for,
)

__all__ = ["AgentProcess", "LocalFleet"]


@dataclass
class LocalFleet:
    """A fleet in ``root``; ``create`` makes its keys, repository and registry."""

    root: Path
    fleet: str = "lab"
    broker: str = "mosquitto"  # a Mosquitto binary's path, "mosquitto" (found), or "embedded"
    echo: Echo | None = None  # shows each command as typed (edgec demo); None: quiet
    rollout_tick_s: float = 0.5
    server_code: Path | None = None  # another release's source tree for the server (version skew)
    database: str | None = None  # the registry's URL (PostgreSQL for replicas); None: SQLite here
    replicas: int = 1  # server processes sharing the registry (each its own login and HTTP port)
    lease_s: float = 10.0  # the scheduler's lease, with more than one replica
    broker_port: int = 0
    tls_port: int = 0
    http_port: int = 0
    token: str = ""
    agents: dict[str, AgentProcess] = field(default_factory=dict)
    services: list[Service] = field(default_factory=list)
    embedded: EmbeddedBroker | None = None
    server: Service | None = None  # replica 1
    servers: dict[int, Service] = field(default_factory=dict)  # replica number -> its process
    replica_ports: dict[int, int] = field(default_factory=dict)  # replica number -> its HTTP port
    broker_service: Service | None = None
    env: dict[str, str] = field(default_factory=dict)

    # -- folders and settings -------------------------------------------------------------------
    @property
    def db(self) -> str:
        return self.database or f"sqlite:///{self.root / 'fleet.db'}"

    @property
    def repo_dir(self) -> Path:
        return self.root / "repo"

    @property
    def online_keys(self) -> Path:
        return self.root / "online-keys"

    @property
    def broker_dir(self) -> Path:
        return self.root / "broker"

    @property
    def server_password(self) -> str:
        return (self.broker_dir / "server.secret").read_text().strip()

    @classmethod
    def create(cls, root: Path, **settings: Any) -> LocalFleet:
        """A fleet in ``root`` (empty or new), its ports picked; ``init_keys`` makes its keys."""
        root.mkdir(parents=True, exist_ok=True)
        fleet = cls(root.resolve(), **settings)
        fleet.broker_port, fleet.tls_port, fleet.http_port = free_port(), free_port(), free_port()
        local = ",".join(filter(None, [os.environ.get("NO_PROXY"), "127.0.0.1,localhost"]))
        (fleet.root / "tmp").mkdir(exist_ok=True)
        fleet.env = {
            **os.environ,
            "EDGEC_DB": fleet.db,
            "NO_PROXY": local,  # the operator commands talk to the server on loopback
            "no_proxy": local,
            "TMPDIR": str(fleet.root / "tmp"),  # what the tools leave in temp folders stays here
        }
        return fleet

    def init_keys(self, passphrase: bytes, online_passphrase: bytes | None = None) -> None:
        """The operator's offline keys (root, targets) and the server's online ones (snapshot,
        timestamp, director), each under its passphrase, and an empty image repository."""
        for name, text in (
            ("passphrase", passphrase),
            ("online-passphrase", online_passphrase or passphrase),
        ):
            path = self.root / name
            path.write_bytes(text + b"\n")
            path.chmod(0o600)
        self.edgec("keys", "init", *self.repo_args())

    def repo_args(self) -> tuple[str | Path, ...]:
        return (
            "--repo", self.repo_dir, "--keys", self.root / "keys", "--online-keys", self.online_keys,
            "--passphrase-file", self.root / "passphrase",
            "--online-passphrase-file", self.root / "online-passphrase",
        )  # fmt: skip

    # -- the command line -------------------------------------------------------------------------
    def _say(self, text: str) -> None:
        if self.echo is not None:
            self.echo(text.replace(str(self.root), "$DEMO"))

    def edgec(self, *args: str | Path, show: bool = True, check: bool = True) -> CliResult:
        """Run ``edgec ARGS`` as the operator would; with ``check``, a failure is a ``HarnessError``
        naming the command and its last lines."""
        self._say("$ edgec " + " ".join(shlex.quote(str(a)) for a in args))
        result = run_edgec(*args, env=self.env)
        if check and result.returncode != 0:
            detail = (result.stderr.strip() or result.stdout.strip()).splitlines()[-10:]
            raise HarnessError(f"edgec {args[0]} failed (exit {result.returncode}):\n" + "\n".join(detail))
        if show and result.stdout.strip():
            self._say("\n".join("  " + line for line in result.stdout.rstrip().splitlines()))
        return result

    def api_args(self) -> tuple[str, ...]:
        return ("--server", f"http://127.0.0.1:{self.http_port}", f"--token={self.token}")

    def api(self, path: str, timeout_s: float = 30) -> Any:
        """``GET path`` of the server's operator API, as JSON."""
        request = urllib.request.Request(f"http://127.0.0.1:{self.http_port}{path}")
        request.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(request, timeout=timeout_s) as response:
                return json.loads(response.read())
        except (OSError, ValueError) as e:
            raise HarnessError(f"the OTA server does not answer GET {path}: {e}") from e

    # -- the operator's side ----------------------------------------------------------------------
    def publish(self, *bundles: Path) -> None:
        self.edgec("publish", *bundles, *self.repo_args())

    def add_agent(
        self, device: str, profile: str = "x86-64-cpu", group: str = "g", *, tls: bool = False,
        settings: dict[str, dict[str, Any]] | None = None,
    ) -> AgentProcess:  # fmt: skip
        """Register the device (before the broker's files are written: its password goes there)
        and write its agent config as ``edgec devices add`` makes it, with its own state folder
        and HTTP port, and ``settings`` (``{section: {key: value}}``) on top."""
        config = self.root / "devices" / f"{device}.agent.toml"
        config.parent.mkdir(exist_ok=True)
        self.edgec(
            "devices", "add", device, "--profile", profile, "--group", group, "--fleet", self.fleet,
            "--broker", f"127.0.0.1:{self.broker_port}", "--repo", self.repo_dir, "--out", config,
        )  # fmt: skip
        state = self.root / "state" / device
        http_port = free_port()
        merged: dict[str, dict[str, Any]] = {"http": {"port": http_port}}
        if tls:  # the broker's TLS listener, checked against the CA edgec broker config makes
            merged["mqtt"] = {"port": self.tls_port, "ca_file": str(self.broker_dir / "ca.crt")}
        for section, values in (settings or {}).items():
            merged.setdefault(section, {}).update(values)
        text = config.read_text().replace(
            'state_dir = "/var/lib/edgec"', f"state_dir = {json.dumps(str(state))}"
        )
        config.write_text(_merge_toml_sections(text, merged))
        agent = AgentProcess(
            device, profile, config, state, http_port, self.root / "logs" / f"{device}.log", env=self.env
        )
        self.agents[device] = agent
        return agent

    def add_sim_devices(
        self, count: int, group: str, prefix: str = "sim-", profile: str = "x86-64-cpu"
    ) -> list[Any]:
        """Register ``count`` simulated devices straight in the registry (before the broker's files
        are written); their ``sim.SimDeviceConfig`` s."""
        from ota_server.registry import Registry
        from sim import SimDeviceConfig, device_ids

        registry = Registry.open(self.db)
        try:
            configs = []
            for device in device_ids(prefix, count):
                _, password = registry.add_device(device, self.fleet, group, profile)
                configs.append(
                    SimDeviceConfig(device, password, self.root / "sim" / device, self.fleet, profile)
                )
            return configs
        finally:
            registry.engine.dispose()

    def provisioning(self) -> tuple[Any, Any]:
        """What a device is provisioned with: the repository's root metadata and the director's
        public key (``ImageRepository.provisioning``)."""
        from ota_server.repository import ImageRepository

        return ImageRepository(self.repo_dir, online_keys=self.online_keys).provisioning()

    def device(self, device: str) -> dict[str, Any]:
        """One device as the server's API shows it."""
        row: dict[str, Any] = self.api(f"/v1/devices/{device}")
        return row

    def assign(self, device: str, release: str, *extra: str) -> None:
        self.edgec("fleet", "assign", device, release, *extra, *self.api_args())

    def rollout(self, release: str, *options: str) -> str:
        """``edgec rollout start RELEASE OPTIONS --json``; the rollout's id."""
        status = self.edgec(
            "rollout", "start", release, *options, "--json", *self.api_args(), show=False
        ).json()
        rollout_id: str = status["id"]
        self._say(f"  rollout {rollout_id}: {status['release']} to group {status['group']}")
        return rollout_id

    def rollout_status(self, rollout_id: str) -> dict[str, Any]:
        status: dict[str, Any] = self.api(f"/v1/rollouts/{rollout_id}")
        return status

    def steer(self, rollout_id: str, action: str) -> None:
        self.edgec("rollout", action, rollout_id, *self.api_args())

    def devices(self) -> list[dict[str, Any]]:
        devices: list[dict[str, Any]] = self.api("/v1/devices")
        return devices

    # -- services ---------------------------------------------------------------------------------
    def configure_broker(self) -> None:
        """The broker's files from the registry (every device added by now)."""
        user = pwd.getpwuid(os.getuid()).pw_name
        self.edgec(
            "broker", "config", "--out", self.broker_dir, "--port", str(self.broker_port),
            "--tls-port", str(self.tls_port), "--run-as", user,
            *(("--server-replicas", str(self.replicas)) if self.replicas > 1 else ()),
        )  # fmt: skip

    def start_broker(self) -> None:
        if self.broker == "embedded":
            configs = [agent.config for agent in self.agents.values()]
            self.embedded = EmbeddedBroker(self.broker_port, self.broker_dir, configs)
            self.embedded.start()
            return
        binary = find_mosquitto() if self.broker == "mosquitto" else self.broker
        if binary is None:
            raise HarnessError("the mosquitto binary is not installed (sudo apt-get install mosquitto)")
        argv = [binary, "-c", str(self.broker_dir / "mosquitto.conf")]
        self._say(
            f"$ {Path(binary).name} {shlex.join(argv[1:])} > {self.broker_dir / 'mosquitto.log'} 2>&1 &"
        )
        self.broker_service = start_service(
            "mosquitto", argv, self.broker_dir / "mosquitto.log", new_session=True
        )
        self.services.append(self.broker_service)
        self.broker_service.wait_for_port(self.broker_port, 10)

    def stop_broker(self) -> None:
        if self.broker_service is not None:
            self.broker_service.stop()
            self.services.remove(self.broker_service)
            self.broker_service = None

    def new_token(self, role: str = "operator", name: str = "operator") -> tuple[str, dict[str, str]]:
        """``edgec server token --json``: a new token, and its grant (name, sha256, role)."""
        grant = self.edgec("server", "token", "--role", role, "--name", name, "--json", show=False).json()
        return grant.pop("token"), grant

    def server_config(self, replica: int = 1) -> Path:
        return self.root / ("server.toml" if replica == 1 else f"server-{replica}.toml")

    def server_log(self, replica: int = 1) -> Path:
        return self.root / "logs" / ("server.log" if replica == 1 else f"server-{replica}.log")

    def write_server_config(self, grants: Sequence[dict[str, str]] = ()) -> Path:
        """server.toml for this fleet (server-N.toml for replica N), granting ``grants`` (and
        an operator token, made first unless the fleet has one); replica 1's path."""
        from ota_server.logins import server_logins

        grants = list(grants)
        if not self.token:
            self.token, grant = self.new_token()
            grants.insert(0, grant)
        self.http_port = self.http_port or free_port()
        # an older release's server (version skew) reads only the digest form
        tokens = "".join(_token_toml(grant, named=self.server_code is None) for grant in grants)
        for replica, login in enumerate(server_logins(self.replicas), start=1):
            port = self.replica_ports.setdefault(replica, self.http_port if replica == 1 else free_port())
            mqtt = f"username = {json.dumps(login)}\nclient_id = {json.dumps(login)}\n" if replica > 1 else ""
            cluster = ""  # an older release's server knows no [cluster]
            if self.replicas > 1:
                cluster = f"[cluster]\nlease_s = {self.lease_s}\n\n"
            elif self.broker == "embedded" and self.server_code is None:
                cluster = "[cluster]\nshared_subscriptions = false\n\n"  # amqtt has none
            self.server_config(replica).write_text(
                f"repo = {json.dumps(str(self.repo_dir))}\n"
                f"online_keys = {json.dumps(str(self.online_keys))}\n"
                f"db = {json.dumps(self.db)}\n"
                f"passphrase_file = {json.dumps(str(self.root / 'online-passphrase'))}\n"
                f"rollout_tick_s = {self.rollout_tick_s}\n\n"
                f"[mqtt]\nport = {self.broker_port}\n{mqtt}"
                f"password_file = {json.dumps(str(self.broker_dir / 'server.secret'))}\n\n{cluster}"
                f"[http]\nport = {port}\n\n[http.tokens]\n{tokens}"
            )
        return self.server_config()

    def start_server(self, timeout_s: float = 60.0) -> None:
        """Every replica, in turn."""
        if not self.server_config().exists():
            self.write_server_config()
        for replica in range(1, self.replicas + 1):
            self.start_replica(replica, timeout_s)

    def start_replica(self, replica: int, timeout_s: float = 60.0) -> Service:
        config, log = self.server_config(replica), self.server_log(replica)
        connected = _read(log).count("connected to the broker")  # the log is appended to
        argv = [sys.executable, "-m", "edgec", "-v", "server", "run", "--config", str(config)]
        self._say(f"$ edgec {shlex.join(argv[3:])} > {log} 2>&1 &")
        name = "the OTA server" if self.replicas == 1 else f"OTA server replica {replica}"
        service = start_service(
            name, argv, log, cwd=self.server_code or ROOT,
            env=code_env(self.server_code, self.env), new_session=True,
        )  # fmt: skip
        self.services.append(service)
        self.servers[replica] = service
        if replica == 1:
            self.server = service
        service.wait_for_port(self.replica_ports[replica], timeout_s)
        # its MQTT subscriptions: the server answers on HTTP once it has connected and subscribed
        wait_for(lambda: _read(log).count("connected to the broker") > connected, 5)
        return service

    def kill9_replica(self, replica: int) -> None:
        """``kill -9`` a server replica (its broker session and lease are left behind)."""
        service = self.servers.pop(replica)
        service.kill9()
        self.services.remove(service)
        if replica == 1:
            self.server = None

    def stop_server(self) -> None:
        for replica in sorted(self.servers, reverse=True):
            service = self.servers.pop(replica)
            service.stop()
            self.services.remove(service)
        self.server = None

    def start_agents(self, echo: bool = True) -> None:
        started = [
            (agent, agent.spawn(self._say if echo and self.echo else None)) for agent in self.agents.values()
        ]
        for agent, service in started:
            service.wait_for_port(agent.http_port)

    def up(self) -> None:
        """Broker files from the registry, the broker, the server (devices added by now)."""
        self.configure_broker()
        self.start_broker()
        self.start_server()

    def down(self) -> None:
        """Stop every agent, the server and the broker."""
        for agent in self.agents.values():
            with contextlib.suppress(Exception):
                agent.stop()
        stop_services(list(reversed(self.services)))
        self.services.clear()
        self.servers.clear()
        self.server = self.broker_service = None
        if self.embedded is not None:
            self.embedded.stop()
            self.embedded = None


def _token_toml(grant: dict[str, str], named: bool = True) -> str:
    """What grants a token under ``[http.tokens]``: a named table (sha256 and role), or the
    older line ``"<sha256>" = "role"``."""
    if not named:
        return f"{json.dumps(grant['sha256'])} = {json.dumps(grant['role'])}\n"
    return f"\n[http.tokens.{json.dumps(grant['name'])}]\nsha256 = {json.dumps(grant['sha256'])}\n" + (
        f"role = {json.dumps(grant['role'])}\n"
    )


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def _merge_toml_sections(text: str, settings: dict[str, dict[str, Any]]) -> str:
    """``text`` (a flat TOML file of sections) with ``settings`` set: keys of a section the file
    has replace its own; other sections are appended."""
    for section, values in settings.items():
        lines = "".join(f"{k} = {json.dumps(v)}\n" for k, v in values.items())
        header = f"[{section}]\n"
        if header in text:
            start = text.index(header) + len(header)
            end = text.find("\n[", start)
            end = len(text) if end < 0 else end + 1
            kept = [
                line
                for line in text[start:end].splitlines(keepends=True)
                if line.split("=")[0].strip() not in values
            ]
            text = text[:start] + lines + "".join(kept) + text[end:]
        else:
            text += f"\n{header}{lines}"
    return text
