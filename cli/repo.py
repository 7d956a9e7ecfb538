"""``edgec keys init|rotate|revoke|migrate``, ``edgec publish``, ``edgec repo ls|refresh|cdn-config``:
the signed image repository.

Three folders: ``--repo`` (what the server serves: metadata and targets), ``--keys`` (the
offline root and targets keys, the operator's; default under the user's config dir) and
``--online-keys`` (the snapshot, timestamp and director keys, the server's; default
``<REPO>-online-keys``). Each command reads only the keys it signs with.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cli._record import audit_db_arg, recorded
from edgec._table import render_table
from edgec.errors import OptionError

if TYPE_CHECKING:
    from ota_server.repository import ImageRepository

__all__ = ["register"]

PASSPHRASE_ENV = "EDGEC_KEY_PASSPHRASE"
ONLINE_PASSPHRASE_ENV = "EDGEC_ONLINE_KEY_PASSPHRASE"
ROLES = ["root", "targets", "snapshot", "timestamp"]


def _repo_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--repo", type=Path, required=True, help="the repository folder (served)")


def _online_args(parser: argparse.ArgumentParser, passphrase: bool = True) -> None:
    parser.add_argument(
        "--online-keys",
        type=Path,
        metavar="DIR",
        help="the online keys: snapshot, timestamp, director (default: REPO-online-keys, beside REPO)",
    )
    if passphrase:
        parser.add_argument(
            "--online-passphrase-file",
            type=Path,
            metavar="FILE",
            help=f"the online keys' passphrase (else ${ONLINE_PASSPHRASE_ENV}, else the offline one)",
        )


def _offline_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--keys",
        type=Path,
        metavar="DIR",
        help="the offline keys: root, targets (default: $XDG_CONFIG_HOME/edgec/keys or ~/.config/edgec/keys)",
    )
    parser.add_argument(
        "--passphrase-file",
        type=Path,
        metavar="FILE",
        help=f"the offline keys' passphrase (else ${PASSPHRASE_ENV}, else a prompt)",
    )


def register(commands: Any) -> None:
    keys = commands.add_parser("keys", help="create, rotate and revoke the repository's signing keys")
    keys_sub = keys.add_subparsers(dest="keys_command", metavar="ACTION", required=True)
    init = keys_sub.add_parser(
        "init", help="new Ed25519 keys (root and targets offline, the rest online) and signed metadata"
    )
    _repo_arg(init)
    _offline_args(init)
    _online_args(init)
    init.add_argument(
        "--threshold",
        action="append",
        default=[],
        metavar="ROLE=N",
        help="signatures a role needs, e.g. root=2 (default 1 each)",
    )
    init.set_defaults(run=run_init)
    rotate = keys_sub.add_parser(
        "rotate", help="replace a role's keys (a new root signed by the offline root keys)"
    )
    rotate.add_argument("role", choices=ROLES)
    _repo_arg(rotate)
    _offline_args(rotate)
    _online_args(rotate)
    audit_db_arg(rotate)
    rotate.set_defaults(run=run_rotate)
    revoke = keys_sub.add_parser("revoke", help="remove one key from a role (it must keep its threshold)")
    revoke.add_argument("role", choices=ROLES)
    revoke.add_argument("keyid", help="the key id (see the role's keys in root.json)")
    _repo_arg(revoke)
    _offline_args(revoke)
    _online_args(revoke, passphrase=False)
    audit_db_arg(revoke)
    revoke.set_defaults(run=run_revoke)
    migrate = keys_sub.add_parser(
        "migrate", help="move the keys of an old repository (REPO/keys) offline and to the online folder"
    )
    _repo_arg(migrate)
    _offline_args(migrate)
    _online_args(migrate)
    migrate.set_defaults(run=run_migrate)

    publish = commands.add_parser(
        "publish", help="sign bundles into the repository as targets (needs the offline targets key)"
    )
    publish.add_argument("bundles", type=Path, nargs="+", metavar="BUNDLE")
    _repo_arg(publish)
    _offline_args(publish)
    _online_args(publish)
    audit_db_arg(publish)
    publish.set_defaults(run=run_publish)

    repo = commands.add_parser("repo", help="list releases, re-sign snapshot and timestamp, CDN config")
    repo_sub = repo.add_subparsers(dest="repo_command", metavar="ACTION", required=True)
    ls = repo_sub.add_parser("ls", help="the published releases")
    _repo_arg(ls)
    ls.add_argument("--json", action="store_true", help="print JSON")
    ls.set_defaults(run=run_ls)
    refresh = repo_sub.add_parser(
        "refresh", help="re-sign snapshot and timestamp before they expire (online keys only)"
    )
    _repo_arg(refresh)
    _online_args(refresh)
    refresh.add_argument(
        "--passphrase-file", type=Path, metavar="FILE", help=f"(as for publish; else ${PASSPHRASE_ENV})"
    )
    refresh.set_defaults(run=run_refresh)
    cdn = repo_sub.add_parser(
        "cdn-config", help="a web server config serving only metadata/ and targets/ (nginx, a CDN's origin)"
    )
    _repo_arg(cdn)
    cdn.add_argument("--kind", choices=["nginx"], default="nginx", help="the web server (default nginx)")
    cdn.add_argument("--port", type=int, required=True, help="the port it listens on")
    cdn.add_argument("--listen", default="127.0.0.1", metavar="ADDR", help="the address (default 127.0.0.1)")
    cdn.add_argument(
        "--prefix",
        default="/v1/repo/",
        help="the URL path devices' install.http_url ends in (default /v1/repo/)",
    )
    cdn.add_argument(
        "--run-dir",
        type=Path,
        metavar="DIR",
        help="pid, logs, temp files; created (default: REPO-nginx, beside REPO)",
    )
    cdn.add_argument("--user", help="the workers' user when nginx starts as root")
    cdn.add_argument(
        "--server-block", action="store_true", help="only the server { } block, for /etc/nginx/conf.d"
    )
    cdn.add_argument("--out", type=Path, metavar="FILE", help="write it here (default: stdout)")
    cdn.set_defaults(run=run_cdn_config)


def _read_file(flag: str, path: Path) -> bytes:
    try:
        return path.read_bytes().rstrip(b"\r\n")
    except OSError as e:
        raise OptionError(f"cannot read {flag} {path}: {e.strerror}") from e


def _prompt(what: str, confirm: bool) -> bytes:
    first = getpass.getpass(f"passphrase of the {what}: ").encode()
    if confirm and getpass.getpass("again: ").encode() != first:
        raise OptionError("the passphrases differ")
    return first


def _passphrase(args: argparse.Namespace, confirm: bool = False) -> bytes:
    """The offline keys' passphrase."""
    if getattr(args, "passphrase_file", None):
        return _read_file("--passphrase-file", args.passphrase_file)
    if os.environ.get(PASSPHRASE_ENV):
        return os.environ[PASSPHRASE_ENV].encode()
    if not sys.stdin.isatty():
        raise OptionError(f"no key passphrase: set ${PASSPHRASE_ENV} or pass --passphrase-file FILE")
    return _prompt("offline keys", confirm)


def _online_passphrase(
    args: argparse.Namespace, offline: bytes | None = None, confirm: bool = False
) -> bytes:
    """The online keys' passphrase; unless given apart, the offline one (``offline`` if the
    caller has read it already)."""
    if args.online_passphrase_file:
        return _read_file("--online-passphrase-file", args.online_passphrase_file)
    if os.environ.get(ONLINE_PASSPHRASE_ENV):
        return os.environ[ONLINE_PASSPHRASE_ENV].encode()
    given = getattr(args, "passphrase_file", None) or os.environ.get(PASSPHRASE_ENV)
    if sys.stdin.isatty() and not given:
        typed = _prompt("online keys (Enter: the same as the offline keys)", confirm)
        if typed:
            return typed
    if offline is not None:
        return offline
    try:
        return _passphrase(args)
    except OptionError as e:
        raise OptionError(
            f"no online key passphrase: set ${ONLINE_PASSPHRASE_ENV} (or ${PASSPHRASE_ENV}) "
            "or pass --online-passphrase-file FILE"
        ) from e


def _thresholds(specs: list[str]) -> dict[str, int]:
    found = {}
    for spec in specs:
        role, _, count = spec.partition("=")
        if role not in ROLES or not count.isdigit() or int(count) < 1:
            raise OptionError(
                f"bad --threshold {spec!r}: expected ROLE=N with ROLE one of {', '.join(ROLES)}"
            )
        found[role] = int(count)
    return found


def _repository(args: argparse.Namespace) -> ImageRepository:
    from ota_server.keys import default_offline_folder
    from ota_server.repository import ImageRepository

    keys = getattr(args, "keys", None)
    offline = keys if keys is not None else default_offline_folder()
    return ImageRepository(args.repo, keys=offline, online_keys=getattr(args, "online_keys", None))


def run_init(args: argparse.Namespace) -> int:
    from ota_server.keys import default_offline_folder
    from ota_server.repository import ImageRepository

    thresholds = _thresholds(args.threshold)
    keys = args.keys if args.keys is not None else default_offline_folder()
    passphrase = _passphrase(args, confirm=True)
    repo = ImageRepository.init(
        args.repo,
        passphrase,
        thresholds,
        keys=keys,
        online_keys=args.online_keys,
        online_passphrase=_online_passphrase(args, passphrase, confirm=True),
    )
    print(f"initialised {repo.folder}: metadata/ and targets/ are what the server serves")
    print(f"offline keys (root, targets): {keys}; keep them off the server (encrypted, 0600)")
    print(f"online keys (snapshot, timestamp, director): {repo.online_keys}; online_keys in server.toml")
    return 0


def run_rotate(args: argparse.Namespace) -> int:
    repo, passphrase = _repository(args), _passphrase(args)
    with recorded(args.db, "keys.rotate", {"role": args.role, "repo": str(args.repo)}) as params:
        version = repo.rotate(args.role, passphrase, online_passphrase=_online_passphrase(args, passphrase))
        params["root_version"] = version
    print(f"rotated the {args.role} keys of {args.repo}; root is now version {version}")
    return 0


def run_revoke(args: argparse.Namespace) -> int:
    params = {"role": args.role, "keyid": args.keyid[:64], "repo": str(args.repo)}
    with recorded(args.db, "keys.revoke", params):
        version = _repository(args).revoke(args.role, args.keyid, _passphrase(args))
    print(f"revoked {args.role} key {args.keyid[:12]}... of {args.repo}; root is now version {version}")
    return 0


def run_migrate(args: argparse.Namespace) -> int:
    repo, passphrase = _repository(args), _passphrase(args)
    moved = repo.migrate(passphrase, _online_passphrase(args, passphrase))
    print(f"moved {len(moved)} keys out of {args.repo / 'keys'}:")
    for old, new in moved:
        print(f"  {old} -> {new}")
    print(
        "the old key files sat in the served folder: rotate root, targets, snapshot and timestamp "
        "(edgec keys rotate ROLE) and re-provision devices with a new director key"
    )
    return 0


def run_publish(args: argparse.Namespace) -> int:
    repo, passphrase = _repository(args), _passphrase(args)
    params: dict[str, Any] = {"bundles": [b.name for b in args.bundles][:32], "repo": str(args.repo)}
    with recorded(args.db, "release.publish", params):
        added = repo.publish(args.bundles, passphrase, online_passphrase=_online_passphrase(args, passphrase))
        params["targets"] = len(added)
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

    repo = ImageRepository(args.repo, online_keys=args.online_keys)
    repo.refresh(_online_passphrase(args))
    print(f"re-signed snapshot and timestamp of {args.repo}")
    return 0


def run_cdn_config(args: argparse.Namespace) -> int:
    from edgec._atomic import atomic_write
    from ota_server.cdn import nginx_config, nginx_server

    where = {"port": args.port, "listen": args.listen, "prefix": args.prefix}
    if args.server_block:
        if args.run_dir or args.user:
            raise OptionError(
                "--server-block goes into an nginx of its own: --run-dir and --user do not apply"
            )
        text = nginx_server(args.repo, **where)
    else:
        run_dir = args.run_dir or args.repo.resolve().parent / f"{args.repo.resolve().name}-nginx"
        text = nginx_config(args.repo, run_dir=run_dir, user=args.user, **where)
        run_dir.mkdir(parents=True, exist_ok=True)  # nginx needs it to exist
    if args.out is None:
        sys.stdout.write(text)
        return 0
    try:
        atomic_write(args.out, text.encode(), mode=0o644)
    except OSError as e:
        raise OptionError(f"cannot write --out {args.out}: {e.strerror}") from e
    print(f"wrote {args.out}: serves {args.repo}'s metadata/ and targets/ on {args.listen}:{args.port}")
    return 0
