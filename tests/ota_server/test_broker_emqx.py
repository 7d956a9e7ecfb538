"""The EMQX configuration that ``edgec broker config --kind emqx`` writes, checked without EMQX.

No EMQX binary runs here, so each part is checked against what EMQX's own source does, read at
tag v5.8.9 of github.com/emqx/emqx:

- the key names, against the schema modules: ``apps/emqx/src/emqx_schema.erl`` (``mqtt_general``,
  ``mqtt_session``, ``base_listener``, ``mqtt_listener``, ``fields("tcp_opts")``,
  ``common_ssl_opts_schema``, ``server_ssl_opts_schema``, ``client_ssl_opts_schema``,
  ``listeners``, ``fields("authz_cache")``), ``apps/emqx_auth/src/emqx_authz/emqx_authz_schema.erl``
  (``authz_fields``: sources, no_match, deny_action, cache; ``authz_common_fields``: type, enable),
  ``apps/emqx_auth/src/emqx_authn/emqx_authn_schema.erl`` (``common_fields``: enable),
  ``apps/emqx_auth/src/emqx_authn/emqx_authn_password_hashing.erl`` (``fields(pbkdf2)``),
  ``apps/emqx_auth_postgresql/src/emqx_authn_postgresql_schema.erl``,
  ``apps/emqx_auth_postgresql/src/emqx_authz_postgresql_schema.erl`` and
  ``apps/emqx_postgresql/src/emqx_postgresql.erl`` with
  ``apps/emqx_connector/src/emqx_connector_schema_lib.erl`` (the connection fields);
- the queries, run on a real PostgreSQL the way EMQX runs them: each ``${var}`` becomes ``$1``,
  ``$2``... in order (``emqx_template_sql:parse_prepstmt`` with ``'$n'``), prepared with no
  parameter types (epgsql's Parse), executed with the username for every placeholder;
- the password check, as ``emqx_authn_utils:check_password_from_selected_map`` and
  ``emqx_passwd:check_pass`` do it for ``pbkdf2``: the ``password_hash`` column (else
  ``password``), the ``salt`` column as the bytes it arrives as (``<<>>`` if absent),
  ``crypto:pbkdf2_hmac(MacFun, Password, Salt, Iterations, DKLength)`` (DKLength 64 for sha512
  when unset), lowercase hex, compared caselessly;
- the rules, as ``emqx_authz_rule_raw:parse_rule`` and ``emqx_authz_rule:match`` read a row:
  ``permission``, ``action`` (publish|pub, subscribe|sub, all) and ``topic`` (a filter, or
  ``eq TOPIC``), matched with ``emqx_topic:match``; the first matching row decides, and
  ``no_match`` decides when none does.

Whether EMQX starts with the file, connects to PostgreSQL and behaves on a live connection is
not checked here.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import stat
from typing import Any

import pytest

from edgec.errors import UserInputError
from edgec.topics import device_topics, fetch_request, fetch_response
from ota_server.broker_emqx import write_emqx_config
from ota_server.registry import Registry
from tests._services import postgres_url

pyhocon = pytest.importorskip("pyhocon")
psycopg = pytest.importorskip("psycopg")

# Key names, as the EMQX v5.8.9 schema modules above define them (a path -> the fields there;
# "*" is a listener name, "[]" an array element).
_CONNECTION = set(  # emqx_postgresql:fields(config), emqx_connector_schema_lib:relational_db_fields
    "server disable_prepared_statements database pool_size username password auto_reconnect ssl".split()
)
_COMMON_SSL = set(  # common_ssl_opts_schema
    "cacertfile cacerts certfile keyfile verify reuse_sessions depth password versions ciphers "
    "secure_renegotiate log_level hibernate_after".split()
)
_CLIENT_SSL = _COMMON_SSL | {"enable", "server_name_indication"}  # client_ssl_opts_schema
_SERVER_SSL = _COMMON_SSL | set(  # server_ssl_opts_schema
    "dhfile fail_if_no_peer_cert honor_cipher_order client_renegotiation handshake_timeout "
    "gc_after_handshake ocsp enable_crl_check".split()
)
_LISTENER = set(  # base_listener, mqtt_listener
    "enable bind acceptors max_connections mountpoint zone limiter enable_authn access_rules "
    "proxy_protocol proxy_protocol_timeout tcp_options".split()
)
_TCP_OPTS = set(  # fields("tcp_opts")
    "active_n backlog send_timeout send_timeout_close recbuf sndbuf buffer high_watermark nodelay "
    "nolinger reuseaddr keepalive".split()
)
_MQTT = set(  # mqtt_general() and mqtt_session()
    "idle_timeout max_packet_size max_clientid_len max_topic_levels max_topic_alias retain_available "
    "wildcard_subscription shared_subscription shared_subscription_strategy "
    "shared_subscription_initial_sticky_pick exclusive_subscription ignore_loop_deliver strict_mode "
    "response_information server_keepalive keepalive_backoff keepalive_multiplier "
    "keepalive_check_interval retry_interval use_username_as_clientid peer_cert_as_username "
    "peer_cert_as_clientid client_attrs_init clientid_override "
    "session_expiry_interval message_expiry_interval max_awaiting_rel max_qos_allowed "
    "mqueue_priorities mqueue_default_priority mqueue_store_qos0 max_mqueue_len max_inflight "
    "max_subscriptions upgrade_qos await_rel_timeout".split()
)
EMQX_SCHEMA: dict[str, set[str]] = {
    "": {"authentication", "authorization", "mqtt", "listeners"},
    "authentication[]": {"mechanism", "backend", "password_hash_algorithm", "query", "enable"} | _CONNECTION,
    "authentication[].password_hash_algorithm": {"name", "mac_fun", "iterations", "dk_length"},
    "authentication[].ssl": _CLIENT_SSL,
    "authorization": {"sources", "no_match", "deny_action", "cache"},
    "authorization.cache": {"enable", "max_size", "ttl", "excludes"},
    "authorization.sources[]": {"type", "enable", "query", "prepare_statement"} | _CONNECTION,
    "authorization.sources[].ssl": _CLIENT_SSL,
    "mqtt": _MQTT,
    "listeners": {"tcp", "ssl", "ws", "wss", "quic"},
    "listeners.tcp.*": _LISTENER,
    "listeners.tcp.*.tcp_options": _TCP_OPTS,
    "listeners.ssl.*": _LISTENER | {"ssl_options"},
    "listeners.ssl.*.tcp_options": _TCP_OPTS,
    "listeners.ssl.*.ssl_options": _SERVER_SSL,
    "listeners.ws.*": _LISTENER | {"websocket"},
    "listeners.wss.*": _LISTENER | {"ssl_options", "websocket"},
}
EMQX_ENUMS = {  # values the schema accepts, for the keys whose values are closed sets
    "authentication[].mechanism": {"password_based"},
    "authentication[].backend": {"postgresql"},
    "authentication[].password_hash_algorithm.name": {"pbkdf2"},
    "authentication[].password_hash_algorithm.mac_fun": {"sha", "sha224", "sha256", "sha384", "sha512"},
    "authorization.no_match": {"allow", "deny"},
    "authorization.deny_action": {"ignore", "disconnect"},
    "authorization.sources[].type": {"postgresql"},
    "mqtt.shared_subscription_strategy": set(
        "random round_robin round_robin_per_group sticky local hash_topic hash_clientid".split()
    ),
    "listeners.ssl.*.ssl_options.verify": {"verify_peer", "verify_none"},
}
_NAMED = {"listeners.tcp", "listeners.ssl", "listeners.ws", "listeners.wss"}  # maps of named listeners
_PLACEHOLDER = re.compile(r"\$\{[.]?([a-zA-Z0-9._]*)\}")  # emqx_template.erl ?RE_PLACEHOLDER


def _key_paths(node: Any, path: str, found: list[tuple[str, str, Any]]) -> None:
    """Every (schema path, key, value) of the parsed configuration."""
    if isinstance(node, list):
        for item in node:
            _key_paths(item, f"{path}[]", found)
        return
    for key, value in node.items():
        found.append((path, key, value))
        child = f"{path}.{key}".lstrip(".")
        if isinstance(value, dict) and child in _NAMED:  # listener names are the operator's
            for listener in value.values():
                _key_paths(listener, f"{child}.*", found)
        elif isinstance(value, dict | list):
            _key_paths(value, child, found)


# --- what EMQX does with a query, a password and a row, replicated from its source -------------


def _as_prepared(query: str) -> tuple[str, int]:
    """The statement EMQX prepares (``${username}`` -> ``$1``, ``$2``... in order) and the number
    of parameters, each bound to the username."""
    names = _PLACEHOLDER.findall(query)
    assert set(names) <= {"username"}, names
    counter = iter(range(1, len(names) + 1))
    return _PLACEHOLDER.sub(lambda _m: f"${next(counter)}", query), len(names)


def _run_as_emqx(conn: Any, query: str, username: str | None) -> list[dict[str, Any]]:
    """Prepare ``query`` as EMQX does (each placeholder a ``$n``; epgsql's Parse gives no types,
    so PostgreSQL infers them) and execute it with ``username`` bound to each (NULL when the
    client sent none); the rows as column -> value (bytea as bytes, text as str)."""
    statement, count = _as_prepared(query)
    pg = conn.pgconn
    ok = (psycopg.pq.ExecStatus.COMMAND_OK, psycopg.pq.ExecStatus.TUPLES_OK)
    prepared = pg.prepare(b"emqx_q", statement.encode())
    assert prepared.status in ok, prepared.error_message
    try:
        value = None if username is None else username.encode()
        result = pg.exec_prepared(b"emqx_q", [value] * count)
        assert result.status in ok, result.error_message
        rows = []
        for row in range(result.ntuples):
            cells: dict[str, Any] = {}
            for col in range(result.nfields):
                raw = result.get_value(row, col)
                name = (result.fname(col) or b"").decode()
                if raw is None:
                    cells[name] = None
                elif result.ftype(col) == 17:  # bytea in text format: backslash, x, hex digits
                    cells[name] = bytes.fromhex(bytes(raw).decode()[2:])
                else:
                    cells[name] = bytes(raw).decode()
            rows.append(cells)
        return rows
    finally:
        pg.exec_(b"DEALLOCATE emqx_q")


def _emqx_checks_password(algorithm: dict[str, Any], rows: list[dict[str, Any]], password: str) -> bool:
    """emqx_authn_postgresql:authenticate: no row -> ignore (the chain then denies); else
    check_password_from_selected_map on the first row with emqx_passwd's pbkdf2."""
    if not rows:
        return False
    selected = rows[0]
    stored = selected.get("password_hash", selected.get("password"))
    if stored is None:
        return False
    salt = selected.get("salt", b"")
    salt = salt.encode() if isinstance(salt, str) else bytes(salt)
    dk_length = algorithm.get("dk_length") or {"sha": 20, "sha256": 32, "sha512": 64}[algorithm["mac_fun"]]
    computed = hashlib.pbkdf2_hmac(
        algorithm["mac_fun"], password.encode(), salt, int(algorithm["iterations"]), int(dk_length)
    )
    return hmac.compare_digest(computed.hex().lower(), str(stored).lower())


def _words(topic: str) -> list[str]:
    return topic.split("/")


def _topic_match(name: list[str], topic_filter: list[str]) -> bool:
    """emqx_topic:match/2 on words (a ``$``-topic never matches a first-level wildcard)."""
    if name and name[0].startswith("$") and topic_filter and topic_filter[0] in ("+", "#"):
        return False
    i = 0
    for i, word in enumerate(topic_filter):
        if word == "#":
            return True
        if i >= len(name) or (word != "+" and word != name[i]):
            return False
    return len(name) == len(topic_filter)


def _emqx_authorizes(rows: list[dict[str, Any]], action: str, topic: str) -> bool:
    """The first row that matches decides; none -> no_match (deny in this configuration)."""
    actions = {
        "pub": "publish",
        "publish": "publish",
        "sub": "subscribe",
        "subscribe": "subscribe",
        "all": "all",
    }
    for row in rows:
        rule_action = actions[row["action"]]
        if rule_action not in ("all", action):
            continue
        rule_topic = row["topic"]
        if rule_topic.startswith("eq "):
            matched = topic == rule_topic[3:]
        else:
            matched = _topic_match(_words(topic), _words(rule_topic))
        if matched:
            return {"allow": True, "deny": False}[row["permission"]]
    return False


# --- fixtures ------------------------------------------------------------------------------------


@pytest.fixture
def emqx(tmp_path):
    """A PostgreSQL registry with two devices, the configuration written for three replicas."""
    for url in postgres_url():
        registry = Registry.open(url)
        _, pw_a = registry.add_device("dev-a", "lab", "g", "raspberry-pi-4")
        _, pw_b = registry.add_device("dev-b", "plant", "g", "x86-64-cpu")
        files = write_emqx_config(registry, tmp_path / "emqx", server_replicas=3, port=11883, tls_port=18883)
        config = pyhocon.ConfigFactory.parse_file(str(files.config))
        conn = psycopg.connect(url.replace("postgresql+psycopg://", "postgresql://"), autocommit=True)
        try:
            yield {
                "registry": registry,
                "files": files,
                "config": config,
                "conn": conn,
                "passwords": {"dev-a": pw_a, "dev-b": pw_b},
            }
        finally:
            conn.close()
            registry.engine.dispose()


def _authn(emqx: dict[str, Any]) -> dict[str, Any]:
    (authenticator,) = emqx["config"]["authentication"]
    return authenticator


def _authz_rows(emqx: dict[str, Any], username: str | None) -> list[dict[str, Any]]:
    (source,) = emqx["config"]["authorization"]["sources"]
    return _run_as_emqx(emqx["conn"], source["query"], username)


def _logs_in(emqx: dict[str, Any], username: str | None, password: str) -> bool:
    authenticator = _authn(emqx)
    rows = _run_as_emqx(emqx["conn"], authenticator["query"], username)
    return _emqx_checks_password(authenticator["password_hash_algorithm"], rows, password)


# --- the configuration file ----------------------------------------------------------------------


def test_every_key_is_one_emqx_5_defines(emqx):
    found: list[tuple[str, str, Any]] = []
    _key_paths(emqx["config"], "", found)
    assert found
    for path, key, value in found:
        assert path in EMQX_SCHEMA, f"{path}.{key}: no such section in the EMQX schema"
        assert key in EMQX_SCHEMA[path], f"{path}.{key} is not an EMQX 5 setting"
        full = f"{path}.{key}".lstrip(".")
        if full in EMQX_ENUMS:
            assert value in EMQX_ENUMS[full], f"{full} = {value!r}"


def test_the_registry_is_the_only_authenticator_and_the_only_acl(emqx):
    """An empty chain would let anyone in, and EMQX's default file source ends in {allow, all}."""
    config = emqx["config"]
    assert [(a["mechanism"], a["backend"], a["enable"]) for a in config["authentication"]] == [
        ("password_based", "postgresql", True)
    ]
    authorization = config["authorization"]
    assert [(s["type"], s["enable"]) for s in authorization["sources"]] == [("postgresql", True)]
    assert authorization["no_match"] == "deny"
    for listener in ("tcp", "ssl"):
        assert config["listeners"][listener]["default"]["enable_authn"] is True
    assert config["listeners"]["ws"]["default"]["enable"] is False
    assert config["listeners"]["wss"]["default"]["enable"] is False


def test_client_ids_are_bound_to_usernames_and_limits_match_mosquitto(emqx):
    mqtt = emqx["config"]["mqtt"]
    assert mqtt["use_username_as_clientid"] is True
    assert mqtt["max_packet_size"] == "1MB"
    assert mqtt["max_mqueue_len"] == 200000
    assert mqtt["max_inflight"] == 1000
    assert mqtt["shared_subscription"] is True


def test_listeners_use_the_generated_certificate(emqx):
    listeners = emqx["config"]["listeners"]
    folder = emqx["files"].config.parent.resolve()
    assert listeners["tcp"]["default"]["bind"] == "127.0.0.1:11883"
    assert listeners["ssl"]["default"]["bind"] == "127.0.0.1:18883"
    ssl = listeners["ssl"]["default"]["ssl_options"]
    for key, name in (("cacertfile", "ca.crt"), ("certfile", "server.crt"), ("keyfile", "server.key")):
        assert ssl[key] == str(folder / name)
        assert (folder / name).is_file()


def test_secrets_are_files_of_their_own_never_inline(emqx, tmp_path):
    folder = emqx["files"].config.parent
    text = emqx["files"].config.read_text()
    assert emqx["files"].server_password not in text
    assert stat.S_IMODE((folder / "server.secret").stat().st_mode) == 0o600
    assert stat.S_IMODE(emqx["files"].config.stat().st_mode) == 0o600
    # a URL with a password: EMQX reads it from a file (emqx_schema_secret, file://)
    url = "postgresql+psycopg://emqx_ro:s3cret-pw@db.example:5433/fleet?sslmode=require"
    files = write_emqx_config(emqx["registry"], tmp_path / "other", db_url=url)
    other = pyhocon.ConfigFactory.parse_file(str(files.config))
    secret = files.config.parent.resolve() / "postgres.secret"
    assert "s3cret-pw" not in files.config.read_text()
    assert secret.read_text().strip() == "s3cret-pw"
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    for section in (other["authentication"][0], other["authorization"]["sources"][0]):
        assert section["password"] == f"file://{secret}"
        assert (section["server"], section["database"], section["username"]) == (
            "db.example:5433",
            "fleet",
            "emqx_ro",
        )
        assert section["ssl"]["enable"] is True


def test_a_sqlite_registry_is_refused_in_one_line(tmp_path):
    registry = Registry.open(f"sqlite:///{tmp_path / 'fleet.db'}")
    with pytest.raises(UserInputError, match="PostgreSQL") as e:
        write_emqx_config(registry, tmp_path / "emqx")
    assert "\n" not in str(e.value)
    assert not (tmp_path / "emqx").exists()


# --- authentication on PostgreSQL ----------------------------------------------------------------


def test_a_device_logs_in_with_its_password_and_not_another(emqx):
    pw_a, pw_b = emqx["passwords"]["dev-a"], emqx["passwords"]["dev-b"]
    assert _logs_in(emqx, "dev-a", pw_a)
    assert _logs_in(emqx, "dev-b", pw_b)
    assert not _logs_in(emqx, "dev-a", pw_b)
    assert not _logs_in(emqx, "dev-a", pw_a + "x")
    assert not _logs_in(emqx, "dev-a", "")


def test_the_salt_reaches_emqx_as_the_registry_s_bytes(emqx):
    """The salt is random bytes: it must arrive as bytea, not text that could be re-encoded."""
    stored = emqx["registry"].password_hash("dev-a")
    (row,) = _run_as_emqx(emqx["conn"], _authn(emqx)["query"], "dev-a")
    assert bytes(row["salt"]) == base64.b64decode(stored.split("$")[3])
    assert row["password_hash"] == base64.b64decode(stored.split("$")[4]).hex()


def test_every_server_replica_logs_in_with_the_shared_secret(emqx):
    secret = emqx["files"].server_password
    for login in ("edgec-server", "edgec-server-2", "edgec-server-3"):
        assert _logs_in(emqx, login, secret), login
    assert not _logs_in(emqx, "edgec-server-4", secret)  # three replicas configured
    assert not _logs_in(emqx, "dev-a", secret)
    assert not _logs_in(emqx, "edgec-server", emqx["passwords"]["dev-a"])


def test_unknown_or_missing_usernames_find_no_row(emqx):
    query = _authn(emqx)["query"]
    assert _run_as_emqx(emqx["conn"], query, "nobody") == []
    assert _run_as_emqx(emqx["conn"], query, None) == []  # no username: EMQX binds NULL
    assert _run_as_emqx(emqx["conn"], query, "' OR '1'='1") == []
    assert _authz_rows(emqx, "nobody") == []
    assert _authz_rows(emqx, None) == []


def test_a_hash_of_another_iteration_count_is_refused_not_misread(emqx):
    """EMQX checks with the configured iteration count: a row hashed otherwise must not match."""
    from ota_server.registry import hash_password

    with emqx["conn"].cursor() as cur:
        stored = hash_password("pw").replace("$7$101$", "$7$1000$")
        cur.execute("UPDATE devices SET password_hash = %s WHERE id = 'dev-a'", [stored])
    assert _run_as_emqx(emqx["conn"], _authn(emqx)["query"], "dev-a") == []


# --- authorization on PostgreSQL -----------------------------------------------------------------


def _device_access(fleet: str, device: str) -> set[tuple[str, str]]:
    topics = device_topics(fleet, device)
    return {
        ("publish", topics["state"]),
        ("publish", topics["telemetry"]),
        ("publish", topics["events"]),
        ("publish", fetch_request(fleet, device)),
        ("subscribe", topics["desired"]),
        ("subscribe", fetch_response(fleet, device)),
    }


def test_a_device_gets_exactly_its_own_topics(emqx):
    rows = _authz_rows(emqx, "dev-a")
    assert {(r["permission"], r["action"], r["topic"]) for r in rows} == {
        ("allow", action, topic) for action, topic in _device_access("lab", "dev-a")
    }
    for action, topic in _device_access("lab", "dev-a"):
        assert _emqx_authorizes(rows, action, topic)
        other = "subscribe" if action == "publish" else "publish"
        assert not _emqx_authorizes(rows, other, topic), (other, topic)  # e.g. no writing its own desired


def test_a_device_gets_nothing_of_another_device(emqx):
    rows = _authz_rows(emqx, "dev-a")
    for _action, topic in _device_access("plant", "dev-b"):
        for action in ("publish", "subscribe"):
            assert not _emqx_authorizes(rows, action, topic), (action, topic)
    for wildcard in ("edgec/v1/#", "edgec/v1/lab/devices/+/desired", "edgec/v1/+/fetch/+/response", "#"):
        assert not _emqx_authorizes(rows, "subscribe", wildcard), wildcard


def test_server_replicas_may_use_every_edgec_topic_and_shared_subscriptions(emqx):
    for login in ("edgec-server", "edgec-server-2", "edgec-server-3"):
        rows = _authz_rows(emqx, login)
        assert _emqx_authorizes(rows, "subscribe", "edgec/v1/+/devices/+/+")
        assert _emqx_authorizes(rows, "subscribe", "edgec/v1/+/fetch/+/request")
        assert _emqx_authorizes(rows, "publish", device_topics("lab", "dev-a")["desired"])
        assert _emqx_authorizes(rows, "publish", fetch_response("plant", "dev-b"))
        # EMQX 5 authorizes $share/GROUP/T as T (emqx_channel: get_shared_real_topic); the
        # $share row is for a broker that checks the whole filter
        assert _emqx_authorizes(rows, "subscribe", "$share/edgec/edgec/v1/+/devices/+/+")
        assert not _emqx_authorizes(rows, "subscribe", "$SYS/#")
        assert not _emqx_authorizes(rows, "publish", "other/topic")
    assert _authz_rows(emqx, "edgec-server-4") == []


def test_a_hand_written_wildcard_id_gets_no_rules(emqx):
    """The registry refuses such ids; a row written around it must not widen a device's topics."""
    with emqx["conn"].cursor() as cur:
        cur.execute(
            "INSERT INTO devices (id, fleet, group_name, profile, password_hash, created_at) "
            "SELECT '+', fleet, group_name, profile, password_hash, created_at "
            "FROM devices WHERE id = 'dev-a'"
        )
        cur.execute("UPDATE devices SET fleet = '#' WHERE id = 'dev-b'")
    assert _authz_rows(emqx, "+") == []
    assert _authz_rows(emqx, "dev-b") == []


# --- the command -------------------------------------------------------------------------------


def test_broker_config_kind_emqx_writes_the_configuration(emqx, tmp_path, capsys):
    from cli import main

    url = emqx["registry"].engine.url.render_as_string(hide_password=False)
    out = tmp_path / "cli-emqx"
    argv = ["broker", "config", "--kind", "emqx", "--out", str(out), "--db", url, "--server-replicas", "2"]
    assert main(argv) == 0
    config = pyhocon.ConfigFactory.parse_file(str(out / "emqx-edgec.hocon"))
    assert (out / "server.secret").is_file()
    assert (out / "ca.crt").is_file()
    assert sorted(p.name for p in out.iterdir()) == [  # nothing per device
        "ca.crt", "ca.key", "emqx-edgec.hocon", "server.crt", "server.key", "server.secret",
    ]  # fmt: skip
    assert "edgec-server-2" in config["authentication"][0]["query"]
    assert "emqx-edgec.hocon" in capsys.readouterr().out


def test_broker_config_kind_emqx_on_sqlite_fails_in_one_line(tmp_path, capsys):
    from cli import main

    db = f"sqlite:///{tmp_path / 'fleet.db'}"
    assert main(["broker", "config", "--kind", "emqx", "--out", str(tmp_path / "out"), "--db", db]) != 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert "PostgreSQL" in err


def test_both_queries_find_the_login_through_the_primary_key(emqx):
    """A CONNECT or a cache miss costs one index lookup, never a scan of the fleet. With
    sequential scans priced out, a plan that still scans ``devices`` has no usable index."""
    conn = emqx["conn"]
    (source,) = emqx["config"]["authorization"]["sources"]
    for name, query in (("authn", _authn(emqx)["query"]), ("authz", source["query"])):
        statement, count = _as_prepared(query)
        with conn.cursor() as cur:
            cur.execute("SET enable_seqscan = off")
            cur.execute(f"PREPARE emqx_plan AS {statement}")
            args = ", ".join(["'dev-a'::varchar"] * count)
            cur.execute(f"EXPLAIN EXECUTE emqx_plan ({args})")
            plan = "\n".join(row[0] for row in cur.fetchall())
            cur.execute("DEALLOCATE emqx_plan")
            cur.execute("RESET enable_seqscan")
        assert "devices_pkey" in plan, (name, plan)
        assert "Seq Scan on devices" not in plan, (name, plan)


def test_emqx_db_without_kind_emqx_is_refused(tmp_path, capsys):
    from cli import main

    db = f"sqlite:///{tmp_path / 'fleet.db'}"
    argv = ["broker", "config", "--out", str(tmp_path / "out"), "--db", db, "--emqx-db", "postgresql://u@h/d"]
    assert main(argv) != 0
    assert "--kind emqx" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
