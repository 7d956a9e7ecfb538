"""The image repository behind nginx or a CDN: it is static, signed files, so any web server
that answers Range requests can hand it to devices with the same TUF checks on the device.

``nginx_server`` is a ``server {}`` block (for ``/etc/nginx/conf.d``); ``nginx_config`` wraps
it in a complete ``nginx.conf`` that runs in the foreground with its pid file, logs and temp
folders in one folder of its own (no root needed, no system file touched). Either serves,
under the URL prefix the agent's ``install.http_url`` names (``/v1/repo/`` as on the server):

- ``metadata/<N>.root.json``, ``<N>.targets.json``, ``<N>.snapshot.json``, ``timestamp.json``
  (the names ``ota_server.served`` allows, same pattern); ``timestamp.json`` with
  ``Cache-Control: no-cache`` (it changes in place: a cache must revalidate it), the versioned
  ones for a short while (a new version is a new name);
- ``targets/...``: content-addressed (``<sha256>.<file>``, consistent snapshots), so
  ``immutable`` for a year; no path component may start with a dot, no control character.

Everything else is 404: the folder itself (no listing), ``director.pub.json``, dotfiles, the
online keys beside the repository, ``..`` (nginx resolves it before matching, so it can only
land on the catch-all). Symlinks are not followed inside ``metadata/`` and ``targets/``; only
GET and HEAD are answered; errors are ``no-store``, so a CDN does not keep a 404 for a root
version that comes later.
"""

from __future__ import annotations

import ipaddress
import logging
import re
from pathlib import Path

from edgec.errors import OptionError
from ota_server.served import METADATA_NAME

__all__ = ["DEFAULT_PREFIX", "METADATA_MAX_AGE_S", "nginx_config", "nginx_server"]

logger = logging.getLogger(__name__)

DEFAULT_PREFIX = "/v1/repo/"
METADATA_MAX_AGE_S = 60  # versioned metadata; timestamp.json is revalidated every time
_TARGETS_CACHE = "public, max-age=31536000, immutable"
_PREFIX = re.compile(r"/(?:[A-Za-z0-9_~-][A-Za-z0-9._~-]{0,63}/){0,8}")
# nginx config strings: no quote, backslash, variable ($), control character or newline
_UNSAFE_IN_CONF = re.compile(r"[\x00-\x1f\x7f\"'\\$;{}]")
_USER = re.compile(r"[a-z_][a-z0-9_-]{0,31}")
# one path component under targets/: not starting with a dot, no slash, backslash or
# control character (PCRE, written for nginx's quoted string: ``\\\\`` reaches PCRE as ``\\``)
_TARGET_PART = r"[^/.\\\\\x00-\x1f\x7f][^/\\\\\x00-\x1f\x7f]*"


def _listen(listen: str, port: int) -> str:
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise OptionError(f"bad port {port!r}: expected 1-65535")
    try:
        address = ipaddress.ip_address(listen)
    except ValueError:
        raise OptionError(f"bad listen address {listen!r}: expected an IP address, e.g. 127.0.0.1") from None
    return f"[{address}]:{port}" if address.version == 6 else f"{address}:{port}"


def _prefix(prefix: str) -> str:
    if not _PREFIX.fullmatch(prefix):
        raise OptionError(
            f"bad prefix {prefix[:80]!r}: expected /SEGMENT/.../ of letters, digits, '.', '_', '~', '-' "
            "(none starting with a dot), e.g. /v1/repo/"
        )
    return prefix


def _folder(path: Path, what: str) -> str:
    resolved = str(path.resolve())
    if _UNSAFE_IN_CONF.search(resolved) or len(resolved) > 1024:
        raise OptionError(f"{what} {path} has a character nginx's config cannot hold safely ($, quotes, ...)")
    return resolved


def _repo_folder(repo: Path) -> str:
    folder = _folder(repo, "the repository")
    if not (repo / "metadata").is_dir() or not (repo / "targets").is_dir():
        raise OptionError(
            f"{repo} is not an edgec repository (no metadata/ and targets/): run edgec keys init"
        )
    if (repo / "keys").exists():
        logger.warning("%s/keys exists (the old layout): nginx does not serve it; move it out", repo)
    return folder


def nginx_server(
    repo: Path,
    *,
    port: int,
    listen: str = "127.0.0.1",
    prefix: str = DEFAULT_PREFIX,
    access_log: Path | None = None,
    limit_rate_bytes_per_s: int | None = None,
) -> str:
    """A ``server {}`` block serving ``repo``'s metadata and targets under ``prefix`` on
    ``listen:port``; ``access_log``: where requests go (with the Range asked and the bytes
    sent), else the http block's log; ``limit_rate_bytes_per_s``: hold each target download
    to this rate (a slow link, for tests; nginx lets each request's first second's worth through
    at full speed). Raises ``OptionError`` for a bad input."""
    address = _listen(listen, port)
    prefix = _prefix(prefix)
    folder = _repo_folder(repo)
    if limit_rate_bytes_per_s is not None and (
        isinstance(limit_rate_bytes_per_s, bool) or limit_rate_bytes_per_s < 1
    ):
        raise OptionError(
            f"bad limit_rate_bytes_per_s {limit_rate_bytes_per_s!r}: expected a positive integer"
        )
    log = f'    access_log "{_folder(access_log, "the access log")}" edgec_repo;\n' if access_log else ""
    rate = f"        limit_rate {limit_rate_bytes_per_s};\n" if limit_rate_bytes_per_s else ""
    quoted = re.escape(prefix)
    metadata = METADATA_NAME.pattern
    return f"""\
server {{
    listen {address};
    server_name _;
    server_tokens off;
    autoindex off;
    max_ranges 1;
{log}    # errors are never cached (a root version asked for before it exists comes later)
    error_page 403 404 405 =404 @missing;

    location = {prefix}metadata/timestamp.json {{
        limit_except GET {{ deny all; }}
        alias "{folder}/metadata/timestamp.json";
        disable_symlinks on from="{folder}/metadata";
        types {{ }}
        default_type application/json;
        add_header X-Content-Type-Options nosniff;
        add_header Cache-Control "no-cache";
    }}

    location ~ "^{quoted}metadata/({metadata})$" {{
        limit_except GET {{ deny all; }}
        alias "{folder}/metadata/$1";
        disable_symlinks on from="{folder}/metadata";
        types {{ }}
        default_type application/json;
        add_header X-Content-Type-Options nosniff;
        add_header Cache-Control "public, max-age={METADATA_MAX_AGE_S}";
    }}

    location ~ "^{quoted}targets/((?:{_TARGET_PART}/)*{_TARGET_PART})$" {{
        limit_except GET {{ deny all; }}
        alias "{folder}/targets/$1";
        disable_symlinks on from="{folder}/targets";
        types {{ }}
        default_type application/octet-stream;
        add_header X-Content-Type-Options nosniff;
        add_header Cache-Control "{_TARGETS_CACHE}";
        if (-d $request_filename) {{
            return 404;  # not a redirect to the folder: no folder is served
        }}
{rate}    }}

    location / {{
        return 404;
    }}

    location @missing {{
        add_header Cache-Control "no-store" always;
        return 404;
    }}
}}
"""


def nginx_config(
    repo: Path,
    *,
    port: int,
    run_dir: Path,
    listen: str = "127.0.0.1",
    prefix: str = DEFAULT_PREFIX,
    user: str | None = None,
    limit_rate_bytes_per_s: int | None = None,
) -> str:
    """A complete ``nginx.conf``: ``nginx_server`` in an http block, in the foreground
    (``daemon off``), with its pid file, error and access logs (``run_dir/access.log``) and
    temp folders in ``run_dir``, which must lie outside the repository. ``user``: the workers'
    user when started as root (nginx's default is nobody, who may not read the folder). Run it
    with ``nginx -c FILE -p RUN_DIR``."""
    if run_dir.resolve().is_relative_to(repo.resolve()):
        raise OptionError(f"the run folder {run_dir} lies inside the repository {repo}: choose one beside it")
    if user is not None and not _USER.fullmatch(user):
        raise OptionError(f"bad user {user[:40]!r}: expected a user name")
    run = _folder(run_dir, "the run folder")
    server = nginx_server(
        repo,
        port=port,
        listen=listen,
        prefix=prefix,
        access_log=run_dir / "access.log",
        limit_rate_bytes_per_s=limit_rate_bytes_per_s,
    )
    temps = "\n".join(
        f'    {kind}_temp_path "{run}/{kind}_temp";'
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    indented = "".join(f"    {line}" if line.strip() else line for line in server.splitlines(keepends=True))
    user_line = f"user {user};\n" if user else ""
    return f"""\
# edgec image repository: {repo.resolve()} (metadata/ and targets/ only)
# run: nginx -c THIS_FILE -p {run} -e {run}/error.log
{user_line}daemon off;
worker_processes 1;
pid "{run}/nginx.pid";
error_log "{run}/error.log" warn;

events {{
    worker_connections 1024;
}}

http {{
    sendfile on;
    tcp_nopush on;
    keepalive_timeout 30s;
    client_max_body_size 1k;
    log_format edgec_repo '$remote_addr [$time_iso8601] "$request" $status $body_bytes_sent '
                          'range="$http_range" "$http_user_agent"';
{temps}
{indented}}}
"""
