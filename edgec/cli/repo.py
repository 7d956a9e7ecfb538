"""``edgec keys init``, ``edgec publish``, ``edgec repo ls|refresh``: the signed image repository."""

from __future__ import annotations

import argparse
import getpass
import json
import os
import sys
from pathlib import Path
from typing import Any

from edgec._table import render_table
from edgec.errors import OptionError

__all__ = ["register"]

PASSPHRASE_ENV = "EDGEC_KEY_PASSPHRASE"


def _repo_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--repo", type=Path, required=True, help="the repository folder")
    parser.add_argument(
        "--passphrase-file", type=Path, help=f"read the key passphrase here (else ${PASSPHRASE_ENV})"
    )


def register(commands: Any) -> None:
    keys = commands.add_parser("keys", help="create the repository's signing keys")
    keys_sub = keys.add_subparsers(dest="keys_command", metavar="ACTION", required=True)
    init = keys_sub.add_parser("init", help="new Ed25519 keys for every role and the first signed metadata")
    _repo_arg(init)
    init.add_argument(
        "--threshold",
        action="append",
        default=[],
        metavar="ROLE=N",
        help="signatures a role needs, e.g. root=2 (default 1 each)",
    )
    init.set_defaults(run=run_init)
    rotate = keys_sub.add_parser(
        "rotate", help="replace a role's keys (a new root signed by old and new keys)"
    )
    rotate.add_argument("role", choices=["root", "targets", "snapshot", "timestamp"])
    _repo_arg(rotate)
    rotate.set_defaults(run=run_rotate)
    revoke = keys_sub.add_parser("revoke", help="remove one key from a role (it must keep its threshold)")
    revoke.add_argument("role", choices=["root", "targets", "snapshot", "timestamp"])
    revoke.add_argument("keyid", help="the key id (see the role's keys in root.json)")
    _repo_arg(revoke)
    revoke.set_defaults(run=run_revoke)

    publish = commands.add_parser("publish", help="sign bundles into the repository as targets")
    publish.add_argument("bundles", type=Path, nargs="+", metavar="BUNDLE")
    _repo_arg(publish)
    publish.set_defaults(run=run_publish)

    repo = commands.add_parser("repo", help="list releases, re-sign snapshot and timestamp")
    repo_sub = repo.add_subparsers(dest="repo_command", metavar="ACTION", required=True)
    ls = repo_sub.add_parser("ls", help="the published releases")
    ls.add_argument("--repo", type=Path, required=True, help="the repository folder")
    ls.add_argument("--json", action="store_true", help="print JSON")
    ls.set_defaults(run=run_ls)
    refresh = repo_sub.add_parser("refresh", help="re-sign snapshot and timestamp before they expire")
    _repo_arg(refresh)
    refresh.set_defaults(run=run_refresh)


def _passphrase(args: argparse.Namespace, confirm: bool = False) -> bytes:
    if args.passphrase_file:
        try:
            return args.passphrase_file.read_bytes().rstrip(b"\r\n")
        except OSError as e:
            raise OptionError(f"cannot read --passphrase-file {args.passphrase_file}: {e.strerror}") from e
    if os.environ.get(PASSPHRASE_ENV):
        return os.environ[PASSPHRASE_ENV].encode()
    if not sys.stdin.isatty():
        raise OptionError(f"no key passphrase: set ${PASSPHRASE_ENV} or pass --passphrase-file FILE")
    first = getpass.getpass("key passphrase: ").encode()
    if confirm and getpass.getpass("again: ").encode() != first:
        raise OptionError("the passphrases differ")
    return first


def _thresholds(specs: list[str]) -> dict[str, int]:
    from ota_server.repository import ROLES

    found = {}
    for spec in specs:
        role, _, count = spec.partition("=")
        if role not in ROLES or not count.isdigit() or int(count) < 1:
            raise OptionError(
                f"bad --threshold {spec!r}: expected ROLE=N with ROLE one of {', '.join(ROLES)}"
            )
        found[role] = int(count)
    return found


def run_init(args: argparse.Namespace) -> int:
    from ota_server.repository import ImageRepository

    thresholds = _thresholds(args.threshold)
    repo = ImageRepository.init(args.repo, _passphrase(args, confirm=True), thresholds)
    print(f"initialised {repo.folder}: keys in {repo.keys_dir} (encrypted, 0600)")
    print("move the root and targets keys offline; snapshot and timestamp keys stay online")
    return 0


def run_rotate(args: argparse.Namespace) -> int:
    from ota_server.repository import ImageRepository

    version = ImageRepository(args.repo).rotate(args.role, _passphrase(args))
    print(f"rotated the {args.role} keys of {args.repo}; root is now version {version}")
    return 0


def run_revoke(args: argparse.Namespace) -> int:
    from ota_server.repository import ImageRepository

    version = ImageRepository(args.repo).revoke(args.role, args.keyid, _passphrase(args))
    print(f"revoked {args.role} key {args.keyid[:12]}... of {args.repo}; root is now version {version}")
    return 0


def run_publish(args: argparse.Namespace) -> int:
    from ota_server.repository import ImageRepository

    added = ImageRepository(args.repo).publish(args.bundles, _passphrase(args))
    print(f"published {len(added)} target(s) from {len(args.bundles)} bundle(s) to {args.repo}")
    return 0


def run_ls(args: argparse.Namespace) -> int:
    from ota_server.repository import ImageRepository

    releases = ImageRepository(args.repo).releases()
    if args.json:
        print(json.dumps([r.__dict__ for r in releases], indent=2))
        return 0
    rows = [(r.name, r.version, r.profile, r.format, r.precision, r.files, f"{r.bytes:,}") for r in releases]
    print(
        render_table(
            ("name", "version", "profile", "format", "precision", "files", "bytes"), rows, right=(5, 6)
        )
    )
    return 0


def run_refresh(args: argparse.Namespace) -> int:
    from ota_server.repository import ImageRepository

    ImageRepository(args.repo).refresh(_passphrase(args))
    print(f"re-signed snapshot and timestamp of {args.repo}")
    return 0
