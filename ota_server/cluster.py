"""Server replicas sharing one registry: heartbeats, the rollout scheduler's lease, and who may
adopt a dead replica's broker session.

Any number of ``edgec server run`` processes share one PostgreSQL registry. Each has its own
broker login (``edgec-server``, ``edgec-server-2``, ...: client ids are bound to usernames) and
takes its share of the devices' messages through MQTT shared subscriptions. What must happen
once runs on the holder of a lease:

- **The rollout scheduler.** A lease row (``leases``) names its holder until ``expires_at``;
  the holder renews it every ``lease_s / 3`` from its heartbeat thread, and any replica takes
  it once it has expired. A replica that dies (``kill -9``, a lost host) is replaced within
  ``lease_s`` plus one heartbeat. Taking and renewing is one conditional ``UPDATE`` (atomic on
  PostgreSQL and SQLite); ``epoch`` counts the holders, for the logs and the operator.
- **Adopting a dead replica's session.** Mosquitto keeps routing a shared subscription's
  messages to a member whose persistent session is offline and queues them there, so a dead
  replica's share of the reports would wait until it came back. The lease holder connects
  with the dead replica's login (replicas share one broker secret), drains what was queued
  and keeps taking that share until the replica returns: its return takes the session back
  (the broker disconnects the adopter, which then stops).

Times are seconds since the epoch from the replicas' clocks, which must agree to well within
``lease_s`` (NTP). A holder that stalls longer than ``lease_s`` without dying can overlap
with its successor for one tick; the scheduler's writes are idempotent where that matters
(a device assigned twice gets two documents with different versions, from the registry).
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import text

from ota_server.registry import Registry

__all__ = ["Cluster", "Replica"]

logger = logging.getLogger(__name__)

SCHEDULER = "rollouts"  # the lease the rollout scheduler runs under


@dataclass(frozen=True)
class Replica:
    name: str
    mqtt_username: str
    host: str
    pid: int
    started_at: str
    beat_at: float
    alive: bool
    holds_scheduler: bool

    def as_dict(self) -> dict[str, object]:
        return dict(self.__dict__)


class Cluster:
    """This replica's view of the others, through the registry."""

    def __init__(
        self,
        registry: Registry,
        name: str,
        mqtt_username: str,
        lease_s: float = 10.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.registry = registry
        self.name = name
        self.mqtt_username = mqtt_username
        self.lease_s = lease_s
        self.clock = clock
        self._held_until = 0.0  # our lease, by our clock; 0 when not held

    def beat(self) -> None:
        """Say this replica is alive (and which login its broker session has)."""
        now = self.clock()
        row = {
            "n": self.name,
            "u": self.mqtt_username,
            "h": socket.gethostname()[:256],
            "p": os.getpid(),
            "s": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "b": now,
        }
        with self.registry.engine.begin() as conn:
            updated = conn.execute(
                text(
                    "UPDATE server_replicas SET mqtt_username = :u, host = :h, pid = :p, beat_at = :b "
                    "WHERE name = :n"
                ),
                row,
            ).rowcount
            if not updated:
                conn.execute(
                    text(
                        "INSERT INTO server_replicas (name, mqtt_username, host, pid, started_at, beat_at) "
                        "VALUES (:n, :u, :h, :p, :s, :b)"
                    ),
                    row,
                )

    def hold_lease(self, lease: str = SCHEDULER) -> bool:
        """Take ``lease`` if it is free or expired, renew it if it is ours; whether we hold it."""
        now = self.clock()
        with self.registry.engine.begin() as conn:
            taken = conn.execute(
                text(
                    "UPDATE leases SET holder = :me, expires_at = :until, "
                    "epoch = CASE WHEN holder = :me THEN epoch ELSE epoch + 1 END "
                    "WHERE name = :lease AND (holder = :me OR holder IS NULL OR expires_at < :now)"
                ),
                {"me": self.name, "until": now + self.lease_s, "lease": lease, "now": now},
            ).rowcount
        was_held = self.holds(lease)
        self._held_until = now + self.lease_s if taken else 0.0
        if taken and not was_held:
            logger.info("replica %s holds the %s lease (epoch %d)", self.name, lease, self.epoch(lease))
        elif was_held and not taken:
            logger.warning("replica %s lost the %s lease", self.name, lease)
        return bool(taken)

    def holds(self, lease: str = SCHEDULER) -> bool:
        """Whether our lease is still ours by our own clock (renewed and not yet expired)."""
        return self.clock() < self._held_until

    def epoch(self, lease: str = SCHEDULER) -> int:
        with self.registry.engine.connect() as conn:
            return int(
                conn.execute(text("SELECT epoch FROM leases WHERE name = :l"), {"l": lease}).scalar_one()
            )

    def release(self, lease: str = SCHEDULER) -> None:
        """Give the lease up at once (a clean stop), so another replica need not wait for it."""
        with self.registry.engine.begin() as conn:
            conn.execute(
                text("UPDATE leases SET holder = NULL, expires_at = 0 WHERE name = :l AND holder = :me"),
                {"l": lease, "me": self.name},
            )
        self._held_until = 0.0

    def leave(self) -> None:
        """Remove this replica's row (a clean stop)."""
        with self.registry.engine.begin() as conn:
            conn.execute(text("DELETE FROM server_replicas WHERE name = :n"), {"n": self.name})

    def replicas(self) -> list[Replica]:
        now = self.clock()
        with self.registry.engine.connect() as conn:
            holder = conn.execute(
                text("SELECT holder FROM leases WHERE name = :l AND expires_at >= :now"),
                {"l": SCHEDULER, "now": now},
            ).scalar()
            rows = conn.execute(text("SELECT * FROM server_replicas ORDER BY name")).all()
        return [
            Replica(
                name=r.name,
                mqtt_username=r.mqtt_username,
                host=r.host,
                pid=r.pid,
                started_at=r.started_at,
                beat_at=float(r.beat_at),
                alive=now - float(r.beat_at) <= self.lease_s,
                holds_scheduler=r.name == holder,
            )
            for r in rows
        ]

    def others_alive(self) -> bool:
        return any(r.alive and r.name != self.name for r in self.replicas())

    def dead_logins(self) -> list[str]:
        """The broker logins of replicas whose heartbeat stopped (not ours, not a live one's)."""
        replicas = self.replicas()
        live = {r.mqtt_username for r in replicas if r.alive} | {self.mqtt_username}
        return sorted({r.mqtt_username for r in replicas if not r.alive} - live)
