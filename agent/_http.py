"""HTTP/1.1 for the agent's local inference API: llhttp (httptools) parsing, bounded on what arrives.

``HttpCore`` holds what all connections share (the limits, the connection count, the bytes of
request bodies held) and ``HttpConnection`` is one asyncio protocol per connection: httptools
parses what arrives, complete requests queue and are answered in order (keep-alive,
pipelining, ``Expect: 100-continue``, HTTP/1.0 keep-alive, ``HEAD``; an ``Upgrade`` header is
ignored). Request bodies need a ``Content-Length``: a ``Transfer-Encoding`` is answered 411.

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
import json
import logging
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, NamedTuple

import httptools

from agent.config import ServingLimits
from edgec.errors import EdgecError

__all__ = [
    "ACCEPT_PAUSE_S",
    "LINGER_S",
    "HttpConnection",
    "HttpCore",
    "HttpError",
    "Listener",
    "Request",
    "Response",
    "default_max_connections",
    "error_response",
]

logger = logging.getLogger(__name__)

ACCEPT_PAUSE_S = 0.5
LINGER_S = 2.0
LOG_INTERVAL_S = 10.0
FD_HEADROOM = 64  # file descriptors kept for the model's files, logs and the runtime
MAX_MESSAGE_CHARS = 1000  # an error message echoes what the client sent: bounded
_ACCEPT_BATCH = 64
_OUT_OF_RESOURCES = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}

_REASONS = {
    100: "Continue",
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    411: "Length Required",
    413: "Content Too Large",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
}
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
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


class HttpError(EdgecError):
    """A request that gets a 4xx/5xx JSON error; ``status`` says whose fault it is."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class Response:
    status: int
    body: bytes
    content_type: str = "application/json"
    headers: tuple[tuple[str, str], ...] = ()
    after_write: Callable[[], None] | None = None  # called once the answer is written

    def encode(self, keep_alive: bool, announce: bool = False, head_only: bool = False) -> bytes:
        """The response on the wire, as one ``bytes`` (one send); ``announce``: say keep-alive
        (to HTTP/1.0 clients); ``head_only``: the answer to a HEAD request (its length, not its
        body)."""
        body = self.body
        start = _STARTS.get((self.status, self.content_type)) or _start(self.status, self.content_type)
        if self.headers:
            extra = "".join(f"{name}: {value}\r\n" for name, value in self.headers).encode("latin-1")
        else:
            extra = b""
        if not keep_alive:
            extra += b"Connection: close\r\n"
        elif announce:
            extra += b"Connection: keep-alive\r\n"
        return b"%s%d\r\n%s\r\n%s" % (start, len(body), extra, b"" if head_only else body)


_STARTS: dict[tuple[int, str], bytes] = {}
_MAX_STARTS = 64  # content types come from the application: a few, but bound the cache anyway


def _start(status: int, content_type: str) -> bytes:
    """A response's status line and headers up to the value of its Content-Length, remembered:
    formatting them for every response cost about 0.3 us."""
    start = (
        f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\n"
        f"Content-Type: {content_type}\r\nContent-Length: "
    ).encode("latin-1")
    if len(_STARTS) < _MAX_STARTS:
        _STARTS[(status, content_type)] = start
    return start


def error_response(status: int, message: str) -> Response:
    """``{"error": message}`` (the message cut to ``MAX_MESSAGE_CHARS``)."""
    if len(message) > MAX_MESSAGE_CHARS:
        message = message[: MAX_MESSAGE_CHARS - 3] + "..."
    return Response(status, _json_text({"error": message}))


def _json_text(document: Any) -> bytes:
    return json.dumps(document, separators=(",", ":")).encode()


class Request(NamedTuple):
    """One complete request, as it waits its turn on its connection. ``headers``: lower-case
    names to values, both as they arrived (bytes; a repeated header: the last)."""

    method: str
    target: str
    headers: dict[bytes, bytes]
    body: bytes | bytearray
    keep_alive: bool
    http10: bool
    reserved: int  # body bytes held against max_buffered_body_bytes until the answer is written


_new_request = tuple.__new__  # _new_request(Request, fields): no Python-level __new__ per request


Dispatch = Callable[[Request], "Response | asyncio.Future[Response]"]
"""The application: a response now, or a future one (the connection waits for it, in order)."""


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
        self._timeouts = (  # by phase: idle, head, body, upgrade body, closing
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
        interval = min(1.0, max(0.05, min(self._timeouts) / 4))
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
            if not connection._busy and connection._deadline < now:
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


_IDLE, _HEAD, _BODY, _UPGRADE_BODY, _CLOSING = range(5)


class _Stop(EdgecError):
    """Raised in a parser callback after a refusal is queued: stop parsing this connection."""


class HttpConnection(asyncio.Protocol):
    """One connection: httptools parses, complete requests queue and are answered in order.

    Reading pauses while answers wait (the application is busy with an earlier request, or
    the client does not read its answers) and more requests are queued, so a client cannot
    make the server buffer without bound; what is buffered is bounded by the limits.
    """

    __slots__ = (
        "_admitted", "_blocked", "_body", "_body_limits", "_busy", "_continue_owed", "_core",
        "_deadline", "_eof", "_head_bytes", "_head_fed", "_headers", "_http10", "_keep_alive",
        "_length", "_limits", "_max_head", "_messages", "_method", "_parser", "_phase", "_queue",
        "_reading_paused", "_rearm", "_reserved", "_transport", "_url",
    )  # fmt: skip

    def __init__(self, core: HttpCore) -> None:
        self._core = core
        self._limits = limits = core.limits
        self._max_head = limits.max_head_bytes
        # read for every request with a body: plain ints, not three pydantic attribute look-ups
        self._body_limits = (limits.max_body_bytes, limits.max_json_bytes, limits.max_buffered_body_bytes)
        self._parser = httptools.HttpRequestParser(self)
        self._transport: asyncio.Transport | None = None
        self._queue: deque[Request | Response] = deque()  # a Response: a refusal, then close
        self._phase = _IDLE
        self._deadline = 0.0
        self._rearm = False  # a phase began in what was just parsed: its deadline is set after it
        self._admitted = False
        self._busy = False  # the application holds a request; later ones wait
        self._blocked = False  # the client is not reading: answer nothing more until it does
        self._reading_paused = False
        self._eof = False  # the client half-closed: answer what is queued, then close
        self._continue_owed = False  # "100 Continue" for the body being read, once it is our turn
        self._messages = 0
        # the request being read
        self._url = b""
        self._headers: dict[bytes, bytes] = {}
        self._head_bytes = 0
        self._head_fed = 0
        self._method = ""
        self._keep_alive = True
        self._http10 = False
        self._length = 0
        self._body: bytes | bytearray = b""
        self._reserved = 0

    # -- asyncio -----------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        core = self._core
        core.connections.add(self)
        if core.admitted >= core.max_connections:
            self._deadline = _now() + LINGER_S
            self._refuse(
                503,
                f"the server has {core.admitted} connections open, its limit: close one or try again later",
            )
            self._drain()
            return
        core.admitted += 1
        self._admitted = True
        self._deadline = _now() + self._limits.idle_timeout_s

    def connection_lost(self, exc: Exception | None) -> None:
        core = self._core
        core.connections.discard(self)
        if self._admitted:
            core.admitted -= 1
            self._admitted = False
        self._transport = None
        self._drop_queue()

    def pause_writing(self) -> None:
        self._blocked = True
        self._deadline = _now() + self._limits.idle_timeout_s  # time to read its answers
        self._pause_reading()

    def resume_writing(self) -> None:
        self._blocked = False
        self._arm()
        self._drain()

    def eof_received(self) -> bool:
        if self._phase != _CLOSING and (self._queue or self._busy):
            self._eof = True
            return True  # half-closed: answer what is queued, then close
        return False

    def data_received(self, data: bytes) -> None:
        try:
            if self._phase in (_IDLE, _BODY):  # the common case: parse it all, then answer
                try:
                    self._parser.feed_data(data)
                except (httptools.HttpParserError, httptools.HttpParserUpgrade) as e:
                    rest = self._parse_failed(e, data)
                    if rest:
                        self._read_slowly(rest)
            else:
                self._read_slowly(data)
            if self._rearm:  # one clock read per packet, not one per phase a request goes through
                self._rearm = False
                self._deadline = _now() + self._core._timeouts[self._phase]
            if self._queue:
                self._drain()
        except Exception:  # a bug here must not become asyncio's dropped connection
            self._core.log.say("bug", "HTTP connection failed", exc_info=True)
            self._refuse(500, "internal error in the HTTP layer")
            self._drain()

    # -- parsing -----------------------------------------------------------------------------
    def _read_slowly(self, data: bytes) -> None:
        """``data`` in a phase that needs more than parsing: a head that spans packets (its
        size counted), the body of an Upgrade request, or a connection closing (discarded)."""
        while data and self._phase != _CLOSING:
            if self._phase == _UPGRADE_BODY:
                data = self._upgrade_body(data)
                continue
            phase, messages = self._phase, self._messages
            try:
                self._parser.feed_data(data)
            except (httptools.HttpParserError, httptools.HttpParserUpgrade) as e:
                data = self._parse_failed(e, data)
                continue
            if phase == _HEAD and self._phase == _HEAD and self._messages == messages:
                # all of ``data`` is head: httptools holds a header until it ends, count it now
                self._head_fed += len(data)
                if self._head_fed > self._max_head:
                    self._refuse(431, f"request head is over {self._max_head} bytes")
            return

    def _parse_failed(self, error: Exception, data: bytes) -> bytes:
        """After llhttp stopped on ``data``: what follows an Upgrade request's head (parsed
        afresh: the Upgrade is ignored), else nothing (the refusal is queued)."""
        if isinstance(error, httptools.HttpParserUpgrade):
            self._parser = httptools.HttpRequestParser(self)
            return data[int(error.args[0]) :]
        if isinstance(error, httptools.HttpParserCallbackError) and isinstance(error.__context__, _Stop):
            return b""  # a callback queued its refusal
        if isinstance(error, httptools.HttpParserCallbackError):
            raise error.__context__ or error  # a bug in a callback
        self._refuse(400, _malformed(error))
        return b""

    # llhttp's callbacks. A request begins with its target (on_url): the method before it is
    # a few bytes that llhttp checks as they come, under the idle deadline. A callback that
    # begins a phase (head, body, idle) sets ``_rearm``: data_received then gives the phase it
    # ended in its deadline, counted from the packet where that phase began.
    def on_url(self, url: bytes) -> None:
        if self._phase == _IDLE:
            self._phase = _HEAD
            self._messages += 1
            self._url = url
            self._headers = {}
            self._head_bytes = len(url)
            self._head_fed = 0
            self._rearm = True
        else:
            self._url += url
            self._head_bytes += len(url)
        if self._head_bytes > self._max_head:
            self._stop(431, f"request head is over {self._max_head} bytes")

    def on_header(self, name: bytes, value: bytes) -> None:
        size = self._head_bytes + len(name) + len(value) + 4
        self._head_bytes = size
        if size > self._max_head:
            self._stop(431, f"request head is over {self._max_head} bytes")
        self._headers[name.lower()] = value

    def on_headers_complete(self) -> None:
        parser, headers = self._parser, self._headers
        version = parser.get_http_version()
        if version == "1.1":
            self._http10 = False
        elif version == "1.0":
            self._http10 = True
        else:
            self._stop(400, f"malformed request line: HTTP/{version} is not spoken here, send HTTP/1.1")
        if b"transfer-encoding" in headers:
            self._stop(411, "chunked request bodies are not supported: send a Content-Length")
        self._method = parser.get_method().decode("ascii", "replace")
        self._keep_alive = parser.should_keep_alive()
        self._phase = _BODY
        self._body = b""
        length = self._length = int(headers.get(b"content-length", 0))  # llhttp let only digits through
        if not length:
            return
        max_body, max_json, max_buffered = self._body_limits
        self._rearm = True
        if length > max_body:
            self._stop(413, f"request body of {length} bytes is over the {max_body} limit")
        json_length = length
        declared = headers.get(b"inference-header-content-length")
        if declared is not None and declared.isdigit():
            json_length = min(length, int(declared))
        if json_length > max_json:
            self._stop(
                413,
                f"JSON of {json_length} bytes is over the {max_json}-byte limit: send "
                "large tensors with the binary tensor data extension",
            )
        core = self._core
        if core.buffered_body_bytes + length > max_buffered:
            self._stop(
                503,
                f"the server holds {core.buffered_body_bytes} bytes of request bodies; {length} more "
                f"would pass its {max_buffered}-byte limit: try again later",
            )
        core.buffered_body_bytes += length
        self._reserved = length
        if not self._http10 and headers.get(b"expect", b"").lower() == b"100-continue":
            if self._queue or self._busy:
                self._continue_owed = True  # after the answers before it
            elif self._transport is not None:
                self._transport.write(_CONTINUE)

    def on_body(self, chunk: bytes) -> None:
        body = self._body
        if not body:
            self._body = chunk
            return
        if type(body) is bytes:
            self._body = body = bytearray(body)
        body += chunk

    def on_message_complete(self) -> None:
        if self._length > len(self._body) and self._parser.should_upgrade():
            self._phase = _UPGRADE_BODY  # llhttp leaves an Upgrade request's body to us
            return
        self._queue.append(
            _new_request(
                Request,
                (
                    self._method,
                    self._url.decode("latin-1"),
                    self._headers,
                    self._body,
                    self._keep_alive,
                    self._http10,
                    self._reserved,
                ),
            )
        )
        self._reserved = 0
        self._phase = _IDLE
        self._continue_owed = False
        self._rearm = True

    def _upgrade_body(self, data: bytes) -> bytes:
        """The body of a request whose Upgrade header made llhttp stop; returns what follows."""
        need = self._length - len(self._body)
        self.on_body(data[:need])
        if len(self._body) >= self._length:
            self._length = 0  # complete: no longer waits on the upgrade
            self.on_message_complete()
        return data[need:]

    def _stop(self, status: int, message: str) -> None:
        self._refuse(status, message)
        raise _Stop

    # -- answering ---------------------------------------------------------------------------
    def _refuse(self, status: int, message: str) -> None:
        """Queue an error after which this connection's framing cannot be trusted: it is
        answered in its turn, then the connection closes."""
        if self._phase == _CLOSING:
            return
        self._phase = _CLOSING
        self._release(self._reserved)
        self._reserved = 0
        self._body = b""
        self._queue.append(error_response(status, message))

    def _drain(self) -> None:
        """Answer what is queued, in order, while the application and the client keep up."""
        queue, dispatch = self._queue, self._core.dispatch
        while queue and not self._busy and not self._blocked and self._transport is not None:
            request = queue.popleft()
            if isinstance(request, Response):  # a refusal
                self._transport.write(request.encode(keep_alive=False))
                self._linger()
                return
            try:
                answer = dispatch(request)
            except HttpError as e:
                answer = error_response(e.status, str(e))
            if isinstance(answer, Response):
                self._respond(request, answer)
            else:  # the application answers later (a worker thread): later requests wait
                self._busy = True
                answer.add_done_callback(partial(self._finished, request))
        transport = self._transport
        if transport is None or self._phase == _CLOSING:
            return
        if queue or self._blocked:
            self._pause_reading()
            return
        if self._busy:
            return
        if self._eof:
            transport.close()
            return
        if self._continue_owed and self._phase == _BODY:
            self._continue_owed = False
            transport.write(_CONTINUE)
        if self._reading_paused:
            self._reading_paused = False
            transport.resume_reading()

    def _finished(self, request: Request, future: asyncio.Future[Response]) -> None:
        self._busy = False
        if future.cancelled():
            self._release(request.reserved)
            return
        error = future.exception()
        if error is not None:  # the application turns every request's failure into a response
            logger.error("request handler failed", exc_info=error)
            self._respond(request, error_response(500, f"internal error: {type(error).__name__}"))
        else:
            self._respond(request, future.result())
        self._arm()
        self._drain()

    def _respond(self, request: Request, response: Response) -> None:
        method, _target, _headers, _body, keep_alive, http10, reserved = request
        if reserved:  # answered once: released once
            self._core.buffered_body_bytes -= reserved
        transport = self._transport
        if transport is None:
            return
        transport.write(response.encode(keep_alive, http10, method == "HEAD"))
        if not keep_alive:
            self._phase = _CLOSING
            self._linger()
        if response.after_write is not None:
            response.after_write()

    def _linger(self) -> None:
        """Half-close after the last answer and discard what the client still sends, so that
        it reads the answer rather than a reset; closed when the client closes, or at the
        deadline."""
        self._phase = _CLOSING
        self._drop_queue()
        transport = self._transport
        if transport is None:
            return
        if not transport.can_write_eof():
            transport.close()
            return
        transport.write_eof()
        self._deadline = _now() + LINGER_S
        if self._reading_paused:
            self._reading_paused = False
            transport.resume_reading()

    # -- flow control and deadlines ------------------------------------------------------------
    def _pause_reading(self) -> None:
        if self._transport is not None and not self._reading_paused:
            self._reading_paused = True
            self._transport.pause_reading()

    def _arm(self) -> None:
        """A fresh deadline for the phase the connection is in (after waiting on the server)."""
        self._deadline = _now() + self._core._timeouts[self._phase]

    def expire(self) -> None:
        """The deadline passed: 408 for a request in progress, else close."""
        transport = self._transport
        if transport is None:
            return
        if self._phase in (_HEAD, _BODY, _UPGRADE_BODY) and not self._queue and not self._blocked:
            timeout = self._core._timeouts[self._phase]
            part = "head" if self._phase == _HEAD else "body"
            self._refuse(408, f"the request's {part} did not arrive within {timeout:g} s")
            self._drain()
        elif self._phase == _IDLE and not self._queue and not self._blocked:
            self._phase = _CLOSING
            transport.close()
        else:  # lingering, or the client does not read what it asked for
            self.abort()

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    def _release(self, reserved: int) -> None:
        if reserved:
            self._core.buffered_body_bytes -= reserved

    def _drop_queue(self) -> None:
        for item in self._queue:
            if isinstance(item, Request):
                self._release(item.reserved)
        self._queue.clear()
        self._release(self._reserved)
        self._reserved = 0


def _malformed(error: Exception) -> str:
    reason = str(error) or type(error).__name__
    line_errors = (httptools.HttpParserInvalidMethodError, httptools.HttpParserInvalidURLError)
    where = "request line" if isinstance(error, line_errors) or "HTTP/" in reason else "request"
    return f"malformed {where}: {reason}"


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
