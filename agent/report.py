"""What a device tells the operator: its retained state and its install events, on its own
topics. Events raised while the broker is away wait (bounded) and go out in order when it is
back; the last state is published again on every connection (the broker's will replaced it
with ``offline`` while the device was away)."""

from __future__ import annotations

import collections
import datetime as dt
import json
import logging
import threading
from typing import Any

import paho.mqtt.client as mqtt

__all__ = ["MqttReporter"]

logger = logging.getLogger(__name__)


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")


class MqttReporter:
    """The install pipeline's ``Reporter`` over MQTT (``agent.install.Reporter``)."""

    def __init__(self, client: mqtt.Client, topics: dict[str, str], max_waiting: int = 1000) -> None:
        self.client = client
        self.topics = topics
        self.last_state: bytes | None = None
        self._waiting: collections.deque[str] = collections.deque(maxlen=max_waiting)
        self._lock = threading.Lock()

    def event(self, kind: str, release: str | None, detail: str | None = None, **figures: Any) -> None:
        body = {"event": kind, "release": release, "detail": detail, "at": _now(), **figures}
        logger.info("event %s %s %s", kind, release or "", detail or "")
        with self._lock:
            self._waiting.append(json.dumps(body))
            if self.client.is_connected():
                self._send_waiting()

    def state(self, status: str, installed: str | None, detail: str | None = None) -> None:
        body = {"status": status, "installed": installed}
        if detail:
            body["detail"] = detail
        self.last_state = json.dumps(body).encode()
        self.client.publish(self.topics["state"], self.last_state, qos=1, retain=True)

    def connected(self) -> None:
        """Call from the client's on_connect."""
        with self._lock:
            self._send_waiting()
            if self.last_state is not None:
                self.client.publish(self.topics["state"], self.last_state, qos=1, retain=True)

    def _send_waiting(self) -> None:
        while self._waiting:
            info = self.client.publish(self.topics["events"], self._waiting[0], qos=1)
            if info.rc != mqtt.MQTT_ERR_SUCCESS:
                return
            self._waiting.popleft()
