"""Many simulated devices in one process (``SimFleet``)."""

from __future__ import annotations

import heapq
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence

import numpy as np

from agent.config import TrustSettings
from agent.device import parse_director_key
from edgec.reports import EventKind
from sim._network import NetworkLoop
from sim._tally import FleetSummary, Tally
from sim.behaviour import SimBehaviours
from sim.device import SimDeviceConfig, SimSettings, SimulatedDevice

__all__ = ["FleetSummary", "SimFleet", "device_ids"]

logger = logging.getLogger(__name__)


class SimFleet:
    """Many simulated devices in one process: one network thread, a bounded install pool, one
    telemetry thread. ``start``, then ``summary`` or the ``wait_*`` methods, then ``stop``."""

    def __init__(
        self,
        devices: Sequence[SimDeviceConfig],
        *,
        trust: TrustSettings,
        behaviours: SimBehaviours | None = None,
        settings: SimSettings | None = None,
    ) -> None:
        self.settings = settings or SimSettings()
        self.behaviours = behaviours or SimBehaviours()
        director_key = parse_director_key(trust.director_key)  # one, shared by all
        self._tally = Tally(len(devices))
        self._work: queue.SimpleQueue[SimulatedDevice | None] = queue.SimpleQueue()
        self._waiting = 0
        self._waiting_lock = threading.Lock()
        self.devices = [
            SimulatedDevice(
                config,
                settings=self.settings,
                trust_root=trust.root,
                director_key=director_key,
                behaviours=self.behaviours,
                submit=self._submit,
                tally=self._tally,
                index=index,
            )
            for index, config in enumerate(devices)
        ]
        self._network = NetworkLoop(
            self.settings.connects_per_s,
            self.settings.reconnect_max_s,
            visit_s=min(5.0, self.settings.keepalive_s / 3),  # pings on time, checked rarely
        )
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._started = False

    def __enter__(self) -> SimFleet:
        self.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    def start(self) -> None:
        if self._started:
            return
        self._started = True
        for _ in range(self.settings.install_workers):
            self._spawn(self._install_worker, "sim-install")
        for device in self.devices:
            device.start()
            self._network.add(device.client, device.id)
        self._network.start()
        self._spawn(self._telemetry_loop, "sim-telemetry")

    def stop(self, timeout_s: float = 10.0) -> None:
        """Like pulling the plug, politely: installs not done within ``timeout_s`` are left to
        their journal (the next ``start`` resumes them) rather than refused; the devices then
        disconnect cleanly (their retained state stays as last reported)."""
        if not self._started or self._stopping.is_set():
            return
        self._stopping.set()
        for _ in self._threads:
            self._work.put(None)
        deadline = time.monotonic() + timeout_s
        for thread in self._threads:
            thread.join(timeout=max(deadline - time.monotonic(), 0.0))
        self._network.close()
        for device in self.devices:
            device.save_seq()

    def summary(self) -> FleetSummary:
        return self._tally.summary(self._waiting)

    def wait_connected(self, count: int | None = None, timeout_s: float = 60.0) -> bool:
        want = len(self.devices) if count is None else count
        return self._tally.wait(lambda: self._tally.connected_count >= want, timeout_s)

    def wait_for_release(self, release: str, count: int | None = None, timeout_s: float = 60.0) -> bool:
        """Until ``count`` devices (default: all) report ``release`` (NAME:VERSION) installed."""
        want = len(self.devices) if count is None else count
        return self._tally.wait(lambda: self._tally.installed[release] >= want, timeout_s)

    def wait_for_events(self, kind: EventKind, count: int, timeout_s: float = 60.0) -> bool:
        """Until ``count`` events of ``kind`` have been reported since start."""
        return self._tally.wait(lambda: self._tally.events[kind] >= count, timeout_s)

    def wait_until(self, predicate: Callable[[FleetSummary], bool], timeout_s: float = 60.0) -> bool:
        """Until ``predicate(summary)`` holds (checked on every report; for tests and tools)."""
        return self._tally.wait(lambda: predicate(self.summary()), timeout_s)

    # -- threads --------------------------------------------------------------------------------
    def _spawn(self, target: Callable[[], None], name: str) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        self._threads.append(thread)
        thread.start()

    def _submit(self, device: SimulatedDevice) -> None:
        with self._waiting_lock:
            self._waiting += 1
        self._work.put(device)

    def _install_worker(self) -> None:
        while (device := self._work.get()) is not None:
            try:
                if not self._stopping.is_set():
                    device.install_turn()
            finally:
                with self._waiting_lock:
                    self._waiting -= 1

    def _telemetry_loop(self) -> None:
        """Every device closes a window every ``window_s``, their phases spread over it."""
        rng = np.random.default_rng(self.settings.seed)
        window_s = self.settings.window_s
        start = time.monotonic()
        count = len(self.devices)
        due = [(start + window_s * (1 + i / count), i) for i in range(count)]  # phases spread out
        while due and not self._stopping.is_set():
            when, index = due[0]
            wait = when - time.monotonic()
            if wait > 0:
                self._stopping.wait(min(wait, 1.0))
                continue
            heapq.heapreplace(due, (when + window_s, index))
            try:
                self.devices[index].send_window(rng)
            except Exception:  # a window lost, the loop goes on
                logger.exception("telemetry of %s failed", self.devices[index].id)


def device_ids(prefix: str, count: int) -> list[str]:
    """``prefix0001`` .. : the ids ``edgec sim fleet`` gives its devices."""
    width = max(4, len(str(count)))
    return [f"{prefix}{n:0{width}d}" for n in range(1, count + 1)]
