"""``edgec audit ls|verify`` as an operator runs it, on a SQLite fleet database that is
tampered with behind the log's back: the real command line in a subprocess."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from edgec.errors import EXIT_BAD_INPUT, EXIT_OK, EXIT_TARGET_FAILED
from ota_server.audit import AuditLog, entry_hash, refused
from ota_server.registry import Registry
from tests._cli import run_edgec


@pytest.fixture
def fleet_db(tmp_path) -> tuple[str, Path]:
    """A fleet database with three audit entries; its URL and file."""
    path = tmp_path / "fleet.db"
    registry = Registry.open(f"sqlite:///{path}")
    log = AuditLog(registry)
    log.record("alice", "operator", "token", "device.assign", params={"device": "pi-01"}, outcome="ok")
    log.record("bob", "viewer", "jwt", "rollout.pause", params={"rollout": "r-1"}, outcome=refused("viewer"))
    log.record("local:root", "admin", "cli", "keys.rotate", params={}, outcome="ok")
    registry.engine.dispose()
    return f"sqlite:///{path}", path


def _sql(path: Path, statement: str, *params: object) -> None:
    with sqlite3.connect(path) as conn:
        conn.execute(statement, params)


def test_verify_prints_the_count_and_the_head_and_ls_lists(fleet_db):
    url, _ = fleet_db
    ok = run_edgec("audit", "verify", "--db", url)
    assert ok.returncode == EXIT_OK, ok.stderr
    head = AuditLog(Registry.open(url)).entries(newest=True, limit=1)[0]
    assert ok.stdout.splitlines()[:2] == ["audit log ok: 3 entries", f"head 3:{head.hash}"]

    listed = run_edgec("audit", "ls", "--json", "--limit", "2", "--db", url)
    assert listed.returncode == EXIT_OK, listed.stderr
    assert [(e["id"], e["actor"], e["params"]) for e in listed.json()] == [
        (2, "bob", {"rollout": "r-1"}),
        (3, "local:root", {}),
    ]
    only = run_edgec("audit", "ls", "--action", "device.assign", "--db", url)
    assert only.returncode == EXIT_OK, only.stderr
    assert "alice" in only.stdout
    assert "bob" not in only.stdout

    anchored = run_edgec("audit", "verify", "--anchor", f"3:{head.hash}", "--db", url)
    assert anchored.returncode == EXIT_OK, anchored.stderr
    assert "row 3 matches the anchor" in anchored.stdout


def test_verify_names_a_row_edited_in_the_database(fleet_db):
    url, path = fleet_db
    _sql(path, "UPDATE audit_log SET actor = 'mallory' WHERE id = 2")
    result = run_edgec("audit", "verify", "--db", url)
    assert result.returncode == EXIT_TARGET_FAILED
    assert result.stderr == "edgec: error: audit log row 2 edited: its hash does not match its fields\n"
    assert result.stdout == ""


def test_verify_names_a_deleted_row(fleet_db):
    url, path = fleet_db
    _sql(path, "DELETE FROM audit_log WHERE id = 2")
    result = run_edgec("audit", "verify", "--db", url)
    assert result.returncode == EXIT_TARGET_FAILED
    assert result.stderr == "edgec: error: audit log row 2 deleted (row 1 is followed by row 3)\n"


def test_verify_names_the_deleted_newest_row(fleet_db):
    url, path = fleet_db
    _sql(path, "DELETE FROM audit_log WHERE id = 3")
    result = run_edgec("audit", "verify", "--db", url)
    assert result.returncode == EXIT_TARGET_FAILED
    assert result.stderr == "edgec: error: audit log row 3 deleted: the newest rows are gone\n"


def test_a_rewritten_chain_is_caught_by_the_anchor_kept_outside(fleet_db):
    url, path = fleet_db
    anchor = run_edgec("audit", "verify", "--db", url).stdout.splitlines()[1].removeprefix("head ")
    entries = AuditLog(Registry.open(url)).entries()
    prev = "0" * 64
    for entry in entries:  # rewrite row 1 and re-chain everything after it, head included
        row = {**entry.__dict__, "actor": "mallory" if entry.id == 1 else entry.actor, "prev_hash": prev}
        prev = entry_hash(prev, row)
        _sql(
            path,
            "UPDATE audit_log SET actor = ?, prev_hash = ?, hash = ? WHERE id = ?",
            row["actor"],
            row["prev_hash"],
            prev,
            entry.id,
        )
    _sql(path, "UPDATE audit_head SET last_hash = ?", prev)
    assert run_edgec("audit", "verify", "--db", url).returncode == EXIT_OK  # the documented limit
    caught = run_edgec("audit", "verify", "--anchor", anchor, "--db", url)
    assert caught.returncode == EXIT_TARGET_FAILED
    assert caught.stderr.startswith("edgec: error: audit log row 3's hash ")
    assert "the log up to row 3 was rewritten" in caught.stderr


def test_a_malformed_anchor_is_bad_input(fleet_db):
    url, _ = fleet_db
    result = run_edgec("audit", "verify", "--anchor", "three:abc", "--db", url)
    assert result.returncode == EXIT_BAD_INPUT
    assert "expected ID:HASH" in result.stderr
