"""What the simulated devices report, counted as it happens, and the fleet's summary of it."""

from __future__ import annotations

import collections
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from edgec.reports import DeviceStatus, EventKind

if TYPE_CHECKING:
    from sim.device import SimulatedDevice

__all__ = ["FleetSummary", "Tally"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FleetSummary:
    devices: int
    connected: int
    installed: dict[str, int]  # committed release NAME:VERSION ("-": none yet) -> devices
    statuses: dict[str, int]  # last reported status (a DeviceStatus) -> devices
    events: dict[str, int]  # events since start, by kind (an EventKind: committed, refused, ...)
    failed: int  # devices whose latest install ended refused (or with an error)
    installs_waiting: int  # devices queued for, or in, an install
    broker_refusals: int  # connections the broker refused (credentials it does not know?)

    def line(self) -> str:
        installed = ", ".join(f"{release} {n}" for release, n in sorted(self.installed.items())) or "-"
        events = " ".join(
            f"{kind} {self.events.get(kind, 0)}"
            for kind in (EventKind.COMMITTED, EventKind.REFUSED, EventKind.RETRYING)
        )
        text = (
            f"connected {self.connected}/{self.devices} | installed: {installed} | "
            f"installing {self.installs_waiting} | {events} | failed {self.failed}"
        )
        if self.broker_refusals:
            text += f" | broker refused {self.broker_refusals} logins"
        return text


class Tally:
    """What the devices report, counted as it happens (summaries and waits cost nothing)."""

    def __init__(self, count: int) -> None:
        self._changed = threading.Condition()
        self.devices = count
        self._connected = [False] * count
        self._installed: list[str | None] = [None] * count
        self._status: list[str] = [DeviceStatus.NEW] * count
        self._failed = [False] * count
        self.installed = collections.Counter({"-": count})
        self.events: collections.Counter[str] = collections.Counter()  # by EventKind
        self.connected_count = 0
        self.broker_refusals = 0
        self.last_refusal: str | None = None

    def connected(self, device: SimulatedDevice, up: bool) -> None:
        with self._changed:
            if self._connected[device.index] != up:
                self._connected[device.index] = up
                self.connected_count += 1 if up else -1
                self._changed.notify_all()

    def refused(self, _device: SimulatedDevice, reason: str) -> None:
        with self._changed:
            self.broker_refusals += 1
            self.last_refusal = reason

    def state(self, device: SimulatedDevice, status: DeviceStatus, installed: str | None) -> None:
        with self._changed:
            old = self._installed[device.index]
            if old != installed:
                self.installed[old or "-"] -= 1
                self.installed[installed or "-"] += 1
                self._installed[device.index] = installed
            self._status[device.index] = status
            self._changed.notify_all()

    def event(self, device: SimulatedDevice, kind: EventKind) -> None:
        with self._changed:
            self.events[kind] += 1
            if kind == EventKind.COMMITTED:
                self._failed[device.index] = False
            elif kind in (EventKind.REFUSED, EventKind.ERROR):
                self._failed[device.index] = True
            self._changed.notify_all()

    def wait(self, predicate: Callable[[], bool], timeout_s: float) -> bool:
        with self._changed:
            return self._changed.wait_for(predicate, timeout_s)

    def summary(self, installs_waiting: int) -> FleetSummary:
        with self._changed:
            return FleetSummary(
                devices=self.devices,
                connected=self.connected_count,
                installed={k: v for k, v in self.installed.items() if v},
                statuses=dict(collections.Counter(self._status)),
                events=dict(self.events),
                failed=sum(self._failed),
                installs_waiting=installs_waiting,
                broker_refusals=self.broker_refusals,
            )
