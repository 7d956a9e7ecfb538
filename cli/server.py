"""``edgec server run|token``: the OTA server process and its operator tokens."""

from __future__ import annotations

import argparse
import hashlib
import json
import secrets
import tomllib
from pathlib import Path
from typing import Any

from cli._api import add_server_args, call
from cli._record import audit_db_arg, recorded
from edgec.errors import OptionError

__all__ = ["register"]


def register(commands: Any) -> None:
    server = commands.add_parser("server", help="run the OTA server, make operator tokens")
    sub = server.add_subparsers(dest="server_command", metavar="ACTION", required=True)
    run = sub.add_parser("run", help="serve fetches and HTTP, record device reports (until Ctrl-C)")
    run.add_argument("--config", type=Path, required=True, help="server.toml")
    run.set_defaults(run=run_server)
    token = sub.add_parser("token", help="a new operator API token and the line that grants it")
    token.add_argument("--role", choices=["viewer", "operator", "admin"], required=True)
    token.add_argument(
        "--name", default="", help="who holds it (the audit log names it); default: its digest"
    )
    token.add_argument("--json", action="store_true", help="print JSON: token, name, sha256, role")
    audit_db_arg(token)
    token.set_defaults(run=run_token)
    replicas = sub.add_parser(
        "replicas", help="the server replicas sharing the registry, and the scheduler's"
    )
    add_server_args(replicas, required=True)
    replicas.add_argument("--json", action="store_true", help="print JSON")
    replicas.set_defaults(run=run_replicas)


def run_server(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from ota_server.server import OtaServer, ServerConfig

    try:
        config = ServerConfig.model_validate(tomllib.loads(args.config.read_text(encoding="utf-8")))
    except OSError as e:
        raise OptionError(f"cannot read {args.config}: {e.strerror}") from e
    except (tomllib.TOMLDecodeError, ValidationError) as e:
        raise OptionError(f"{args.config} is not a valid server config: {str(e).splitlines()[0]}") from e
    server = OtaServer(config)
    print(
        f"edgec server: repository {config.repo}, database {config.db}, broker "
        f"{config.mqtt.host}:{config.mqtt.port}, HTTP {config.http.host}:{config.http.port}",
        flush=True,
    )
    server.run_forever()
    return 0


def run_token(args: argparse.Namespace) -> int:
    from edgec.names import check_name

    token = secrets.token_urlsafe(32)
    while token.startswith("-"):  # "--token -x..." reads as an option to every command line
        token = secrets.token_urlsafe(32)
    digest = hashlib.sha256(token.encode()).hexdigest()
    name = check_name(args.name, "token name") if args.name else ""
    params = {"name": name or digest[:12], "role": args.role, "sha256_prefix": digest[:12]}
    with recorded(args.db, "token.create", params):
        pass  # made here; it grants nothing until server.toml lists it
    if args.json:
        print(json.dumps({"token": token, "name": name or digest[:12], "sha256": digest, "role": args.role}))
        return 0
    print(f"token (give it to the operator; it is not stored): {token}")
    if name:
        print(
            f"add to server.toml:\n[http.tokens.{json.dumps(name) if '.' in name else name}]\n"
            f'sha256 = "{digest}"\nrole = "{args.role}"'
        )
    else:
        print(f'add to server.toml under [http.tokens]:\n"{digest}" = "{args.role}"')
    return 0


def run_replicas(args: argparse.Namespace) -> int:
    import time

    from edgec._table import render_table

    replicas = call(args, "GET", "/v1/replicas")
    if args.json:
        print(json.dumps(replicas, indent=2))
        return 0
    now = time.time()
    rows = [
        (
            r["name"],
            r["mqtt_username"],
            f"{r['host']}:{r['pid']}",
            r["started_at"],
            f"{now - r['beat_at']:.1f} s ago",
            "alive" if r["alive"] else "dead",
            "yes" if r["holds_scheduler"] else "",
        )
        for r in replicas
    ]
    print(
        render_table(
            ("replica", "broker login", "host:pid", "started", "heartbeat", "state", "scheduler"), rows
        )
    )
    return 0
