"""One HTTP/1.1 connection of the agent's local inference API: llhttp parsing, bounded on what arrives.

``HttpConnection`` is the asyncio protocol of one connection; ``agent._http`` describes the
limits it enforces and the refusals it answers. What all connections share (the limits, the
counts, the deadlines by phase, the application's ``Dispatch``) is the ``HttpCore`` it is
given.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from functools import partial
from typing import TYPE_CHECKING

import httptools

from agent._http_messages import HttpError, Request, Response, error_response
from edgec.errors import EdgecError

if TYPE_CHECKING:
    from agent._http import HttpCore

__all__ = ["LINGER_S", "HttpConnection"]

logger = logging.getLogger(__name__)

LINGER_S = 2.0
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_now = time.monotonic
_new_request = tuple.__new__  # _new_request(Request, fields): no Python-level __new__ per request

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
                self._deadline = _now() + self._core.timeouts[self._phase]
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
        self._deadline = _now() + self._core.timeouts[self._phase]

    def overdue(self, now: float) -> bool:
        """Past its deadline, and not waiting on the application."""
        return not self._busy and self._deadline < now

    def expire(self) -> None:
        """The deadline passed: 408 for a request in progress, else close."""
        transport = self._transport
        if transport is None:
            return
        if self._phase in (_HEAD, _BODY, _UPGRADE_BODY) and not self._queue and not self._blocked:
            timeout = self._core.timeouts[self._phase]
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
