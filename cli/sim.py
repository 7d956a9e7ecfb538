"""``edgec sim fleet``: N simulated devices on one machine, for rehearsing rollouts at scale.

Each simulated device is a real MQTT client with its own credentials running the agent's
real install pipeline (director, TUF, chunked fetch, probation); only the model runtime and
the traffic are stand-ins, set per model version with ``--behaviour`` (see ``sim``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from cli.fleet import DB_ENV, DEFAULT_DB
from edgec._atomic import atomic_write
from edgec.errors import OptionError

__all__ = ["register"]

PASSWORDS = "passwords.json"

_EPILOG = """\
behaviour (per model version, "*" for every version; a version's entry overrides "*"):
  latency_ms=5          median latency of one request
  latency_spread=0.2    sigma of log(latency): p95 = latency_ms * exp(1.645 * spread)
  error_rate=0.0        share of requests that fail (probation and telemetry see them)
  requests_per_s=10     traffic per device (telemetry windows)
  drift=ok|warn|drift   or psi=0.18, or input_shift_sd=0.4 (PSI ~ shift squared)
  self_test=pass|fail   load=ok|fail   infer_sleeps=true|false
e.g. --behaviour '*:latency_ms=4' --behaviour 2.0.0:latency_ms=8,error_rate=0.02,drift=warn
A --behaviour-file (TOML or JSON) holds the same as tables: ["2.0.0"] latency_ms = 8
"""


def register(commands: Any) -> None:
    sim = commands.add_parser("sim", help="simulated devices for rehearsing rollouts at scale")
    sub = sim.add_subparsers(dest="sim_command", metavar="ACTION", required=True)
    fleet = sub.add_parser(
        "fleet",
        help="run N simulated devices until Ctrl-C (real MQTT clients and installs, stand-in runtime)",
        description=(
            "Register PREFIX0001.. in the fleet database (once: their passwords stay in the state\n"
            "folder) and run them against the broker. Each installs what the director assigns through\n"
            "the agent's real pipeline and reports state, events and synthetic telemetry windows."
        ),
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    fleet.add_argument("--devices", type=int, required=True, metavar="N", help="how many devices")
    fleet.add_argument("--group", required=True, help="their rollout group")
    fleet.add_argument(
        "--repo",
        type=Path,
        required=True,
        metavar="REPO",
        help="the image repository (its root and director key)",
    )
    fleet.add_argument(
        "--db",
        metavar="URL",
        default=os.environ.get(DB_ENV, DEFAULT_DB),
        help=f"fleet database URL (default ${DB_ENV} or {DEFAULT_DB})",
    )
    fleet.add_argument("--fleet", default="default", help="their fleet (default: default)")
    fleet.add_argument("--profile", default="x86-64-cpu", help="their device profile (default x86-64-cpu)")
    fleet.add_argument(
        "--broker",
        default="127.0.0.1:1883",
        metavar="HOST:PORT",
        help="broker HOST:PORT (default 127.0.0.1:1883)",
    )
    fleet.add_argument("--prefix", default="sim-", help="device id prefix (default sim-: sim-0001, ...)")
    fleet.add_argument(
        "--behaviour",
        action="append",
        default=[],
        metavar="VERSION:FIELD=VALUE,...",
        help="how the stand-in runtime behaves with a model version (repeatable; see below)",
    )
    fleet.add_argument(
        "--behaviour-file", type=Path, metavar="FILE", help="behaviours per version (TOML or JSON)"
    )
    fleet.add_argument(
        "--window-s", type=float, default=5.0, metavar="S", help="telemetry window (default 5 s)"
    )
    fleet.add_argument(
        "--probation-s", type=float, default=1.0, metavar="S", help="probation of a new model (default 1 s)"
    )
    fleet.add_argument(
        "--install-workers",
        type=int,
        default=16,
        metavar="N",
        help="installs at once; the rest queue (default 16)",
    )
    fleet.add_argument(
        "--state",
        type=Path,
        default=Path("edgec-sim"),
        metavar="DIR",
        help="state folder (default ./edgec-sim)",
    )
    fleet.add_argument("--duration", type=float, metavar="S", help="stop after S seconds (default: Ctrl-C)")
    fleet.add_argument(
        "--progress-s", type=float, default=5.0, metavar="S", help="progress line every S s (default 5)"
    )
    fleet.set_defaults(run=run_fleet)


def _check(args: argparse.Namespace) -> tuple[str, int]:
    if args.devices < 1:
        raise OptionError(f"--devices must be at least 1, not {args.devices}")
    for name in ("window_s", "progress_s"):
        if getattr(args, name) <= 0:
            raise OptionError(f"--{name.replace('_', '-')} must be positive")
    if args.probation_s < 0 or args.install_workers < 1:
        raise OptionError("--probation-s must be >= 0 and --install-workers >= 1")
    if args.duration is not None and args.duration <= 0:
        raise OptionError("--duration must be positive")
    host, _, port = args.broker.rpartition(":")
    if not host or not port.isdigit():
        raise OptionError(f"bad --broker {args.broker!r}: expected HOST:PORT")
    return host, int(port)


def _read_passwords(path: Path) -> dict[str, str]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        raise OptionError(f"cannot read the simulated devices' passwords {path}: {e}") from e
    if not isinstance(data, dict):
        raise OptionError(f"{path} is not a JSON object of device passwords")
    return {str(k): str(v) for k, v in data.items()}


def _write_passwords(path: Path, passwords: dict[str, str]) -> None:
    """Atomically, mode 0600 (they are the devices' MQTT credentials)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps(passwords, indent=1, sort_keys=True).encode(), mode=0o600)


def _credentials(args: argparse.Namespace, ids: list[str], profile: str) -> tuple[dict[str, str], list[str]]:
    """Every device's password: registered before (kept in the state folder) or now."""
    from ota_server.registry import Registry

    path = args.state / PASSWORDS
    passwords = _read_passwords(path)
    registry = Registry.open(args.db)
    try:
        known = {d.id: d for d in registry.devices()}
        for device_id in ids:
            device = known.get(device_id)
            if device is None:
                continue
            if (device.fleet, device.group, device.profile) != (args.fleet, args.group, profile):
                raise OptionError(
                    f"{device_id} is already registered in fleet {device.fleet}, group {device.group}, "
                    f"profile {device.profile}: pass another --prefix"
                )
            if device_id not in passwords:
                raise OptionError(
                    f"{device_id} is in the registry but its password is not in {path}: "
                    "pass another --prefix or the --state folder it was registered with"
                )
        added: list[str] = []
        try:
            for device_id in ids:
                if device_id not in known:
                    _, passwords[device_id] = registry.add_device(device_id, args.fleet, args.group, profile)
                    added.append(device_id)
        finally:
            if added:
                _write_passwords(path, passwords)
    finally:
        registry.engine.dispose()
    return passwords, added


def run_fleet(args: argparse.Namespace) -> int:
    host, port = _check(args)
    if not args.verbose:  # a line per device and install would drown the progress lines; -v shows them
        logging.getLogger("agent.install").setLevel(logging.CRITICAL)
    from agent.config import InstallSettings, TrustSettings
    from device_profiles import load_profile
    from ota_server.repository import ImageRepository
    from sim import SimBehaviours, SimDeviceConfig, SimFleet, SimSettings, device_ids

    profile = load_profile(args.profile).id
    behaviours = SimBehaviours.load(args.behaviour_file) if args.behaviour_file else None
    behaviours = SimBehaviours.parse(args.behaviour, behaviours)
    root, director_key = ImageRepository(args.repo).provisioning()
    ids = device_ids(args.prefix, args.devices)
    passwords, added = _credentials(args, ids, profile)
    configs = [SimDeviceConfig(d, passwords[d], args.state / "devices" / d, args.fleet, profile) for d in ids]
    print(
        f"edgec sim: {len(ids)} devices {ids[0]}..{ids[-1]} (fleet {args.fleet}, group {args.group}, "
        f"{profile}), broker {host}:{port}, state {args.state}",
        flush=True,
    )
    if added:
        print(
            f"registered {len(added)} new devices; their passwords are in {args.state / PASSWORDS} (0600).\n"
            "The broker does not know them yet: regenerate its password file and ACL with\n"
            f"  edgec broker config --out BROKER_DIR --db {args.db}\n"
            "and reload Mosquitto (kill -HUP <its pid>). edgec broker config also makes a new server "
            "password: restart edgec server run after it.",
            flush=True,
        )
    for line in behaviours.describe():
        print(f"  behaviour {line}")
    settings = SimSettings(
        host=host,
        port=port,
        window_s=args.window_s,
        install_workers=args.install_workers,
        install=InstallSettings(probation_s=args.probation_s, probation_min_requests=5, warmup_runs=1),
    )
    fleet = SimFleet(
        configs,
        trust=TrustSettings(root=root, director_key=director_key),
        behaviours=behaviours,
        settings=settings,
    )
    started = time.monotonic()
    fleet.start()
    try:
        while True:
            left = None if args.duration is None else args.duration - (time.monotonic() - started)
            if left is not None and left <= 0:
                break
            time.sleep(args.progress_s if left is None else min(args.progress_s, left))
            print(f"{time.strftime('%H:%M:%S')} {fleet.summary().line()}", flush=True)
    except KeyboardInterrupt:
        print("stopping the simulated devices", flush=True)
    finally:
        fleet.stop()
    print(f"stopped after {time.monotonic() - started:.0f} s: {fleet.summary().line()}")
    return 0
