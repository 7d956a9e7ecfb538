"""The operator API's HTTP/1.1 transport: uvicorn's h11 protocol, with the limits it lacks.

uvicorn bounds the keep-alive idle time and the head's size (h11), but a client that sends
its head one byte a second is waited on for ever (every byte re-arms nothing and cancels
the keep-alive timer), one that stops reading its answer holds a task for ever, and its
``limit_concurrency`` accepts every connection and answers 503 only once a whole head has
arrived. ``BoundedH11Protocol`` adds, per connection:

- a head deadline: from the moment a connection opens, or an answer is sent, the next
  request's line and headers must be complete within ``head_timeout_s`` (a partial head is
  answered 408; an idle keep-alive connection is just closed);
- a write deadline: an answer the client does not take (its window stays full) for
  ``idle_timeout_s`` ends the connection;
- at most ``max_connections`` connections: one more is answered 503 and closed at once;
- a head over ``max_head_bytes`` is 431; every protocol error h11 finds is a 4xx with a
  one-line JSON ``{"error": ...}``, never uvicorn's plain text and never a 5xx;
- a client that half-closes after a whole request still gets its answer (uvicorn closes at
  once); warnings about malformed requests are logged at debug level (a client can send
  as many as it likes).

The body's limits (``Content-Length`` required, size, deadline) are the application's,
checked after the token (``ota_server._asgi_app``). ``ServerThread`` runs uvicorn on its own
event loop in a thread, on a socket bound before it starts (port 0 picks a free one).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import socket
import threading
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, ClassVar

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

__all__ = ["ApiLimits", "BoundedH11Protocol", "ServerThread"]

logger = logging.getLogger(__name__)
_START_WAIT_S = 10.0
_BACKLOG = 128
_GRACE_S = 5  # how long close() lets requests under way finish


@dataclass(frozen=True)
class ApiLimits:
    max_body_bytes: int = 64 * 1024
    max_json_depth: int = 32
    head_timeout_s: float = 10.0  # the request line and headers, whole; also keep-alive idle time
    body_timeout_s: float = 30.0  # the whole body
    idle_timeout_s: float = 10.0  # a body that stalls, an answer the client does not read
    max_connections: int = 64
    max_head_bytes: int = 16 * 1024  # the request line and headers


def raw_answer(status: int, message: str, headers: dict[str, str] | None = None) -> bytes:
    """A whole HTTP/1.1 answer with a JSON ``{"error": message}``, for the connection's last
    words (written straight to the transport, outside any request cycle)."""
    body = json.dumps({"error": message}).encode()
    lines = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}", "Content-Type: application/json"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    lines += [f"Content-Length: {len(body)}", "Connection: close", "", ""]
    return "\r\n".join(lines).encode() + body


class _Connection(h11.Connection):
    """h11's connection, remembering the protocol error it raised (uvicorn's handler drops it)."""

    last_error: h11.RemoteProtocolError | None = None

    def next_event(self) -> Any:
        try:
            return super().next_event()
        except h11.RemoteProtocolError as e:
            self.last_error = e
            raise


class _ClientFaults(logging.LoggerAdapter):
    """uvicorn's protocol logger, with its warnings (a malformed request, an unsupported
    upgrade: the client's doing, and as many as a client likes) logged at debug level."""

    @property
    def level(self) -> int:  # uvicorn compares it with its TRACE level
        return self.logger.level

    def warning(self, msg: object, *args: Any, **kwargs: Any) -> None:
        self.debug(msg, *args, **kwargs)


_PROTOCOL_LOG = _ClientFaults(logging.getLogger(f"{__name__}.protocol"), {})


class BoundedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a head deadline, a write deadline, a connection cap and
    JSON protocol errors. ``limits`` is set on a subclass per server (``ServerThread``)."""

    limits: ClassVar[ApiLimits] = ApiLimits()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.logger = _PROTOCOL_LOG  # type: ignore[assignment]
        self.conn = self._h11 = _Connection(h11.SERVER, self.limits.max_head_bytes)
        self._head_timer: asyncio.TimerHandle | None = None
        self._write_timer: asyncio.TimerHandle | None = None
        self._half_closed = False

    # -- the connection -------------------------------------------------------------------
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        if len(self.connections) >= self.limits.max_connections:
            self.transport = transport
            message = f"the server is serving {self.limits.max_connections} connections; retry shortly"
            transport.write(raw_answer(HTTPStatus.SERVICE_UNAVAILABLE, message, {"Retry-After": "1"}))
            transport.close()
            return
        super().connection_made(transport)
        self._await_head()

    def eof_received(self) -> bool | None:  # type: ignore[override]
        """The client half-closed. One that has sent a whole request still reads the answer
        (uvicorn would close at once and drop it); a head or body cut short is refused (400)."""
        partial, _ = self.conn.trailing_data
        under_way = self.cycle is not None and not self.cycle.response_complete
        if under_way and self.conn.their_state is h11.DONE:
            self._half_closed = True  # answer, then close
            return True
        if under_way or (self.conn.their_state is h11.IDLE and partial):
            self.conn.receive_data(b"")  # h11 now raises "peer unexpectedly closed": a 400
            self.handle_events()
        return None  # the transport closes

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        self._cancel_write_timer()
        super().connection_lost(exc)

    # -- the head deadline ------------------------------------------------------------------
    def _await_head(self) -> None:
        self._cancel_head_timer()
        self._head_timer = self.loop.call_later(self.limits.head_timeout_s, self._head_too_slow)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_too_slow(self) -> None:
        self._head_timer = None
        if self.transport.is_closing():
            return
        partial, _ = self.conn.trailing_data
        if self.conn.their_state is h11.IDLE and partial:  # a head begun, not finished
            message = f"the request head did not arrive within {self.limits.head_timeout_s:g} s"
            self.transport.write(raw_answer(HTTPStatus.REQUEST_TIMEOUT, message))
        logger.debug("closing a connection from %s: no request head in time", self.client)
        self.transport.close()

    def handle_events(self) -> None:
        cycle = self.cycle
        super().handle_events()
        if self.cycle is not cycle:  # a whole head arrived: a new request is under way
            self._cancel_head_timer()

    def on_response_complete(self) -> None:
        if self._half_closed:
            self.transport.close()
        elif not self.transport.is_closing():
            self._await_head()  # before uvicorn looks at a pipelined request (which cancels it)
        super().on_response_complete()

    # -- the write deadline -----------------------------------------------------------------
    def pause_writing(self) -> None:
        super().pause_writing()
        if self._write_timer is None:
            self._write_timer = self.loop.call_later(self.limits.idle_timeout_s, self._write_stalled)

    def resume_writing(self) -> None:
        self._cancel_write_timer()
        super().resume_writing()

    def _cancel_write_timer(self) -> None:
        if self._write_timer is not None:
            self._write_timer.cancel()
            self._write_timer = None

    def _write_stalled(self) -> None:
        self._write_timer = None
        logger.debug("closing a connection from %s: it stopped reading", self.client)
        self.transport.abort()

    # -- protocol errors --------------------------------------------------------------------
    def send_400_response(self, msg: str) -> None:
        """What h11 refused (a bad Content-Length, a missing Host, a head too large): a 4xx in
        JSON, and the connection closed."""
        error = self._h11.last_error
        status = error.error_status_hint if error is not None else HTTPStatus.BAD_REQUEST
        if status == HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE:
            message = f"the request head is over {self.limits.max_head_bytes:,} bytes"
        else:
            message = f"malformed HTTP request: {error or msg}"
        if not 400 <= status < 500:  # h11's 501 for an unknown transfer coding: the client's fault
            status = HTTPStatus.BAD_REQUEST
        self.transport.write(raw_answer(status, message[:300]))
        self.transport.close()


class ServerThread:
    """uvicorn serving an ASGI app in a background thread, on its own event loop."""

    def __init__(self, app: Any, limits: ApiLimits, host: str, port: int) -> None:
        protocol = type("Protocol", (BoundedH11Protocol,), {"limits": limits})
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._socket = socket.create_server((host, port), family=family, backlog=_BACKLOG)
        self.port: int = self._socket.getsockname()[1]
        config = uvicorn.Config(
            app,
            http=protocol,
            ws="none",
            lifespan="off",
            loop="asyncio",
            log_config=None,  # the library never configures logging
            access_log=False,
            proxy_headers=False,
            server_header=False,
            backlog=_BACKLOG,
            timeout_keep_alive=math.ceil(limits.head_timeout_s),  # our head deadline comes first
            timeout_graceful_shutdown=_GRACE_S,
            h11_max_incomplete_event_size=limits.max_head_bytes,
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [self._socket]}, name="http", daemon=True
        )

    def start(self) -> int:
        """Start serving; returns the bound port once uvicorn accepts connections."""
        self._thread.start()
        waited = 0.0
        while not self._server.started:
            if not self._thread.is_alive() or waited > _START_WAIT_S:
                self._socket.close()
                raise RuntimeError(f"the HTTP server did not start on port {self.port}")
            self._thread.join(0.01)
            waited += 0.01
        return self.port

    def close(self) -> None:
        """Stop accepting, close idle connections, let requests under way finish (for up to
        ``_GRACE_S``, then they are cancelled), and wait for the thread."""
        self._server.should_exit = True
        self._thread.join(timeout=_GRACE_S + 5)
        self._socket.close()
