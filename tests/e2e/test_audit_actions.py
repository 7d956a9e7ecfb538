"""Every operator action leaves one audit entry, from whichever side it came: the API (a
token's name, its role), the dashboard, and the commands run on the server host (the OS user,
via cli). The real server process, a real Mosquitto, the real command line; then an edit of
one row in the database makes ``edgec audit verify`` fail and name it."""

from __future__ import annotations

import sqlite3
from collections import Counter

import pytest

from tests._fleet import Fleet, up
from tests._services import needs_mosquitto

pytestmark = [pytest.mark.slow, needs_mosquitto]


def test_every_operator_action_leaves_one_entry_and_an_edit_is_named(fleet: Fleet, releases):
    fleet.add_agent("pi-1")  # devices add
    viewer_token, grant = fleet.new_token("viewer", "viewer-1")  # server token (and the operator's below)
    fleet.write_server_config([grant])
    up(fleet)
    fleet.publish(releases["1.0.0"], releases["2.0.0"])  # one publish of two bundles
    fleet.assign("pi-1", "digits:1.0.0")  # through the API, as the operator token
    rollout = fleet.rollout("digits:2.0.0", "--group", "g", "--waves", "100%", "--bake", "1h")
    for action in ("pause", "resume", "abort", "rollback"):
        fleet.steer(rollout, action)
    refused = fleet.edgec("rollout", "pause", "r-nope", *fleet.api_args(), check=False)
    assert refused.returncode != 0
    fleet.edgec("keys", "rotate", "timestamp", *fleet.repo_args())
    fleet.edgec("devices", "remove", "pi-1")

    entries = fleet.edgec("audit", "ls", "--json", "--limit", "100", show=False).json()
    actions = Counter(e["action"] for e in entries)
    assert actions == {
        "device.add": 1,
        "token.create": 2,  # the viewer's and the operator's
        "release.publish": 1,
        "device.assign": 1,
        "rollout.start": 1,
        "rollout.pause": 2,  # one ok, one refused
        "rollout.resume": 1,
        "rollout.abort": 1,
        "rollout.rollback": 1,
        "keys.rotate": 1,
        "device.remove": 1,
    }, actions
    by_api = [e for e in entries if e["via"] == "token"]
    assert {e["actor"] for e in by_api} == {"operator"}  # the token's name, never the token
    assert {e["role"] for e in by_api} == {"operator"}
    assert all(e["actor"].startswith("local:") and e["via"] == "cli" for e in entries if e not in by_api)
    assign = next(e for e in entries if e["action"] == "device.assign")
    assert assign["params"] == {"device": "pi-1", "release": "digits:1.0.0", "action": "install"}
    start = next(e for e in entries if e["action"] == "rollout.start")
    assert start["params"]["rollout"] == rollout
    assert start["outcome"] == "ok"
    pauses = [e["outcome"] for e in entries if e["action"] == "rollout.pause"]
    assert pauses[0] == "ok"
    assert pauses[1].startswith("refused: ")
    assert "r-nope" in pauses[1]
    for e in entries:
        assert fleet.token not in str(e)
        assert viewer_token not in str(e)

    verified = fleet.edgec("audit", "verify", show=False)
    assert f"{len(entries)} entries" in verified.stdout

    # someone with the database edits who assigned the release: verify names that row
    with sqlite3.connect(fleet.db.removeprefix("sqlite:///")) as db:
        db.execute("UPDATE audit_log SET actor = 'someone-else' WHERE id = ?", (assign["id"],))
    tampered = fleet.edgec("audit", "verify", check=False, show=False)
    assert tampered.returncode != 0
    assert f"row {assign['id']}" in tampered.stderr, tampered.stderr
