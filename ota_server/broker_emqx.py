"""EMQX 5 configuration in which the fleet registry (PostgreSQL) is the source of truth.

Mosquitto reads a password file and an ACL that ``edgec broker config`` regenerates after every
``devices add``; EMQX asks the registry itself, on every CONNECT and (cached for five minutes) every
PUBLISH and SUBSCRIBE, so a cluster of EMQX nodes needs no per-device file and a new device can
log in at once. What this module writes (``emqx-edgec.hocon``) holds:

- ``authentication``: one ``password_based`` / ``postgresql`` authenticator whose query reads the
  device's ``$7$ITER$SALT$HASH`` (Mosquitto's PBKDF2-SHA512, base64) from ``devices`` and hands
  EMQX the form its ``pbkdf2`` checker compares (emqx_passwd.erl: ``crypto:pbkdf2_hmac(sha512,
  Password, Salt, Iterations, 64)``, hex-encoded, compared caselessly with the ``password_hash``
  column; ``salt`` is used as the bytes it arrives as). The salt is random bytes, so the query
  returns it as ``bytea`` (``decode(..., 'base64')``): PostgreSQL sends it byte for byte, and no
  text encoding can mangle it. The server replicas' logins are not devices: their hashes (of the
  one secret they share, in ``server.secret``) are a ``VALUES`` list in the same query, so one
  authenticator answers every login and a query that finds nothing or fails denies (EMQX denies
  when every authenticator ignores). Hashes of another kind or iteration count return no row.
- ``authorization``: one ``postgresql`` source, ``no_match = deny``: a device may publish its
  ``state``, ``telemetry``, ``events`` and fetch request and subscribe to its ``desired`` and
  fetch response; a server replica may do anything under ``edgec/v1/#`` (shared subscriptions
  ``$share/GROUP/edgec/v1/...`` are authorized as ``edgec/v1/...`` by EMQX 5). The source list
  replaces EMQX's default ``file`` source, whose ``acl.conf`` ends in ``{allow, all}``.
- ``mqtt``: client ids bound to usernames (``use_username_as_clientid``), the packet, queue and
  in-flight limits of the Mosquitto configuration, and shared subscriptions dispatched by client
  id (each device's reports reach one replica, in order).
- ``listeners``: plain MQTT and MQTT over TLS with the generated CA and certificate; WebSocket
  listeners off.

The database password, if the URL has one, goes to ``postgres.secret`` (0600) and the
configuration names it as ``file://...`` (EMQX 5.4 and later read secrets from files).
"""

from __future__ import annotations

import ipaddress
import json
import logging
import re
import secrets
from collections.abc import Callable
from pathlib import Path

from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

from edgec._atomic import atomic_write
from edgec.errors import UserInputError
from edgec.topics import PREFIX, device_topics, fetch_request, fetch_response
from ota_server.broker import BrokerFiles, replica_logins, write_tls
from ota_server.registry import PBKDF2_ITERATIONS, Registry, hash_password

__all__ = ["CONFIG_NAME", "DEVICE_ACCESS", "authn_query", "authz_query", "write_emqx_config"]

logger = logging.getLogger(__name__)

CONFIG_NAME = "emqx-edgec.hocon"
SERVER_ACCESS = [("all", f"{PREFIX}/#"), ("subscribe", f"$share/+/{PREFIX}/#")]
# what a device may do, and on which topic (the Mosquitto ACL's read = subscribe, write = publish)
DEVICE_ACCESS: list[tuple[str, Callable[[str, str], str]]] = [
    ("subscribe", lambda fleet, device: device_topics(fleet, device)["desired"]),
    ("publish", lambda fleet, device: device_topics(fleet, device)["state"]),
    ("publish", lambda fleet, device: device_topics(fleet, device)["telemetry"]),
    ("publish", lambda fleet, device: device_topics(fleet, device)["events"]),
    ("publish", fetch_request),
    ("subscribe", fetch_response),
]
_FLEET, _DEVICE = "fleet0edgec0column", "device0edgec0column"  # stand-ins, replaced by SQL columns
_SAFE_LITERAL = re.compile(r"[A-Za-z0-9$+/=._#-]*")


def _literal(value: str) -> str:
    """A SQL string literal of a value edgec made (login names, hashes, topics): no quote or
    backslash can be in it, and EMQX's ``${...}`` placeholders cannot either."""
    if not _SAFE_LITERAL.fullmatch(value):
        raise ValueError(f"{value!r} cannot be a SQL literal here")
    return f"'{value}'"


def _topic_sql(topic_of: Callable[[str, str], str]) -> str:
    """A device topic as a SQL expression over ``d.fleet`` and ``d.id``, from ``edgec.topics``."""
    parts = _literal(topic_of(_FLEET, _DEVICE))
    return parts.replace(_FLEET, "' || d.fleet || '").replace(_DEVICE, "' || d.id || '")


def authn_query(server_hashes: dict[str, str]) -> str:
    """The authenticator's query: ``password_hash`` (hex) and ``salt`` (bytea) of the device or
    server replica named ``${username}``, in the form EMQX's ``pbkdf2`` checker compares."""
    servers = ", ".join(f"({_literal(login)}, {_literal(h)})" for login, h in server_hashes.items())
    return f"""SELECT encode(decode(split_part(h, '$', 5), 'base64'), 'hex') AS password_hash,
       decode(split_part(h, '$', 4), 'base64') AS salt
FROM (
  SELECT password_hash AS h FROM devices WHERE id = ${{username}}
  UNION ALL
  SELECT s.h FROM (VALUES {servers}) AS s (login, h) WHERE s.login = ${{username}}
) AS found
WHERE split_part(h, '$', 2) = '7' AND split_part(h, '$', 3) = '{PBKDF2_ITERATIONS}'
LIMIT 1"""


def authz_query(servers: list[str]) -> str:
    """The authorization source's query: ``permission``, ``action``, ``topic`` rows for
    ``${username}``. A row whose fleet or id could widen a topic (``/``, ``+``, ``#``) is left out:
    the registry refuses such ids, and this keeps a device confined if one were written by hand."""
    device_rows = ",\n    ".join(f"({_literal(action)}, {_topic_sql(t)})" for action, t in DEVICE_ACCESS)
    logins = ", ".join(f"({_literal(login)})" for login in servers)
    server_rows = ", ".join(f"({_literal(action)}, {_literal(topic)})" for action, topic in SERVER_ACCESS)
    return f"""SELECT 'allow' AS permission, t.action, t.topic
FROM devices AS d, LATERAL (VALUES
    {device_rows}
  ) AS t (action, topic)
WHERE d.id = ${{username}} AND d.id !~ '[/+#]' AND d.fleet !~ '[/+#]'
UNION ALL
SELECT 'allow', t.action, t.topic
FROM (VALUES {logins}) AS s (login), (VALUES {server_rows}) AS t (action, topic)
WHERE s.login = ${{username}}"""


def _database_url(registry: Registry, db_url: str | None) -> URL:
    if registry.engine.dialect.name != "postgresql":
        raise UserInputError(
            "EMQX reads devices from the registry in PostgreSQL: pass --db postgresql+psycopg://USER@HOST/DB"
        )
    try:
        url = make_url(db_url) if db_url else registry.engine.url
    except ArgumentError as e:
        raise UserInputError(f"bad --emqx-db URL: {e}") from None
    if url.get_backend_name() != "postgresql" or not url.host or not url.database or not url.username:
        raise UserInputError(
            "EMQX connects to PostgreSQL over TCP with a user: give a URL postgresql://USER@HOST:PORT/DB"
        )
    return url


def _hocon(value: str) -> str:
    return json.dumps(value)  # a JSON string is a HOCON quoted string


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _postgres_block(url: URL, folder: Path, indent: str) -> list[str]:
    """The connection fields shared by the authenticator and the authorization source."""
    lines = [
        f"server = {_hocon(_address(url.host or '', url.port or 5432))}",
        f"database = {_hocon(url.database or '')}",
        f"username = {_hocon(url.username or '')}",
    ]
    if url.password:
        lines.append(f"password = {_hocon('file://' + str(folder / 'postgres.secret'))}")
    sslmode = str(url.query.get("sslmode", "disable"))
    if sslmode in ("require", "verify-ca", "verify-full"):
        ssl = ["enable = true"]
        root = url.query.get("sslrootcert")
        if root and sslmode != "require":
            ssl += ["verify = verify_peer", f"cacertfile = {_hocon(str(root))}"]
            if sslmode == "verify-full" and not _is_ip(url.host or ""):  # an IP is no SNI name
                ssl.append(f"server_name_indication = {_hocon(url.host or '')}")
        lines.append("ssl { " + ", ".join(ssl) + " }")
    else:
        lines.append("ssl { enable = false }")
    return [indent + line for line in lines]


def _config(
    url: URL, folder: Path, server_hashes: dict[str, str], *, port: int, tls_port: int, bind: str
) -> str:
    authn = authn_query(server_hashes)
    authz = authz_query(list(server_hashes))
    return "\n".join(
        [
            "# written by edgec broker config --kind emqx: devices and their topics are read from the",
            "# registry at CONNECT; regenerate only when server replicas, ports or certificates change.",
            "# Append to etc/emqx.conf on every node (read-only there: the dashboard cannot loosen it).",
            "authentication = [",
            "  {",
            "    mechanism = password_based",
            "    backend = postgresql",
            "    enable = true",
            "    password_hash_algorithm {",
            f"      name = pbkdf2, mac_fun = sha512, iterations = {PBKDF2_ITERATIONS}, dk_length = 64",
            "    }",
            *_postgres_block(url, folder, "    "),
            f'    query = """{authn}"""',
            "  }",
            "]",
            "authorization {",
            "  no_match = deny",
            "  deny_action = ignore",
            "  # a device's rules change only when it is removed (then kick its connection too): five",
            "  # minutes of cache spare the registry a query per topic per minute per device",
            '  cache { enable = true, max_size = 32, ttl = "5m" }',
            "  sources = [",
            "    {",
            "      type = postgresql",
            "      enable = true",
            *_postgres_block(url, folder, "      "),
            f'      query = """{authz}"""',
            "    }",
            "  ]",
            "}",
            "mqtt {",
            "  # a connection's client id is its username: no login takes over another's session",
            "  use_username_as_clientid = true",
            '  max_packet_size = "1MB"',
            "  # the server's sessions take every device's reports (Mosquitto: max_queued_messages)",
            "  max_mqueue_len = 200000",
            "  # a server acknowledges a report once it is in the registry (batched)",
            "  max_inflight = 1000",
            '  session_expiry_interval = "1d"',
            "  shared_subscription = true",
            "  # one device's messages reach one replica, in order; the rest spread by client id",
            "  shared_subscription_strategy = hash_clientid",
            "}",
            "listeners {",
            "  tcp.default {",
            f"    bind = {_hocon(_address(bind, port))}",
            "    enable_authn = true",
            "    tcp_options { nodelay = true }",
            "  }",
            "  ssl.default {",
            f"    bind = {_hocon(_address(bind, tls_port))}",
            "    enable_authn = true",
            "    tcp_options { nodelay = true }",
            "    ssl_options {",
            f"      cacertfile = {_hocon(str(folder / 'ca.crt'))}",
            f"      certfile = {_hocon(str(folder / 'server.crt'))}",
            f"      keyfile = {_hocon(str(folder / 'server.key'))}",
            "      verify = verify_none",
            "    }",
            "  }",
            "  ws.default { enable = false }",
            "  wss.default { enable = false }",
            "}",
            "",
        ]
    )


def write_emqx_config(
    registry: Registry,
    folder: Path,
    *,
    port: int = 1883,
    tls_port: int = 8883,
    bind: str = "127.0.0.1",
    hosts: list[str] | None = None,
    server_replicas: int = 1,
    db_url: str | None = None,
) -> BrokerFiles:
    """Write ``emqx-edgec.hocon``, ``server.secret``, ``postgres.secret`` (if the URL has a
    password) and the TLS files into ``folder``.

    EMQX connects to PostgreSQL with ``db_url`` (a read-only role is enough: SELECT on
    ``devices``), by default the registry's own URL. Paths in the configuration are this
    folder's: copy it to the same place on every EMQX node, owned by the user EMQX runs as.
    """
    url = _database_url(registry, db_url)
    servers = replica_logins(registry.devices(), server_replicas)
    folder.mkdir(parents=True, exist_ok=True)
    server_password = secrets.token_urlsafe(24)
    server_hashes = {login: hash_password(server_password) for login in servers}
    atomic_write(folder / "server.secret", (server_password + "\n").encode(), 0o600)
    if url.password:
        atomic_write(folder / "postgres.secret", (str(url.password) + "\n").encode(), 0o600)
    ca = write_tls(folder, hosts or [bind, "localhost"])
    text = _config(url, folder.resolve(), server_hashes, port=port, tls_port=tls_port, bind=bind)
    atomic_write(folder / CONFIG_NAME, text.encode(), 0o600)
    logger.info("wrote %s for %d server replicas", folder / CONFIG_NAME, len(servers))
    return BrokerFiles(config=folder / CONFIG_NAME, server_password=server_password, ca_cert=ca)
