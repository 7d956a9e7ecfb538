"""Broker sessions of dead server replicas, taken over by the scheduler lease's holder.

Mosquitto keeps handing a dead replica its share of the shared subscriptions' messages and
queues them in its persistent session. Connecting with the dead replica's login (client ids
are bound to usernames, and the replicas share one secret) resumes that session: what was
queued, and what it had not acknowledged, arrives here and is handled like our own messages.
When the replica comes back, its connection takes the session over; the broker drops ours,
which then stops (never reconnects: that would take the session back from its owner)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from typing import Any

import paho.mqtt.client as mqtt

__all__ = ["AdoptedSessions"]

logger = logging.getLogger(__name__)


class AdoptedSessions:
    """``make(login)`` returns a configured, unconnected client for that login (manual acks,
    the server's message callbacks); ``update(logins)`` keeps exactly those sessions adopted."""

    def __init__(self, make: Callable[[str], mqtt.Client], host: str, port: int) -> None:
        self.make = make
        self.host = host
        self.port = port
        self._clients: dict[str, mqtt.Client] = {}
        self._ended: set[str] = set()  # dropped by the broker: their owner is back
        self._lock = threading.Lock()

    @property
    def logins(self) -> list[str]:
        with self._lock:
            return sorted(self._clients)

    def update(self, logins: Iterable[str]) -> None:
        wanted = set(logins)
        with self._lock:
            for login in sorted(set(self._clients) - wanted | self._ended):
                self._stop(login)
            for login in sorted(wanted - set(self._clients)):
                self._adopt(login)

    def close(self) -> None:
        with self._lock:
            for login in list(self._clients):
                self._stop(login)

    def _adopt(self, login: str) -> None:
        client = self.make(login)

        def ended(_c: Any, _u: Any, _flags: Any, reason: Any, _props: Any = None) -> None:
            logger.info(
                "the session of replica login %s was taken back (%s); stopped draining it", login, reason
            )
            self._ended.add(login)  # no lock: update() may be joining this thread while holding it
            client.disconnect()  # no reconnect: the session is its owner's again

        def connected(_c: Any, _u: Any, _flags: Any, reason: Any, _props: Any = None) -> None:
            if reason.is_failure:
                logger.error("cannot take over the session of replica login %s: %s", login, reason)
                client.disconnect()
            else:
                logger.warning("took over the broker session of dead replica login %s", login)

        client.on_connect = connected
        client.on_disconnect = ended
        try:
            client.connect(self.host, self.port)
        except OSError as e:
            logger.error("cannot reach the broker to take over replica login %s: %s", login, e)
            return
        client.loop_start()
        self._clients[login] = client

    def _stop(self, login: str) -> None:
        client = self._clients.pop(login, None)
        self._ended.discard(login)
        if client is None:
            return
        client.on_disconnect = None
        client.disconnect()
        client.loop_stop()
