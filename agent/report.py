"""What a device tells the operator: its retained state and its install events, on its own
topics. Events raised while the broker is away wait (bounded) and go out in order when it is
back; the last state is published again on every connection (the broker's will replaced it
with ``offline`` while the device was away).

Every report is built as its wire model (``edgec.reports.Event``, ``DeviceState``) and so
checked against the contract the server reads before it leaves; the JSON is the model's, with
unset fields left out (a reader takes a missing field as null)."""

from __future__ import annotations

import collections
import datetime as dt
import json
import logging
import threading
from typing import Any

import paho.mqtt.client as mqtt

from edgec.reports import DeviceState, DeviceStatus, Event, EventKind

__all__ = ["MqttReporter", "install_event", "offline_state", "state_report", "wire_json"]

logger = logging.getLogger(__name__)


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")


def install_event(kind: EventKind, release: str | None, detail: str | None = None, **figures: Any) -> Event:
    """An event as the contract reads it, stamped now (``step`` and figures ride in ``figures``)."""
    return Event.model_validate(
        {"event": kind, "release": release, "detail": detail, "at": _now(), **figures}
    )


def state_report(status: DeviceStatus, installed: str | None, detail: str | None = None) -> DeviceState:
    """The device's retained state as the contract reads it (an empty detail is left out)."""
    return DeviceState(status=status, installed=installed, detail=detail or None, at=_now())


def offline_state() -> str:
    """The retained state the broker publishes for the device when its connection goes (its will)."""
    return wire_json(DeviceState(status=DeviceStatus.OFFLINE))  # no time: the broker sends it later


def wire_json(report: Event | DeviceState) -> str:
    """A report as it goes on the wire: JSON of the model, unset (null) fields left out."""
    return json.dumps(report.model_dump(mode="json", exclude_none=True))


class MqttReporter:
    """The install pipeline's ``Reporter`` over MQTT (``agent.install.Reporter``)."""

    def __init__(self, client: mqtt.Client, topics: dict[str, str], max_waiting: int = 1000) -> None:
        self.client = client
        self.topics = topics
        self.last_state: bytes | None = None
        self._waiting: collections.deque[str] = collections.deque(maxlen=max_waiting)
        self._lock = threading.Lock()

    def event(self, kind: EventKind, release: str | None, detail: str | None = None, **figures: Any) -> None:
        body = wire_json(install_event(kind, release, detail, **figures))
        logger.info("event %s %s %s", kind, release or "", detail or "")
        with self._lock:
            self._waiting.append(body)
            if self.client.is_connected():
                self._send_waiting()

    def state(self, status: DeviceStatus, installed: str | None, detail: str | None = None) -> None:
        self.last_state = wire_json(state_report(status, installed, detail)).encode()
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
