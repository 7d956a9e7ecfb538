"""``edgec audit ls|verify``: the log of operator actions in the fleet database.

``verify`` walks the hash chain and prints the newest row as ``ID:HASH``; keeping that line
somewhere the database's administrators cannot write, and passing it back later with
``--anchor``, is what shows that history was not rewritten (``ota_server.audit`` says why).
A broken chain is an ``AuditTamperedError``, a ``TrustError``: exit 3, the row named.
"""

from __future__ import annotations

import argparse
import json
import os
import re
from typing import Any

from cli.fleet import DB_ENV, DEFAULT_DB
from edgec._table import render_table
from edgec.errors import OptionError

__all__ = ["register"]

_ANCHOR = re.compile(r"([1-9][0-9]{0,18}):([0-9a-f]{64})")
PARAMS_SHOWN = 60  # characters of an entry's parameters in the table


def register(commands: Any) -> None:
    audit = commands.add_parser("audit", help="the audit log of operator actions: list it, verify its chain")
    sub = audit.add_subparsers(dest="audit_command", metavar="ACTION", required=True)
    ls = sub.add_parser("ls", help="the newest entries, oldest first, a line each")
    ls.add_argument(
        "--limit", type=int, default=50, help="how many of the newest entries (1-1000, default 50)"
    )
    ls.add_argument("--action", help="only this action (device.assign, rollout.start, release.publish...)")
    ls.add_argument("--json", action="store_true", help="print JSON")
    _db_arg(ls)
    ls.set_defaults(run=run_ls)
    verify = sub.add_parser(
        "verify", help="check the hash chain; print the entry count and the head (ID:HASH) to keep elsewhere"
    )
    verify.add_argument(
        "--anchor",
        metavar="ID:HASH",
        help="a head an earlier verify printed, kept outside the database: that row must still have it",
    )
    _db_arg(verify)
    verify.set_defaults(run=run_verify)


def _db_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--db",
        default=os.environ.get(DB_ENV, DEFAULT_DB),
        help=f"fleet database URL (default ${DB_ENV} or {DEFAULT_DB}); PostgreSQL: postgresql+psycopg://...",
    )


def _anchor(value: str | None) -> tuple[int, str] | None:
    if value is None:
        return None
    match = _ANCHOR.fullmatch(value.strip().lower())
    if match is None:
        raise OptionError(f"bad --anchor {value[:80]!r}: expected ID:HASH as edgec audit verify prints it")
    return int(match[1]), match[2]


def run_ls(args: argparse.Namespace) -> int:
    from ota_server.audit import AuditLog
    from ota_server.registry import Registry

    if not 1 <= args.limit <= 1000:
        raise OptionError(f"--limit must be 1-1000, got {args.limit}")
    if args.action is not None and len(args.action) > 64:
        raise OptionError("--action is at most 64 characters (device.assign, rollout.start...)")
    entries = AuditLog(Registry.open(args.db)).entries(limit=args.limit, action=args.action, newest=True)
    if args.json:
        print(json.dumps([e.as_dict() for e in entries], indent=2))
        return 0
    rows = [
        (
            e.id,
            e.at,
            e.actor,
            e.role,
            e.via,
            e.action,
            e.outcome,
            e.params if len(e.params) <= PARAMS_SHOWN else e.params[: PARAMS_SHOWN - 1] + "…",
        )
        for e in entries
    ]
    print(render_table(("id", "at", "actor", "role", "via", "action", "outcome", "params"), rows, right=(0,)))
    return 0


def run_verify(args: argparse.Namespace) -> int:
    from ota_server.audit import AuditLog
    from ota_server.registry import Registry

    anchor = _anchor(args.anchor)
    report = AuditLog(Registry.open(args.db)).verify(anchor=anchor)
    report.raise_if_tampered()
    checked = f"; row {anchor[0]} matches the anchor" if anchor else ""
    print(f"audit log ok: {report.count} entries{checked}")
    print(f"head {report.anchor}")
    print(
        "keep the head outside the database; check against it later with: edgec audit verify --anchor ID:HASH"
    )
    return 0
