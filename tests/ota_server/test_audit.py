"""The audit log on SQLite and on a real PostgreSQL: appends chain, raw SQL tampering is named
by row, concurrent writers (threads and processes) keep one chain, inputs are bounded."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import subprocess
import sys
import threading
import time

import pytest
from sqlalchemy import text

from edgec.errors import UserInputError
from ota_server.audit import (
    GENESIS,
    PARAMS_MAX_BYTES,
    AuditAction,
    AuditFieldError,
    AuditLog,
    AuditTamperedError,
    Tamper,
    Via,
    failed,
    local_actor,
    refused,
)
from ota_server.registry import Registry
from tests._cli import ROOT


@pytest.fixture
def registry(db_url):
    registry = Registry.open(db_url)
    yield registry
    registry.engine.dispose()


def _fill(log: AuditLog, n: int = 5) -> None:
    for i in range(1, n + 1):
        log.record(
            f"ops-{i}", "operator", "token", "rollout.pause", params={"rollout": f"r-{i}"}, outcome="ok"
        )


def _sql(registry: Registry, statement: str, **params) -> None:
    """What someone with write access to the database does, behind the log's back."""
    with registry.engine.begin() as conn:
        conn.execute(text(statement), params)


def _expected_hash(prev: str, row: dict) -> str:
    """The documented definition, written out independently of the module."""
    fields = {k: row[k] for k in ("id", "at", "actor", "role", "via", "action", "params", "outcome")}
    body = json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256((prev + body).encode("ascii")).hexdigest()


def _tampered(log: AuditLog, row: int | None, tamper: Tamper) -> str:
    report = log.verify()
    assert not report.ok
    assert (report.row, report.tamper) == (row, tamper), report.problem
    with pytest.raises(AuditTamperedError) as err:
        report.raise_if_tampered()
    assert (err.value.row, err.value.tamper, err.value.role) == (row, tamper, "audit_log")
    assert "\n" not in str(err.value)
    return str(err.value)


# -- appending and reading --------------------------------------------------------------------
def test_record_then_entries_in_id_order_with_the_documented_hash(registry):
    log = AuditLog(registry)
    first = log.record(
        "alice", "operator", Via.TOKEN, AuditAction.DEVICE_ASSIGN, params={"device": "pi-01"}, outcome="ok"
    )
    second = log.record(
        "sso|bob",
        "viewer",
        "jwt",
        "rollout.abort",
        params={"rollout": "r-1", "reason": "é"},
        outcome=refused("operator role needed"),
    )
    third = AuditLog(registry.engine).record(  # an engine works as well as the registry
        local_actor(), "admin", "cli", "keys.rotate", params={}, outcome=failed("key file\nunreadable")
    )
    assert [first.id, second.id, third.id] == [1, 2, 3]
    assert third.actor.startswith("local:")
    assert third.outcome == "error: key file unreadable"  # one line
    assert second.params == '{"reason":"\\u00e9","rollout":"r-1"}'  # canonical: sorted, ASCII

    entries = log.entries()
    assert entries == [first, second, third]
    assert entries[1].as_dict()["params"] == {"reason": "é", "rollout": "r-1"}
    assert entries[0].at.endswith("+00:00")
    prev = GENESIS
    for entry in entries:
        assert entry.prev_hash == prev
        assert entry.hash == _expected_hash(prev, entry.__dict__)
        prev = entry.hash

    assert log.entries(action="rollout.abort") == [second]
    assert log.entries(since_id=1, limit=1) == [second]
    assert log.entries(limit=2, newest=True) == [second, third]
    with pytest.raises(UserInputError, match="limit must be 1-1000"):
        log.entries(limit=5000)

    report = log.verify()
    assert report.ok, report.problem
    assert (report.count, report.head_hash) == (3, third.hash)
    assert report.anchor == f"3:{third.hash}"
    report.raise_if_tampered()  # nothing to raise
    assert log.verify(anchor=(2, second.hash)).ok


def test_an_empty_log_verifies_with_the_genesis_hash(registry):
    report = AuditLog(registry).verify()
    assert (report.ok, report.count, report.head_hash) == (True, 0, GENESIS)


def test_a_fleet_database_from_before_the_audit_log_gains_it_on_open(db_url, monkeypatch):
    from ota_server import registry as registry_module

    monkeypatch.setattr(registry_module, "MIGRATIONS", registry_module.MIGRATIONS[:5])
    old = Registry.open(db_url)  # schema 5: no audit tables yet
    old.add_device("pi-01", "lab", "canary", "raspberry-pi-4")
    old.engine.dispose()
    monkeypatch.undo()
    upgraded = Registry.open(db_url)
    assert upgraded.schema_version() == len(registry_module.MIGRATIONS)
    log = AuditLog(upgraded)
    assert log.verify().count == 0
    assert (
        log.record("alice", "admin", "token", "device.remove", params={"device": "pi-01"}, outcome="ok").id
        == 1
    )
    assert upgraded.get("pi-01").group == "canary"
    upgraded.engine.dispose()


# -- tampering, named by row --------------------------------------------------------------------
@pytest.mark.parametrize(
    ("column", "value"),
    [("params", '{"rollout":"r-9"}'), ("actor", "mallory"), ("outcome", "ok "), ("at", "2020-01-01")],
)
def test_a_row_edited_with_raw_sql_is_named(registry, column, value):
    log = AuditLog(registry)
    _fill(log)
    _sql(registry, f"UPDATE audit_log SET {column} = :v WHERE id = 3", v=value)
    assert _tampered(log, 3, Tamper.EDITED) == "audit log row 3 edited: its hash does not match its fields"


def test_a_deleted_middle_row_is_named(registry):
    log = AuditLog(registry)
    _fill(log)
    _sql(registry, "DELETE FROM audit_log WHERE id = 3")
    assert _tampered(log, 3, Tamper.MISSING) == "audit log row 3 deleted (row 2 is followed by row 4)"


def test_deleted_oldest_rows_are_named(registry):
    log = AuditLog(registry)
    _fill(log)
    _sql(registry, "DELETE FROM audit_log WHERE id <= 2")
    assert "rows 1-2 deleted" in _tampered(log, 1, Tamper.MISSING)


def test_a_deleted_newest_row_is_caught_by_the_head(registry):
    log = AuditLog(registry)
    _fill(log)
    _sql(registry, "DELETE FROM audit_log WHERE id = 5")
    assert _tampered(log, 5, Tamper.TRUNCATED) == "audit log row 5 deleted: the newest rows are gone"
    _sql(registry, "DELETE FROM audit_log WHERE id >= 4")
    assert "rows 4-5 deleted" in _tampered(log, 4, Tamper.TRUNCATED)


def test_reordered_rows_are_named(registry):
    log = AuditLog(registry)
    _fill(log)
    _sql(registry, "UPDATE audit_log SET id = 100 WHERE id = 2")  # swap rows 2 and 3
    _sql(registry, "UPDATE audit_log SET id = 2 WHERE id = 3")
    _sql(registry, "UPDATE audit_log SET id = 3 WHERE id = 100")
    assert "row 2's prev_hash is not row 1's hash" in _tampered(log, 2, Tamper.RELINKED)


def test_a_row_rewritten_with_its_hash_recomputed_breaks_the_next_link(registry):
    log = AuditLog(registry)
    _fill(log)
    row = log.entries(since_id=2, limit=1)[0]
    forged = {**row.__dict__, "actor": "mallory"}
    _sql(
        registry,
        "UPDATE audit_log SET actor = 'mallory', hash = :h WHERE id = 3",
        h=_expected_hash(row.prev_hash, forged),
    )
    message = _tampered(log, 4, Tamper.RELINKED)
    assert "row 4's prev_hash is not row 3's hash" in message
    assert "row 3 rewritten" in message


def test_a_row_inserted_behind_the_head_is_named(registry):
    log = AuditLog(registry)
    _fill(log, 2)
    last = log.entries(newest=True, limit=1)[0]
    row = {**last.__dict__, "id": 3, "actor": "mallory", "prev_hash": last.hash}
    row["hash"] = _expected_hash(last.hash, row)
    _sql(
        registry,
        "INSERT INTO audit_log (id, at, actor, role, via, action, params, outcome, prev_hash, hash) "
        "VALUES (:id, :at, :actor, :role, :via, :action, :params, :outcome, :prev_hash, :hash)",
        **row,
    )
    assert "row 3 is past the head" in _tampered(log, 3, Tamper.PAST_HEAD)


def test_a_deleted_head_row_is_named_and_stops_appends(registry):
    log = AuditLog(registry)
    _fill(log, 2)
    _sql(registry, "DELETE FROM audit_head")
    assert "head row deleted" in _tampered(log, None, Tamper.HEAD)
    with pytest.raises(AuditTamperedError, match="head row is gone"):
        log.record("alice", "operator", "token", "device.add", params={}, outcome="ok")


def test_whole_chain_rewrite_passes_the_chain_but_not_an_outside_anchor(registry):
    """The documented limit: with write access, rewrite a row and every hash after it and the
    head, and the chain verifies; the ID:HASH an operator copied out earlier still catches it."""
    log = AuditLog(registry)
    _fill(log)
    anchor = log.verify().anchor
    rows = [dict(e.__dict__) for e in log.entries()]
    rows[1]["actor"] = "mallory"
    prev = GENESIS
    for row in rows:
        row["prev_hash"], row["hash"] = prev, _expected_hash(prev, row)
        prev = row["hash"]
        _sql(
            registry,
            "UPDATE audit_log SET actor = :actor, prev_hash = :prev_hash, hash = :hash WHERE id = :id",
            **row,
        )
    _sql(registry, "UPDATE audit_head SET last_hash = :h", h=prev)
    assert log.verify().ok  # undetectable from inside the database
    anchor_id, anchor_hash = anchor.split(":")
    report = log.verify(anchor=(int(anchor_id), anchor_hash))
    assert (report.ok, report.row, report.tamper) == (False, 5, Tamper.ANCHOR)
    assert "the log up to row 5 was rewritten" in (report.problem or "")
    assert log.verify(anchor=(9, anchor_hash)).tamper == Tamper.ANCHOR  # an anchor past the end


# -- several writers ------------------------------------------------------------------------------
def test_concurrent_appends_from_threads_keep_one_chain(registry):
    log = AuditLog(registry)
    start = threading.Barrier(8)
    errors: list[BaseException] = []

    def append(worker: int) -> None:
        try:
            start.wait()
            for i in range(20):
                log.record(f"w{worker}", "operator", "token", "device.assign", params={"i": i}, outcome="ok")
        except BaseException as e:  # reported below: a thread's exception is otherwise lost
            errors.append(e)

    threads = [threading.Thread(target=append, args=(w,)) for w in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert errors == []
    report = log.verify()
    assert (report.ok, report.count) == (True, 160), report.problem
    entries = log.entries(limit=1000)
    assert [e.id for e in entries] == list(range(1, 161))
    assert {e.actor for e in entries} == {f"w{w}" for w in range(8)}


_WRITER = """
import sys, time
from ota_server.audit import AuditLog
from ota_server.registry import Registry
url, start, n, who = sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
log = AuditLog(Registry.open(url))
time.sleep(max(0.0, start - time.time()))
for i in range(n):
    log.record(who, "operator", "token", "rollout.start", params={"i": i}, outcome="ok")
"""


def test_concurrent_appends_from_processes_keep_one_chain(registry, db_url):
    """Server replicas: separate processes, separate connections, one database."""
    start = time.time() + 3  # every writer is up before the first append
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    writers = [
        subprocess.Popen(
            [sys.executable, "-c", _WRITER, db_url, str(start), "25", f"replica-{w}"],
            cwd=ROOT,
            env=env,
            stderr=subprocess.PIPE,
            text=True,
        )
        for w in range(4)
    ]
    for writer in writers:
        _, stderr = writer.communicate(timeout=120)
        assert writer.returncode == 0, stderr
    report = AuditLog(registry).verify()
    assert (report.ok, report.count) == (True, 100), report.problem
    entries = AuditLog(registry).entries(limit=1000)
    assert {e.actor for e in entries} == {f"replica-{w}" for w in range(4)}
    if registry.engine.dialect.name == "postgresql":  # its lock queue is fair: the writers took turns
        actors = [e.actor for e in entries]
        assert sum(a != b for a, b in itertools.pairwise(actors)) > 3


# -- bounds ---------------------------------------------------------------------------------------
def test_params_are_bounded_and_an_oversized_request_is_still_recorded(registry):
    log = AuditLog(registry)
    big = log.record(
        "alice", "operator", "token", "release.publish", params={"blob": "x" * 100_000}, outcome="ok"
    )
    summary = big.as_dict()["params"]
    assert len(big.params) < 300
    assert summary["_omitted"] == f"params over {PARAMS_MAX_BYTES} bytes"
    assert summary["bytes"] > 100_000
    assert len(summary["sha256"]) == 64
    deep: dict = {}
    node = deep
    for _ in range(5000):  # deeper than json.dumps could recurse
        node["a"] = {}
        node = node["a"]
    nested = log.record("alice", "operator", "token", "release.publish", params=deep, outcome="ok")
    assert "nested deeper than" in nested.as_dict()["params"]["_omitted"]
    long = log.record("alice", "operator", "token", "release.publish", params={}, outcome=refused("y" * 5000))
    assert len(long.outcome) == 512
    assert log.verify().ok


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("action", "rollout.explode", "audit actions: device.add"),
        ("via", "carrier-pigeon", "via: token, jwt, cli"),
        ("role", "root", "not one of admin, operator, viewer"),
        ("actor", "", "1-256 printable"),
        ("actor", "a" * 257, "1-256 printable"),
        ("actor", "bob\nadmin", "1-256 printable"),
        ("outcome", "fine", "'ok', 'refused: REASON' or 'error: REASON'"),
        ("params", {"when": object()}, "must be JSON values"),
        ("params", {"x": float("nan")}, "must be JSON values"),
    ],
)
def test_a_bad_field_is_refused_and_leaves_the_chain_alone(registry, field, value, match):
    log = AuditLog(registry)
    _fill(log, 1)
    fields = {
        "actor": "alice",
        "role": "operator",
        "via": "token",
        "action": "device.add",
        "params": {},
        "outcome": "ok",
        field: value,
    }
    with pytest.raises(AuditFieldError, match=match):
        log.record(
            fields["actor"],
            fields["role"],
            fields["via"],
            fields["action"],
            params=fields["params"],
            outcome=fields["outcome"],
        )
    assert log.verify().count == 1


def test_the_servers_role_enum_is_recorded_by_name(registry):
    from ota_server.auth import Role

    entry = AuditLog(registry).record(
        "ci", Role.ADMIN, "token", "token.create", params={"name": "ci"}, outcome="ok"
    )
    assert entry.role == "admin"
