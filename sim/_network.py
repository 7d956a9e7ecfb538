"""One thread drives every simulated device's MQTT client, with epoll."""

from __future__ import annotations

import contextlib
import heapq
import logging
import random
import selectors
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt

__all__ = ["NetworkLoop"]

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class _Link:
    client: mqtt.Client
    name: str
    delay_s: float = 1.0  # the next reconnect's backoff
    waiting: bool = False  # in the connect queue


class NetworkLoop:
    """paho clients driven from one thread with epoll, through paho's external-loop API
    (``loop_read``, ``loop_write``, ``loop_misc``, the socket callbacks). Other threads only
    publish: paho queues the packet and calls back for write interest, which this loop
    applies. Connections open at most ``connects_per_s``, and reopen with backoff."""

    SWEEP_S = 0.5  # keepalive pings, write interest, lost connections

    def __init__(self, connects_per_s: float, reconnect_max_s: float) -> None:
        self.connects_per_s = connects_per_s
        self.reconnect_max_s = reconnect_max_s
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._selector_lock = threading.Lock()
        self._links: list[_Link] = []
        self._by_client: dict[mqtt.Client, _Link] = {}
        self._due: list[tuple[float, int, _Link]] = []  # (when, tie-break, link): connects to make
        self._dirty: set[mqtt.Client] = set()
        self._dirty_lock = threading.Lock()
        self._closing = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._counter = 0

    def add(self, client: mqtt.Client, name: str) -> None:
        """Before ``start``; the client has had ``connect_async``."""
        client.on_socket_close = self._on_socket_close
        client.on_socket_register_write = self._on_write_interest
        client.on_socket_unregister_write = self._on_write_interest
        link = _Link(client, name)
        self._links.append(link)
        self._by_client[client] = link
        self._queue_connect(link, time.monotonic())

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="sim-mqtt", daemon=True)
        self._thread.start()

    def close(self, timeout_s: float = 5.0) -> None:
        """Disconnect every client (their DISCONNECTs go out), then stop."""
        self._closing = True
        for link in self._links:
            if link.client.socket() is not None:
                link.client.disconnect()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and any(link.client.socket() for link in self._links):
            time.sleep(0.05)
        self._stop.set()
        self._wake()
        if self._thread is not None:
            self._thread.join(timeout=5)
        for link in self._links:  # the ones that did not finish in time
            sock = link.client.socket()
            if sock is not None:
                self._forget(sock)
                with contextlib.suppress(OSError):
                    sock.close()
        self._selector.close()
        self._wake_r.close()
        self._wake_w.close()

    # -- paho's callbacks (any thread) ---------------------------------------------------------
    def _on_write_interest(self, client: mqtt.Client, _userdata: Any, _sock: Any) -> None:
        with self._dirty_lock:
            self._dirty.add(client)
        if threading.current_thread() is not self._thread:
            self._wake()

    def _on_socket_close(self, _client: mqtt.Client, _userdata: Any, sock: Any) -> None:
        self._forget(sock)

    def _wake(self) -> None:
        with contextlib.suppress(OSError):  # full: a wake-up is pending anyway
            self._wake_w.send(b"\0")

    def _forget(self, sock: Any) -> None:
        with self._selector_lock, contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(sock)

    # -- the loop -------------------------------------------------------------------------------
    def _run(self) -> None:
        next_sweep = time.monotonic()
        tokens, last = 0.0, time.monotonic()
        while not self._stop.is_set():
            now = time.monotonic()
            tokens = min(tokens + (now - last) * self.connects_per_s, max(self.connects_per_s / 10, 1.0))
            last = now
            while self._due and self._due[0][0] <= now and tokens >= 1 and not self._closing:
                _, _, link = heapq.heappop(self._due)
                link.waiting = False
                tokens -= 1
                self._connect(link, now)
            if now >= next_sweep:
                self._sweep(now)
                next_sweep = now + self.SWEEP_S
            timeout = next_sweep - now
            if self._due and not self._closing:
                timeout = min(timeout, max(self._due[0][0] - now, 1 / self.connects_per_s))
            for key, mask in self._selector.select(max(timeout, 0.0)):
                link = key.data
                if link is None:
                    with contextlib.suppress(OSError):
                        self._wake_r.recv(4096)
                    continue
                client = link.client
                try:
                    if mask & selectors.EVENT_READ:
                        client.loop_read()
                    if mask & selectors.EVENT_WRITE and client.socket() is not None:
                        client.loop_write()
                except Exception:  # one client's trouble must not stop the others
                    logger.exception("the MQTT client of %s failed", link.name)
            with self._dirty_lock:
                dirty, self._dirty = self._dirty, set()
            for client in dirty:
                self._watch(client)

    def _sweep(self, now: float) -> None:
        for link in self._links:
            client = link.client
            if client.socket() is None:
                if not link.waiting and not self._closing:
                    self._queue_connect(link, now + link.delay_s * random.uniform(0.5, 1.0))
                    link.delay_s = min(link.delay_s * 2, self.reconnect_max_s)
                continue
            if client.is_connected():
                link.delay_s = 1.0
            client.loop_misc()
            self._watch(client)

    def _queue_connect(self, link: _Link, when: float) -> None:
        self._counter += 1
        link.waiting = True
        heapq.heappush(self._due, (when, self._counter, link))

    def _connect(self, link: _Link, now: float) -> None:
        try:
            link.client.reconnect()  # a socket; the CONNECT packet is queued
        except OSError as e:
            logger.debug("cannot connect %s: %s", link.name, e)
            self._queue_connect(link, now + link.delay_s * random.uniform(0.5, 1.0))
            link.delay_s = min(link.delay_s * 2, self.reconnect_max_s)
            return
        self._watch(link.client)

    def _watch(self, client: mqtt.Client) -> None:
        """Select the client's socket for reading, and for writing while it has bytes to send."""
        sock = client.socket()
        if sock is None:
            return
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if client.want_write() else 0)
        with self._selector_lock:
            try:
                key = self._selector.get_key(sock)
            except KeyError:
                self._selector.register(sock, events, self._by_client[client])
                return
            if key.events != events:
                self._selector.modify(sock, events, key.data)
