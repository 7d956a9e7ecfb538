"""``edgec devices add`` and ``edgec fleet ls|show``: the fleet registry."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from cli._api import add_server_args, call
from cli._record import recorded
from edgec._table import render_table
from edgec.errors import OptionError
from edgec.names import check_name, parse_release

__all__ = ["register"]

DB_ENV = "EDGEC_DB"
DEFAULT_DB = "sqlite:///edgec-fleet.db"


def _db_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--db",
        default=os.environ.get(DB_ENV, DEFAULT_DB),
        help=f"fleet database URL (default ${DB_ENV} or {DEFAULT_DB}); PostgreSQL: postgresql+psycopg://...",
    )


def register(commands: Any) -> None:
    devices = commands.add_parser("devices", help="register devices and their credentials")
    sub = devices.add_subparsers(dest="devices_command", metavar="ACTION", required=True)
    add = sub.add_parser("add", help="create a device, its MQTT credentials and its agent config file")
    add.add_argument("device", help="the device id (its MQTT user name)")
    add.add_argument("--profile", required=True, help="its device profile")
    add.add_argument("--group", required=True, help="its rollout group")
    add.add_argument("--fleet", default="default", help="its fleet (default: default)")
    add.add_argument("--broker", default="127.0.0.1:1883", help="broker HOST:PORT the agent connects to")
    add.add_argument("--out", type=Path, help="agent config file to write (default: DEVICE.agent.toml)")
    add.add_argument(
        "--repo",
        type=Path,
        help="the image repository: its root and the director's key go into the agent config",
    )
    _db_arg(add)
    add.set_defaults(run=run_add)
    remove = sub.add_parser("remove", help="delete a device and its telemetry (then rerun broker config)")
    remove.add_argument("device", help="the device id")
    _db_arg(remove)
    remove.set_defaults(run=run_remove)

    broker = commands.add_parser("broker", help="Mosquitto or EMQX configuration from the registry")
    broker_sub = broker.add_subparsers(dest="broker_command", metavar="ACTION", required=True)
    config = broker_sub.add_parser(
        "config",
        help="write mosquitto.conf, passwords, ACL and TLS files (--kind emqx: EMQX reading the registry)",
    )
    config.add_argument("--out", type=Path, required=True, help="folder for the broker's files")
    config.add_argument(
        "--kind",
        choices=["mosquitto", "emqx"],
        default="mosquitto",
        help="mosquitto (files from the registry) or emqx (a cluster asking the PostgreSQL registry)",
    )
    config.add_argument(
        "--emqx-db",
        metavar="URL",
        help="--kind emqx: the PostgreSQL URL EMQX connects with, a read-only role (default: --db)",
    )
    config.add_argument("--port", type=int, default=1883, help="plain MQTT port (default 1883)")
    config.add_argument("--tls-port", type=int, default=8883, help="MQTT over TLS port (default 8883)")
    config.add_argument("--bind", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    config.add_argument("--host", action="append", default=[], help="name or IP in the TLS certificate")
    config.add_argument("--run-as", default="mosquitto", help="user Mosquitto drops to (default mosquitto)")
    config.add_argument(
        "--server-replicas",
        type=int,
        default=1,
        help="server processes sharing the registry: logins edgec-server, edgec-server-2, ... (default 1)",
    )
    _db_arg(config)
    config.set_defaults(run=run_broker_config)

    fleet = commands.add_parser("fleet", help="list and show devices")
    fleet_sub = fleet.add_subparsers(dest="fleet_command", metavar="ACTION", required=True)
    ls = fleet_sub.add_parser("ls", help="every device, a line each")
    ls.add_argument("--group", help="only this group")
    ls.add_argument("--fleet", help="only this fleet")
    ls.add_argument("--json", action="store_true", help="print JSON")
    _source_args(ls)
    ls.set_defaults(run=run_ls)
    show = fleet_sub.add_parser("show", help="one device in full")
    show.add_argument("device")
    show.add_argument("--json", action="store_true", help="print JSON")
    _source_args(show)
    show.set_defaults(run=run_show)
    assign = fleet_sub.add_parser(
        "assign", help="tell one device to run a release (a signed director document, via the server)"
    )
    assign.add_argument("device")
    assign.add_argument("release", metavar="NAME:VERSION")
    assign.add_argument(
        "--rollback", action="store_true", help="mark it a rollback to an older release (an operator's undo)"
    )
    add_server_args(assign, required=True)
    assign.set_defaults(run=run_assign)


def _source_args(parser: argparse.ArgumentParser) -> None:
    """Read through the server's API (--server) or straight from the database (--db)."""
    _db_arg(parser)
    add_server_args(parser)


def _agent_config(device: Any, password: str, broker: str, trust: tuple[str, str] | None) -> str:
    host, _, port = broker.rpartition(":")
    if not host or not port.isdigit():
        raise OptionError(f"bad --broker {broker!r}: expected HOST:PORT")
    text = (
        "# edgec agent configuration: copy to the device (it holds the device's password)\n"
        f'device = "{device.id}"\nfleet = "{device.fleet}"\nprofile = "{device.profile}"\n'
        f'state_dir = "/var/lib/edgec"\n\n[mqtt]\nhost = "{host}"\nport = {int(port)}\n'
        f'username = "{device.id}"\npassword = "{password}"\n'
    )
    if trust is not None:
        root, director_key = trust
        text += (
            f"\n[trust]\nroot = '''\n{root.strip()}\n'''\ndirector_key = '''\n{director_key.strip()}\n'''\n"
        )
    return text


def run_add(args: argparse.Namespace) -> int:
    from device_profiles import load_profile
    from ota_server.registry import Registry

    check_name(args.device, "device id")  # it names the config file and goes into it, the topics, the ACL
    check_name(args.group, "--group")
    check_name(args.fleet, "--fleet")
    profile = load_profile(args.profile)
    out = args.out or Path(f"{args.device}.agent.toml")
    if out.exists():
        raise OptionError(f"{out} already exists; pass another --out")
    trust = None
    if args.repo is not None:
        from ota_server.repository import ImageRepository

        trust = ImageRepository(args.repo).provisioning()
    registry = Registry.open(args.db)
    params = {"device": args.device, "fleet": args.fleet, "group": args.group, "profile": profile.id}
    with recorded(args.db, "device.add", params):
        device, password = registry.add_device(args.device, args.fleet, args.group, profile.id)
    text = _agent_config(device, password, args.broker, trust)
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    print(f"added {device.id} ({profile.id}, group {device.group}); agent config: {out} (0600)")
    return 0


def run_remove(args: argparse.Namespace) -> int:
    from ota_server.registry import Registry

    check_name(args.device, "device id")
    with recorded(args.db, "device.remove", {"device": args.device}):
        device = Registry.open(args.db).remove_device(args.device)
    print(
        f"removed {device.id} ({device.profile}, group {device.group}); run edgec broker config again "
        "so that its broker login is gone"
    )
    return 0


def _devices(args: argparse.Namespace) -> list[dict[str, Any]]:
    if args.server:
        devices: list[dict[str, Any]] = call(args, "GET", "/v1/devices")
        return [d for d in devices if args.fleet in (None, d["fleet"]) and args.group in (None, d["group"])]
    from ota_server.registry import Registry

    return [d.as_dict() for d in Registry.open(args.db).devices(fleet=args.fleet, group=args.group)]


def _figure(telemetry: dict[str, Any] | None, key: str) -> str:
    value = (telemetry or {}).get(key)
    return "-" if value is None else f"{value:.2f}" if isinstance(value, float) else str(value)


def run_ls(args: argparse.Namespace) -> int:
    devices = _devices(args)
    if args.json:
        print(json.dumps(devices, indent=2))
        return 0
    rows = [
        (
            d["id"],
            d["group"],
            d["profile"],
            d["status"],
            d["installed_release"] or "-",
            d["desired_release"] or "-",
            _figure(d["telemetry"], "p50_ms"),
            _figure(d["telemetry"], "p95_ms"),
            _figure(d["telemetry"], "drift"),
            d["last_seen"] or "never",
        )
        for d in devices
    ]
    headers = (
        "device",
        "group",
        "profile",
        "status",
        "installed",
        "desired",
        "p50 ms",
        "p95 ms",
        "drift",
        "last seen",
    )
    print(render_table(headers, rows))
    return 0


def run_show(args: argparse.Namespace) -> int:
    check_name(args.device, "device id")  # a path segment of the API's URL
    if args.server:
        device: dict[str, Any] = call(args, "GET", f"/v1/devices/{args.device}")
    else:
        from ota_server.registry import Registry

        device = Registry.open(args.db).get(args.device).as_dict()
    if args.json:
        print(json.dumps(device, indent=2))
        return 0
    for key, value in device.items():
        print(f"{key:18} {value if value is not None else '-'}")
    return 0


def run_assign(args: argparse.Namespace) -> int:
    check_name(args.device, "device id")
    parse_release(args.release)
    action = "rollback" if args.rollback else "install"
    document = call(
        args, "POST", f"/v1/devices/{args.device}/assign", {"release": args.release, "action": action}
    )
    signed = document["signed"]
    print(f"{args.device}: {action} {args.release} (director document {signed['version']})")
    return 0


def run_broker_config(args: argparse.Namespace) -> int:
    from ota_server.broker import write_broker_config
    from ota_server.registry import Registry

    if args.kind == "emqx":
        return _emqx_config(args)
    if args.emqx_db:
        raise OptionError("--emqx-db is for --kind emqx: Mosquitto reads files, not the database")
    files = write_broker_config(
        Registry.open(args.db),
        args.out,
        port=args.port,
        tls_port=args.tls_port,
        bind=args.bind,
        hosts=args.host or None,
        run_as=args.run_as,
        server_replicas=args.server_replicas,
    )
    print(f"wrote {files.config}; the server's MQTT password is in {files.config.parent / 'server.secret'}")
    print(f"devices verify the broker with {files.ca_cert}; start it with: mosquitto -c {files.config}")
    return 0


def _emqx_config(args: argparse.Namespace) -> int:
    from ota_server.broker_emqx import write_emqx_config
    from ota_server.registry import Registry

    files = write_emqx_config(
        Registry.open(args.db),
        args.out,
        port=args.port,
        tls_port=args.tls_port,
        bind=args.bind,
        hosts=args.host or None,
        server_replicas=args.server_replicas,
        db_url=args.emqx_db,
    )
    print(f"wrote {files.config}; the server's MQTT password is in {files.config.parent / 'server.secret'}")
    print(f"append it to etc/emqx.conf on every EMQX node, with {args.out} at the same path on each;")
    print(f"devices verify the broker with {files.ca_cert}; EMQX reads devices from the registry at CONNECT")
    return 0
