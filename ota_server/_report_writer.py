"""Device reports written to the registry in batches, acknowledged once committed.

The broker's network thread parses and validates each report (``ota_server.ingest``) and hands
it here; one writer thread takes what has arrived (up to ``max_batch``, waiting ``linger_s``
after the first) and writes it in one transaction: the last state per device, every telemetry
window (a window already kept is skipped: QoS 1 may deliver twice), the newest window as the
device's latest, ``last_seen``; then the rollouts take the batch's install events. Only then
is each message acknowledged to the broker (MQTT manual acks), so a server that dies before
its commit gets the messages again from its persistent session: a report is never lost
between the broker and the registry. Every write is idempotent, so a batch written twice (a
crash between commit and ack) changes nothing.

A batch that fails on a database error waits and is tried again (the unacknowledged messages
hold the broker back: back-pressure, nothing dropped); any other failure splits the batch so
that only the report that cannot be written is dropped, counted and acknowledged.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import bindparam, text
from sqlalchemy.exc import OperationalError

from edgec._time import utc_moment
from edgec.reports import DeviceState, Event, Telemetry
from ota_server.registry import MAX_IN_LIST, Registry

__all__ = ["Received", "ReportWriter"]

logger = logging.getLogger(__name__)

RETRY_S = 1.0  # after a database error, before the batch is tried again
REORDER_S = 60.0  # how far apart two of one device's states can be written out of order


@dataclass(frozen=True)
class Received:
    """One validated report, with how to acknowledge its message."""

    topic: str
    device: str
    report: DeviceState | Telemetry | Event
    at: str  # the server's clock when it arrived (ISO 8601, UTC)
    ack: Callable[[], object]


def state_time(at: str | None) -> str | None:
    """A device's state time in one form (UTC, milliseconds), so that times compare as text;
    None when there is none or it does not read as a time (the state is then written as it comes)."""
    moment = utc_moment(at)
    return None if moment is None else moment.isoformat(timespec="milliseconds")


def _later(at: str | None, seconds: float) -> str | None:
    if at is None:
        return None
    return (dt.datetime.fromisoformat(at) + dt.timedelta(seconds=seconds)).isoformat(timespec="milliseconds")


def overtaken(at: str | None, stored: str | None) -> bool:
    """Whether a state stamped ``at`` arrived after one stamped ``stored`` that is newer, by
    less than ``REORDER_S``: two replicas wrote one device's states out of order. A state older
    by more is the device's clock going back (a Pi without a real-time clock, corrected by
    NTP), and is written: a device whose clock jumped can never freeze its own status."""
    if at is None or stored is None or stored <= at:
        return False
    return stored <= (_later(at, REORDER_S) or "")


def is_newer(stored: dict[str, Any] | None, window: dict[str, Any]) -> bool:
    """A window sent twice (QoS 1 is at least once) or late must not replace a newer one;
    a device whose counter restarted (a new state folder) has newer windows, not higher seqs."""
    if not stored or window.get("seq") is None or stored.get("seq") is None:
        return True
    return window["seq"] > stored["seq"] or (window.get("ended_at") or "") > stored.get("ended_at", "")


class ReportWriter:
    """``put`` from any thread; ``start``, ``stop`` (writes what was taken). ``on_events`` gets
    each batch's events as ``(device, event dict)``; ``drop(topic, why, reason)`` counts a
    report that could not be written."""

    def __init__(
        self,
        registry: Registry,
        on_events: Callable[[list[tuple[str, dict[str, Any]]]], None],
        drop: Callable[[str, str, str], Any],
        *,
        max_batch: int = 1000,
        linger_s: float = 0.1,  # a report is in the registry within this of arriving (when idle)
        max_waiting: int = 20_000,
    ) -> None:
        self.registry = registry
        self.on_events = on_events
        self.drop = drop
        self.max_batch = max_batch
        self.linger_s = linger_s
        self._queue: queue.Queue[Received | None] = queue.Queue(max_waiting)  # full: the network waits
        self._thread = threading.Thread(target=self._run, name="report-writer", daemon=True)
        self._stopping = threading.Event()
        self.batches = 0
        self.written = 0

    def put(self, item: Received) -> None:
        self._queue.put(item)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        self._stopping.set()
        self._queue.put(None)
        if self._thread.is_alive():
            self._thread.join(timeout_s)

    def drain(self) -> None:
        """Write what is waiting, on the caller's thread (a writer that was never started)."""
        batch = []
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                batch.append(item)
        if batch:
            self._write_all(batch)

    def _take(self) -> list[Received] | None:
        first = self._queue.get()
        if first is None:
            return None
        batch = [first]
        deadline = time.monotonic() + self.linger_s
        while len(batch) < self.max_batch:
            try:
                item = self._queue.get(timeout=max(deadline - time.monotonic(), 0.0))
            except queue.Empty:
                break
            if item is None:
                self._stopping.set()
                break
            batch.append(item)
        return batch

    def _run(self) -> None:
        while (batch := self._take()) is not None:
            self._write_all(batch)
            if self._stopping.is_set() and self._queue.empty():
                break

    def _write_all(self, batch: list[Received]) -> None:
        while True:
            try:
                self.write(batch)
                break
            except OperationalError as e:  # the database is away: wait, the broker holds the rest
                if self._stopping.is_set():
                    logger.warning(
                        "stopping with %d reports unwritten (the broker sends them again)", len(batch)
                    )
                    return
                logger.warning("cannot write %d reports (%s); trying again", len(batch), str(e.orig)[:200])
                time.sleep(RETRY_S)
            except Exception:
                if len(batch) == 1:
                    item = batch[0]
                    if self.drop(item.topic, "unexpected failure (traceback follows)", "failed"):
                        logger.exception("could not write the report on %s", item.topic[:200])
                    break
                middle = len(batch) // 2
                self._write_all(batch[:middle])
                self._write_all(batch[middle:])
                return
        for item in batch:
            item.ack()

    def write(self, batch: list[Received]) -> None:
        """Write ``batch`` in one transaction, then hand its events to the rollouts."""
        # the stored latest windows, where windows came (an unknown device's are dropped; its
        # states and events change no row)
        windowed = sorted({item.device for item in batch if isinstance(item.report, Telemetry)})
        stored = self._stored_telemetry(windowed) if windowed else {}
        states: dict[str, dict[str, Any]] = {}
        seen: dict[str, str] = {}
        windows: list[dict[str, Any]] = []
        latest: dict[str, dict[str, Any]] = {}
        events: list[tuple[str, dict[str, Any]]] = []
        for item in batch:
            report = item.report
            if isinstance(report, Telemetry) and item.device not in stored:
                self.drop(item.topic, f"no device {item.device!r} in the registry", "unknown device")
                continue
            seen[item.device] = max(seen.get(item.device, ""), item.at)
            if isinstance(report, DeviceState):
                at = state_time(report.at)
                before = states.get(item.device)
                if before is None or not overtaken(at, before["at"]):
                    states[item.device] = {
                        "s": report.status,
                        "r": report.installed,
                        "at": at,
                        "until": _later(at, REORDER_S),
                        "id": item.device,
                    }
            elif isinstance(report, Telemetry):
                figures = report.figures()
                windows.append(
                    {
                        "d": item.device,
                        "e": figures.get("ended_at") or item.at,
                        "r": item.at,
                        "m": figures.get("model"),
                        "w": json.dumps(figures, sort_keys=True),
                    }
                )
                if is_newer(latest.get(item.device) or stored[item.device], figures):
                    latest[item.device] = figures
            else:
                events.append((item.device, report.model_dump()))
        with self.registry.engine.begin() as conn:
            if windows:
                conn.execute(
                    text(
                        "INSERT INTO telemetry_windows (device_id, ended_at, received_at, model, figures) "
                        "VALUES (:d, :e, :r, :m, :w) ON CONFLICT (device_id, ended_at) DO NOTHING"
                    ),
                    windows,
                )
            if latest:
                conn.execute(
                    text("UPDATE devices SET telemetry = :t WHERE id = :id"),
                    [{"t": json.dumps(f, sort_keys=True), "id": d} for d, f in latest.items()],
                )
            if states:
                conn.execute(  # a state overtaken by the stored one (see overtaken) is not written
                    text(
                        "UPDATE devices SET status = :s, installed_release = :r, "
                        "state_at = COALESCE(CAST(:at AS VARCHAR(40)), state_at) WHERE id = :id "
                        "AND (CAST(:at AS VARCHAR(40)) IS NULL OR state_at IS NULL OR state_at <= :at "
                        "OR state_at > :until)"
                    ),
                    list(states.values()),
                )
            if seen:
                conn.execute(
                    text("UPDATE devices SET last_seen = :at WHERE id = :id"),
                    [{"at": at, "id": d} for d, at in seen.items()],
                )
        if events:
            self.on_events(events)
        self.batches += 1
        self.written += len(batch)

    def _stored_telemetry(self, devices: list[str]) -> dict[str, dict[str, Any] | None]:
        """The registry's latest window of each of ``devices`` that it knows (absent: unknown)."""
        found: dict[str, dict[str, Any] | None] = {}
        statement = text("SELECT id, telemetry FROM devices WHERE id IN :ids").bindparams(
            bindparam("ids", expanding=True)
        )
        with self.registry.engine.connect() as conn:
            for start in range(0, len(devices), MAX_IN_LIST):
                for device_id, telemetry in conn.execute(
                    statement, {"ids": devices[start : start + MAX_IN_LIST]}
                ):
                    found[device_id] = json.loads(telemetry) if telemetry else None
        return found
