"""Server replicas through the registry (``ota_server.cluster``): the scheduler's lease, the
heartbeats and the dead replicas whose broker sessions the lease holder drains; on SQLite and
a real PostgreSQL, with a clock the test moves."""

from __future__ import annotations

import threading

import pytest

from edgec.errors import UserInputError
from ota_server.cluster import Cluster
from ota_server.logins import is_server_login, server_logins
from ota_server.registry import Registry


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def registry(db_url):
    registry = Registry.open(db_url)
    yield registry
    registry.engine.dispose()


def _replicas(registry: Registry, clock: Clock, count: int = 3, lease_s: float = 10.0) -> list[Cluster]:
    logins = server_logins(count)
    return [Cluster(registry, login, login, lease_s, clock=clock) for login in logins]


def test_one_replica_holds_the_lease_and_renews_it(registry):
    clock = Clock()
    a, b, c = _replicas(registry, clock)
    assert a.hold_lease()
    assert not b.hold_lease()
    assert not c.hold_lease()
    for _ in range(5):  # renewed within its term: still a's, the others still refused
        clock.now += 3
        assert a.hold_lease()
        assert not b.hold_lease()
    assert a.epoch() == 1


def test_a_dead_holders_lease_is_taken_once_it_expires(registry):
    clock = Clock()
    a, b, _ = _replicas(registry, clock)
    assert a.hold_lease()
    clock.now += 9.9  # a died: no renewal; not yet expired
    assert not b.hold_lease()
    clock.now += 0.2
    assert b.hold_lease()
    assert b.epoch() == 2
    assert not a.holds()  # a's own clock says its term is over too
    assert not a.hold_lease()  # a came back: b holds it now


def test_a_clean_stop_hands_the_lease_over_at_once(registry):
    clock = Clock()
    a, b, _ = _replicas(registry, clock)
    assert a.hold_lease()
    a.release()
    assert b.hold_lease()


def test_replicas_race_for_a_free_lease_and_one_wins(registry):
    clock = Clock()
    clusters = _replicas(registry, clock, count=8)
    won: list[str] = []
    barrier = threading.Barrier(len(clusters))

    def race(cluster: Cluster) -> None:
        barrier.wait()
        if cluster.hold_lease():
            won.append(cluster.name)

    threads = [threading.Thread(target=race, args=(c,)) for c in clusters]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1


def test_dead_replicas_are_those_whose_heartbeat_stopped(registry):
    clock = Clock()
    a, b, c = _replicas(registry, clock)
    for cluster in (a, b, c):
        cluster.beat()
    assert a.dead_logins() == []
    clock.now += 6
    a.beat()
    b.beat()  # c stopped beating
    clock.now += 6
    a.beat()
    b.beat()
    assert a.dead_logins() == ["edgec-server-3"]
    assert a.others_alive()
    c.beat()  # back: no longer dead
    assert a.dead_logins() == []
    c.leave()  # a clean stop: gone from the list
    assert [r.name for r in a.replicas()] == ["edgec-server", "edgec-server-2"]


def test_the_replica_list_names_the_scheduler(registry):
    clock = Clock()
    a, b, _ = _replicas(registry, clock)
    a.beat()
    b.beat()
    b.hold_lease()
    holding = {r.name: r.holds_scheduler for r in a.replicas()}
    assert holding == {"edgec-server": False, "edgec-server-2": True}


def test_a_device_cannot_take_a_server_replicas_login(registry):
    assert server_logins(3) == ["edgec-server", "edgec-server-2", "edgec-server-3"]
    assert is_server_login("edgec-server-17")
    assert not is_server_login("edgec-server-x")
    for login in ("edgec-server", "edgec-server-2", "edgec-server-64"):
        with pytest.raises(UserInputError, match="server replica's login"):
            registry.add_device(login, "lab", "g", "x86-64-cpu")
