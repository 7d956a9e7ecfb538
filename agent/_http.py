"""HTTP/1.1 for the agent's local inference API: llhttp (httptools) parsing, bounded on what arrives.

``HttpCore`` (here) holds what all connections share (the limits, the connection count, the
bytes of request bodies held) and ``Listener`` (here) accepts connections;
``HttpConnection`` (``agent._http_connection``) is one asyncio protocol per connection, and
the messages it hands on and writes (``Request``, ``Response``, ``HttpError``) are in
``agent._http_messages``. httptools parses what arrives, complete requests queue and are
answered in order (keep-alive, pipelining, ``Expect: 100-continue``, HTTP/1.0 keep-alive,
``HEAD``; an ``Upgrade`` header is ignored). Request bodies need a ``Content-Length``: a
``Transfer-Encoding`` is answered 411.

``HttpServer`` (here) is the transport as a whole: a listening socket and an event loop in
a thread of its own, handed the application's ``Dispatch`` (a callable from a ``Request``
to a ``Response``); it knows nothing of what it serves.

Every limit is enforced on what arrived, and every refusal is an answer, never a dropped
connection: the refusal is written in its turn after the answers to requests before it,
``Connection: close``, then the connection half-closes and reads (discarding) for up to
``LINGER_S`` so that the client reads the answer instead of a reset. ``ServingLimits``
(``agent.config``) sets the figures; ``agent.serving``'s docstring lists the defaults.

- head over ``max_head_bytes`` (counted as it arrives, across packets): 431;
- ``Content-Length`` over ``max_body_bytes``, or a JSON part (the body, or the
  ``Inference-Header-Content-Length`` of a binary one) over ``max_json_bytes``: 413, decided
  from the head before any of the body is read;
- a body that would take the bytes held for request bodies across all connections over
  ``max_buffered_body_bytes``: 503 (a body's declared length is held from its head until
  its answer is written);
- malformed HTTP (what llhttp refuses: bad request line or header, a ``Content-Length`` that
  is not decimal digits or is given twice, ``Content-Length`` with ``Transfer-Encoding``, an
  HTTP version other than 1.0 and 1.1): 400;
- a head not complete ``header_timeout_s`` after its request line began, or a body not complete
  ``body_timeout_s`` after its head: 408; a connection with no request in progress for
  ``idle_timeout_s`` (or whose client does not read its answers for that long) is closed;
- over ``max_connections`` open connections: a new one is answered 503 and closed;
- out of file descriptors when accepting (EMFILE, ENFILE): accepting pauses
  ``ACCEPT_PAUSE_S`` and one warning is logged per ``LOG_INTERVAL_S`` with a count of the
  rest (asyncio's own accept loop logs a traceback for each of up to 1,024 retries per tick).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import threading
import time
from typing import Any

from agent._http_connection import LINGER_S, HttpConnection
from agent._http_messages import Dispatch, HttpError, Request, Response, error_response
from agent.config import ServingLimits
from edgec.errors import UserInputError

__all__ = [
    "ACCEPT_PAUSE_S",
    "Dispatch",
    "HttpCore",
    "HttpError",
    "HttpServer",
    "ListenError",
    "Listener",
    "Request",
    "Response",
    "default_max_connections",
    "error_response",
]

logger = logging.getLogger(__name__)

ACCEPT_PAUSE_S = 0.5
LOG_INTERVAL_S = 10.0
FD_HEADROOM = 64  # file descriptors kept for the model's files, logs and the runtime
_ACCEPT_BATCH = 64
_OUT_OF_RESOURCES = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}
_now = time.monotonic


def default_max_connections() -> int:
    """The connection cap when none is set: the soft RLIMIT_NOFILE less headroom for the
    process's own files (an eighth of the limit, at least ``FD_HEADROOM``), at most 4,096."""
    try:
        import resource
    except ImportError:  # not POSIX
        return 1024 - FD_HEADROOM
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        soft = 1 << 16
    return max(1, min(4096, soft - max(FD_HEADROOM, soft // 8)))


class _RateLimitedLog:
    """One warning per ``interval_s`` for a repeated condition, with a count of the rest."""

    def __init__(self, interval_s: float = LOG_INTERVAL_S) -> None:
        self.interval_s = interval_s
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def first(self, key: str) -> bool:
        """True the first time ``key`` is seen (the caller logs it in full)."""
        if key in self._last:
            return False
        self._last[key] = _now()
        return True

    def say(self, key: str, message: str, *args: Any, exc_info: bool = False) -> None:
        now = _now()
        if now - self._last.get(key, -self.interval_s) < self.interval_s:
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return
        self._last[key] = now
        more = self._suppressed.pop(key, 0)
        suffix = f" ({more} more in the last {self.interval_s:g} s)" if more else ""
        logger.warning(message + suffix, *args, exc_info=exc_info)


class HttpCore:
    """What the connections of one server share; runs on the server's event loop."""

    def __init__(self, dispatch: Dispatch, limits: ServingLimits) -> None:
        self.dispatch = dispatch
        self.limits = limits
        self.max_connections = limits.max_connections or default_max_connections()
        self.connections: set[HttpConnection] = set()
        self.admitted = 0  # connections under the cap (refused ones linger outside it)
        self.buffered_body_bytes = 0  # declared lengths of the bodies being read or waiting
        self.log = _RateLimitedLog()
        self.timeouts = (  # by phase: idle, head, body, upgrade body, closing
            limits.idle_timeout_s,
            limits.header_timeout_s,
            limits.body_timeout_s,
            limits.body_timeout_s,
            LINGER_S,
        )
        self._stop_sweeping = threading.Event()

    def protocol(self) -> HttpConnection:
        return HttpConnection(self)

    def start_sweeping(self, loop: asyncio.AbstractEventLoop) -> None:
        """Check every connection's deadline on ``loop`` a few times per shortest timeout.

        A small thread wakes the loop for it rather than a timer on the loop: with a timer
        scheduled, every wait of the loop arms a kernel timer, which cost about 10 us per
        request on the 2-core VM the benchmark ran on (bench_agent_serving.py --baseline).
        """
        interval = min(1.0, max(0.05, min(self.timeouts) / 4))
        stop = self._stop_sweeping

        def wake() -> None:
            while not stop.wait(interval):
                try:
                    loop.call_soon_threadsafe(self.sweep)
                except RuntimeError:  # the loop is closed
                    return

        threading.Thread(target=wake, name="edgec-v2-deadlines", daemon=True).start()

    def sweep(self) -> None:
        """Expire the connections whose deadline passed (on the loop)."""
        now = _now()
        for connection in list(self.connections):
            if connection.overdue(now):
                connection.expire()

    def close(self) -> None:
        self._stop_sweeping.set()
        for connection in list(self.connections):
            connection.abort()

    def loop_exception(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        """asyncio's exception handler, rate-limited: a flood of one error is one line per interval."""
        message = str(context.get("message", "event loop error"))
        exc = context.get("exception")
        key = f"loop:{message}:{type(exc).__name__}"
        if self.log.first(key):
            loop.default_exception_handler(context)
        else:
            self.log.say(key, "%s: %s", message, exc)


class Listener:
    """Accepts connections on a listening socket. Out of file descriptors, it stops
    accepting for ``ACCEPT_PAUSE_S`` (the kernel's backlog holds new connections meanwhile)
    and says so once per ``LOG_INTERVAL_S``."""

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket, core: HttpCore) -> None:
        self._loop = loop
        self._sock = sock
        self._core = core
        self._pending: set[asyncio.Task[Any]] = set()
        self._resume: asyncio.TimerHandle | None = None
        self._fd = sock.fileno()

    def start(self) -> None:
        self._loop.add_reader(self._fd, self._accept)

    def close(self) -> None:
        if self._resume is not None:
            self._resume.cancel()
        self._loop.remove_reader(self._fd)
        self._sock.close()
        for task in self._pending:
            task.cancel()

    def _accept(self) -> None:
        for _ in range(_ACCEPT_BATCH):
            try:
                conn, _address = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue
            except OSError as e:
                if e.errno in _OUT_OF_RESOURCES:
                    self._pause(e)
                else:
                    self._core.log.say("accept", "accepting a connection failed: %s", e)
                return
            conn.setblocking(False)
            task = self._loop.create_task(self._connect(conn))
            self._pending.add(task)
            task.add_done_callback(self._pending.discard)

    async def _connect(self, conn: socket.socket) -> None:
        try:
            await self._loop.connect_accepted_socket(self._core.protocol, conn)
        except OSError:
            conn.close()

    def _pause(self, error: OSError) -> None:
        self._loop.remove_reader(self._fd)
        self._resume = self._loop.call_later(ACCEPT_PAUSE_S, self.start)
        self._core.log.say(
            "accept-resources",
            "cannot accept connections (%s) with %d open: pausing accepts for %g s",
            error.strerror or error,
            len(self._core.connections),
            ACCEPT_PAUSE_S,
        )


class ListenError(UserInputError):
    """The server cannot listen on the host and port asked for."""


class HttpServer:
    """``dispatch`` answers HTTP/1.1 on ``host:port`` (``port=0``: a free one), served by an
    event loop in its own thread. The transport knows nothing of what it serves: every
    complete request goes to ``dispatch``, on the loop, and the answer it gives (or the
    future answer) is written in the request's turn.

    ``start()`` returns the port once it listens; ``stop()`` closes it and every connection.
    """

    def __init__(self, dispatch: Dispatch, limits: ServingLimits, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self._core = HttpCore(dispatch, limits)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._listener: Listener | None = None
        self._thread: threading.Thread | None = None

    @property
    def max_connections(self) -> int:
        return self._core.max_connections

    @property
    def buffered_body_bytes(self) -> int:
        return self._core.buffered_body_bytes

    @property
    def connections(self) -> set[HttpConnection]:
        return self._core.connections

    def start(self) -> int:
        if self._thread is not None:
            raise RuntimeError("the server is already started")
        try:
            sock = _listen(self.host, self.port)
        except OSError as e:
            raise ListenError(f"cannot listen on {self.host}:{self.port}: {e.strerror or e}") from e
        self.port = int(sock.getsockname()[1])
        ready = threading.Event()
        self._thread = threading.Thread(
            target=self._serve, args=(sock, ready), name="edgec-v2-http", daemon=True
        )
        self._thread.start()
        ready.wait()
        return self.port

    def _serve(self, sock: socket.socket, ready: threading.Event) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        loop.set_exception_handler(self._core.loop_exception)
        try:
            self._listener = Listener(loop, sock, self._core)
            self._listener.start()
            self._core.start_sweeping(loop)
            ready.set()
            loop.run_forever()
            self._listener.close()
            self._core.close()
            loop.run_until_complete(asyncio.sleep(0))  # let the closed transports finish
        finally:
            ready.set()
            loop.close()

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop listening, close every connection, and wait for the server's thread."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        if not loop.is_closed():
            loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout_s)
        self._thread = self._loop = self._listener = None


def _listen(host: str, port: int) -> socket.socket:
    """A listening socket on the first address ``host`` resolves to."""
    family, kind, proto, _, address = socket.getaddrinfo(
        host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(1024)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock
