"""The dashboard's sign-in sessions in the registry (``ota_server.dashboard.sessions``): any
replica honours a session another created, signing out ends it everywhere, and the rows hold
no session id a database reader could ride; on SQLite and a real PostgreSQL."""

from __future__ import annotations

import pytest
from sqlalchemy import event, text

from ota_server.auth import Principal, Role
from ota_server.dashboard.sessions import TOUCH_EVERY_S, SessionStore
from ota_server.registry import Registry

OPERATOR = Principal("alice", Role.OPERATOR)


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def registry(db_url):
    registry = Registry.open(db_url)
    yield registry
    registry.engine.dispose()


def test_a_session_made_on_one_replica_is_honoured_on_another(registry):
    a, b = SessionStore(registry), SessionStore(registry)  # two replicas on one registry
    sid, made = a.create(OPERATOR)
    found = b.get(sid)
    assert found is not None
    assert (found.principal.name, found.principal.role) == ("alice", Role.OPERATOR)
    assert found.csrf_ok(made.csrf)  # the page's CSRF token from replica A passes on B
    assert not found.csrf_ok("forged")
    a.drop(sid)  # signing out on A ends it on B
    assert b.get(sid) is None


def test_the_registry_holds_no_session_id(registry):
    store = SessionStore(registry)
    sid, _ = store.create(OPERATOR)
    with registry.engine.connect() as conn:
        rows = [tuple(map(str, row)) for row in conn.execute(text("SELECT * FROM dashboard_sessions"))]
    assert len(rows) == 1
    assert not any(sid in value for value in rows[0])


def test_unknown_or_oversized_cookies_are_refused(registry):
    store = SessionStore(registry)
    store.create(OPERATOR)
    assert store.get("not-a-session") is None
    assert store.get("x" * 10_000) is None
    assert store.get(None) is None


def test_sessions_end_at_their_age_their_idle_time_and_a_jwts_expiry(registry):
    clock = Clock()
    store = SessionStore(registry, max_age_s=3600, idle_s=600, clock=clock)
    old, _ = store.create(OPERATOR)
    idle, _ = store.create(OPERATOR)
    jwt, _ = store.create(Principal("bob", Role.VIEWER, "jwt", clock.now + 120), clock.now + 120)
    clock.now += 100
    assert store.get(jwt) is not None
    clock.now += 100
    assert store.get(jwt) is None  # its JWT expired after 120 s
    for _ in range(7):  # `old` is used every 500 s: never idle for long
        assert store.get(old) is not None
        clock.now += 500
    assert store.get(old) is None  # an hour is its age
    assert store.get(idle) is None  # unused for longer than 600 s


def test_last_use_is_written_at_most_once_a_minute(registry):
    clock = Clock()
    store = SessionStore(registry, clock=clock)
    sid, _ = store.create(OPERATOR)
    writes: list[str] = []
    event.listen(
        registry.engine,
        "before_cursor_execute",
        lambda _c, _cur, sql, *_: writes.append(sql) if sql.startswith("UPDATE") else None,
    )
    for _ in range(90):  # a page polling every 2 s for three minutes
        clock.now += 2
        assert store.get(sid) is not None
    assert 1 <= len(writes) <= 90 * 2 / TOUCH_EVERY_S  # not 90


def test_the_oldest_sessions_go_beyond_the_bound(registry):
    clock = Clock()
    store = SessionStore(registry, max_sessions=3, clock=clock)
    made = []
    for _ in range(5):
        clock.now += 1
        made.append(store.create(OPERATOR)[0])
    assert [store.get(sid) is not None for sid in made] == [False, False, True, True, True]
