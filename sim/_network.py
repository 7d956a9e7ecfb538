"""One thread drives every simulated device's MQTT client, with epoll.

What it costs per device is most of the simulator's overhead, so three things are kept cheap:

- a packet is written by the thread that queues it (an install worker's fetch request, the
  telemetry thread's window), at once, when no other thread is writing that client's socket;
  only what the socket cannot take yet is left to this loop (write interest, epoll). That
  saves a wake-up of the loop and two epoll changes per message;
- keepalive checks (``loop_misc``) visit each client once per ``visit_s``, a slice of the
  fleet per sweep, not every client twice a second (10,000 clients: 2,000 calls a second,
  not 20,000);
- a closed connection is queued for its reconnect when paho closes it, not found by a sweep;
- a client reads its socket 64 KiB at a time (``BufferedClient``): paho asks for a packet in
  three or more reads (its type, its length, its body), and each system call lets go of the
  GIL, which a thread among a hundred then waits to get back.
"""

from __future__ import annotations

import contextlib
import heapq
import logging
import random
import selectors
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as mqtt

__all__ = ["BufferedClient", "NetworkLoop"]

logger = logging.getLogger(__name__)


class BufferedClient(mqtt.Client):
    """paho's client, reading its socket through a buffer: one ``recv`` of up to 64 KiB
    serves the small reads paho makes per packet. ``NetworkLoop`` reads again while bytes
    are buffered (epoll only reports the socket's own)."""

    READ_BYTES = 64 * 1024

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._sim_buffer = b""
        self._sim_at = 0

    def _sock_recv(self, bufsize: int) -> bytes:
        if self._sim_at >= len(self._sim_buffer):
            data = super()._sock_recv(self.READ_BYTES)  # BlockingIOError when there is nothing
            if not data:
                return data  # the connection closed
            self._sim_buffer, self._sim_at = data, 0
        start = self._sim_at
        self._sim_at = min(start + bufsize, len(self._sim_buffer))
        return self._sim_buffer[start : self._sim_at]

    def sim_buffered(self) -> bool:
        """Bytes read from the socket that paho has not taken yet."""
        return self._sim_at < len(self._sim_buffer)

    def reconnect(self) -> mqtt.MQTTErrorCode:
        self._sim_buffer, self._sim_at = b"", 0  # nothing of the old connection carries over
        return super().reconnect()


@dataclass(eq=False)
class _Link:
    client: mqtt.Client
    name: str
    delay_s: float = 1.0  # the next reconnect's backoff
    waiting: bool = False  # in the connect queue
    # held while paho writes this client's socket: paho's ``loop_write`` takes a packet off its
    # queue before sending it, so two writers at once could reorder packets
    writing: threading.Lock = field(default_factory=threading.Lock)
    selected_write: bool = False  # the selector watches the socket for writing (set by the loop)


class NetworkLoop:
    """paho clients driven from one thread with epoll, through paho's external-loop API
    (``loop_read``, ``loop_write``, ``loop_misc``, the socket callbacks). Other threads only
    publish: paho queues the packet and calls back for write interest, which this loop
    applies. Connections open at most ``connects_per_s``, and reopen with backoff; every
    client's keepalive is checked once per ``visit_s`` (keep it well under the keepalive)."""

    SWEEP_S = 0.5  # a slice of the clients: keepalive pings, write interest, lost connections

    def __init__(self, connects_per_s: float, reconnect_max_s: float, visit_s: float = 2.0) -> None:
        self.connects_per_s = connects_per_s
        self.reconnect_max_s = reconnect_max_s
        self.visit_s = max(visit_s, self.SWEEP_S)
        self._next_visit = 0  # where the next sweep's slice starts
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
        self._closed: list[_Link] = []  # connections paho closed: to reconnect (under _dirty_lock)
        self._dirty_lock = threading.Lock()
        self._closing = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._counter = 0

    def add(self, client: mqtt.Client, name: str) -> None:
        """Before ``start``; the client has had ``connect_async``."""
        client.on_socket_close = self._on_socket_close
        client.on_socket_register_write = self._on_register_write
        client.on_socket_unregister_write = self._on_unregister_write
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
    def _on_register_write(self, client: mqtt.Client, _userdata: Any, _sock: Any) -> None:
        """A packet was queued (by any thread): write it now, here, unless another thread is
        writing this socket; what is left waits for the loop to select the socket writable."""
        link = self._by_client[client]
        if link.writing.acquire(blocking=False):
            try:
                client.loop_write()
            except Exception:  # the loop retries from its side
                logger.debug("writing for %s failed", link.name, exc_info=True)
            finally:
                link.writing.release()
            if not client.want_write():
                return
        with self._dirty_lock:
            self._dirty.add(client)
        if threading.current_thread() is not self._thread:
            self._wake()

    def _on_unregister_write(self, client: mqtt.Client, _userdata: Any, _sock: Any) -> None:
        # nothing left to send: the loop drops its write interest on its next turn (a socket
        # still selected for writing only wakes it once more); no wake-up needed
        if self._by_client[client].selected_write:
            with self._dirty_lock:
                self._dirty.add(client)

    def _on_socket_close(self, client: mqtt.Client, _userdata: Any, sock: Any) -> None:
        self._forget(sock)
        link = self._by_client.get(client)
        if link is not None:
            with self._dirty_lock:
                self._closed.append(link)

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
                        for _ in range(1000):  # the packets still in the client's buffer
                            if not (isinstance(client, BufferedClient) and client.sim_buffered()):
                                break
                            if client.socket() is None:
                                break
                            client.loop_read()
                    if mask & selectors.EVENT_WRITE and client.socket() is not None:
                        with link.writing:
                            client.loop_write()
                        self._watch(client)  # drained (here or by another thread): read only
                except Exception:  # one client's trouble must not stop the others
                    logger.exception("the MQTT client of %s failed", link.name)
            with self._dirty_lock:
                dirty, self._dirty = self._dirty, set()
                closed, self._closed = self._closed, []
            for client in dirty:
                self._watch(client)
            for link in closed:
                self._reconnect_later(link, time.monotonic())

    def _sweep(self, now: float) -> None:
        """Visit the next slice of clients: all of them once per ``visit_s``."""
        count = len(self._links)
        if not count:
            return
        size = min(count, max(1, -(-count * self.SWEEP_S // self.visit_s)))  # ceil
        start = self._next_visit % count
        self._next_visit = start + int(size)
        for i in range(start, start + int(size)):
            link = self._links[i % count]
            client = link.client
            if client.socket() is None:
                self._reconnect_later(link, now)
                continue
            if client.is_connected():
                link.delay_s = 1.0
            client.loop_misc()
            self._watch(client)

    def _reconnect_later(self, link: _Link, now: float) -> None:
        """Queue a closed connection's reconnect, after its backoff (once)."""
        if link.waiting or self._closing or link.client.socket() is not None:
            return
        self._queue_connect(link, now + link.delay_s * random.uniform(0.5, 1.0))
        link.delay_s = min(link.delay_s * 2, self.reconnect_max_s)

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
        link = self._by_client[client]
        link.selected_write = client.want_write()
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if link.selected_write else 0)
        with self._selector_lock:
            try:
                key = self._selector.get_key(sock)
            except KeyError:
                self._selector.register(sock, events, link)
                return
            if key.events != events:
                self._selector.modify(sock, events, key.data)
