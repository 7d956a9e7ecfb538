"""The operator API's HTTP/1.1 transport: the standard library's server, with limits.

``http.server`` as it comes reads whatever body a client declares before anyone looks at
it, waits on a silent client for ever, starts a thread for every connection, and answers a
method it does not know with a 501 in HTML. Here:

- a request is resolved and authorized from its head alone (``App.prepare``); the body is
  read only after that, only for a route that takes one, and only with a valid
  ``Content-Length`` within ``max_body_bytes`` (411 without one, 400 if it is not a
  non-negative integer, 413 over the limit; chunked bodies are refused with 411);
- the head must arrive within ``head_timeout_s`` (also how long an idle keep-alive
  connection is kept), the body within ``body_timeout_s``, and every read or write of the
  socket within ``idle_timeout_s``: a slow or stalled client loses its connection;
- at most ``max_connections`` connections are served at once; one more is answered 503 and
  closed at once (an overload, not a fault of the request);
- every answer, the server's own protocol errors included, is JSON ``{"error": ...}``;
  an unexpected exception is logged with an id and answered 500 naming only that id.
"""

from __future__ import annotations

import io
import json
import logging
import re
import secrets
import socket
import sys
import threading
import time
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Protocol

from edgec.errors import EdgecError

__all__ = ["ApiLimits", "App", "HttpError", "Prepared", "Response", "serve"]

logger = logging.getLogger(__name__)

Response = tuple[int, dict[str, str], bytes]
_LENGTH = re.compile(r"[0-9]{1,18}")
_WRITE_CHUNK = 64 * 1024


@dataclass(frozen=True)
class ApiLimits:
    max_body_bytes: int = 64 * 1024
    max_json_depth: int = 32
    head_timeout_s: float = 10.0  # the request line and headers, whole; also keep-alive idle time
    body_timeout_s: float = 30.0  # the whole body
    idle_timeout_s: float = 10.0  # any one read or write of the socket
    max_connections: int = 64


class HttpError(EdgecError):
    """An answer with a 4xx status and a one-line message (at most 300 characters)."""

    def __init__(self, status: HTTPStatus, message: str) -> None:
        line = (message.splitlines() or [""])[0]
        super().__init__(line if len(line) <= 300 else line[:299] + "…")
        self.status = status
        self.headers: dict[str, str] = {}


class Prepared(Protocol):
    @property
    def wants_body(self) -> bool: ...

    def run(self, body: bytes) -> Response: ...


class App(Protocol):
    def prepare(self, method: str, path: str, headers: dict[str, str]) -> Prepared:
        """Resolve and authorize a request from its head; raises ``HttpError``."""
        ...

    def error(self, status: HTTPStatus, message: str, headers: dict[str, str] | None = None) -> Response: ...


class _DeadlineReader(io.RawIOBase):
    """The socket's input, with a deadline for the whole of what is being read (a head, a
    body) on top of the per-read idle timeout."""

    def __init__(self, sock: socket.socket, idle_s: float) -> None:
        self._sock = sock
        self.idle_s = idle_s
        self.deadline = time.monotonic() + idle_s

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("the client was too slow")
        self._sock.settimeout(min(remaining, self.idle_s))
        return self._sock.recv_into(buffer)


def _json_body(status: int, message: str, extra: dict[str, Any] | None = None) -> bytes:
    return json.dumps({"error": message, **(extra or {})}).encode()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # the head and the body go in separate writes
    app: App
    limits: ApiLimits

    # -- the connection ---------------------------------------------------------------------
    def setup(self) -> None:
        super().setup()
        self.rfile.close()  # the plain socket file; reads go through the deadline reader
        self._reader = _DeadlineReader(self.connection, self.limits.idle_timeout_s)
        self.rfile = io.BufferedReader(self._reader)

    def handle_one_request(self) -> None:
        self._reader.deadline = time.monotonic() + self.limits.head_timeout_s
        self._body_pending = False
        super().handle_one_request()

    def __getattr__(self, name: str) -> Any:
        if name.startswith("do_"):  # every method reaches the router, which answers 404 or 405
            return self._handle
        raise AttributeError(name)

    def handle_expect_100(self) -> bool:
        return True  # "100 Continue" only once the token is checked (see _read_body)

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug(format, *args)

    # -- answers ----------------------------------------------------------------------------
    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """The base class's own errors (a bad request line, headers too long, a timeout): JSON."""
        self.close_connection = True
        try:
            phrase = HTTPStatus(code).phrase
        except ValueError:
            phrase = "error"
        self._send(code, {"Content-Type": "application/json"}, _json_body(code, message or phrase))

    def _send(self, status: int, headers: dict[str, str], data: bytes) -> None:
        if self._body_pending:  # a body we did not read: the connection cannot be reused
            self.close_connection = True
        self.connection.settimeout(self.limits.idle_timeout_s)
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command == "HEAD" or status < 200 or status in (204, 304):
            return
        view = memoryview(data)
        for start in range(0, len(view), _WRITE_CHUNK):  # each chunk within the idle timeout
            self.connection.settimeout(self.limits.idle_timeout_s)
            self.wfile.write(view[start : start + _WRITE_CHUNK])

    # -- a request ----------------------------------------------------------------------------
    def _handle(self) -> None:
        headers = {k.lower(): v for k, v in self.headers.items()}
        self._body_pending = (
            "transfer-encoding" in headers or headers.get("content-length", "0").strip() != "0"
        )
        try:
            prepared = self.app.prepare(self.command, self.path.split("?", 1)[0], headers)
            body = self._read_body() if prepared.wants_body else b""
            status, answer_headers, data = prepared.run(body)
        except HttpError as e:
            status, answer_headers, data = self.app.error(e.status, str(e), e.headers)
        except TimeoutError:
            self.close_connection = True
            message = f"the request body did not arrive within {self.limits.body_timeout_s:g} s"
            status, answer_headers, data = self.app.error(HTTPStatus.REQUEST_TIMEOUT, message)
        except Exception:  # a bug of ours: log it with an id, answer with the id only
            error_id = secrets.token_hex(6)
            logger.exception("%s %s failed (error %s)", self.command, self.path[:200], error_id)
            message = f"internal error {error_id}; the server's log has the details"
            status, answer_headers, data = self.app.error(HTTPStatus.INTERNAL_SERVER_ERROR, message)
        self._send(status, answer_headers, data)

    def _read_body(self) -> bytes:
        """Exactly ``Content-Length`` bytes, within the limits; called once the request is
        authorized."""
        if self.headers.get("Transfer-Encoding") is not None:
            raise HttpError(
                HTTPStatus.LENGTH_REQUIRED, "chunked request bodies are not accepted: send Content-Length"
            )
        values = {v.strip() for v in self.headers.get_all("Content-Length") or []}
        if not values:
            raise HttpError(HTTPStatus.LENGTH_REQUIRED, "this request needs a Content-Length header")
        value = values.pop()
        if values or not _LENGTH.fullmatch(value):
            raise HttpError(HTTPStatus.BAD_REQUEST, "Content-Length must be one non-negative integer")
        length, limit = int(value), self.limits.max_body_bytes
        if length > limit:
            raise HttpError(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"body of {length:,} bytes is over {limit:,}"
            )
        if length and self.headers.get("Expect", "").lower() == "100-continue":
            self.connection.settimeout(self.limits.idle_timeout_s)
            self.send_response_only(HTTPStatus.CONTINUE)
            self.end_headers()
        self._reader.deadline = time.monotonic() + self.limits.body_timeout_s
        body = self.rfile.read(length) if length else b""
        if len(body) < length:
            self.close_connection = True
            raise HttpError(HTTPStatus.BAD_REQUEST, f"body ended after {len(body)} of {length} bytes")
        self._body_pending = False
        return body


class _BoundedServer(ThreadingHTTPServer):
    """A thread per connection, at most ``max_connections`` of them."""

    daemon_threads = True
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], handler: type[_Handler], max_connections: int) -> None:
        self._slots = threading.BoundedSemaphore(max_connections)
        self.max_connections = max_connections
        super().__init__(address, handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self._refuse(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def _refuse(self, request: socket.socket) -> None:
        body = _json_body(503, f"the server is serving {self.max_connections} connections; retry shortly")
        head = (
            "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nRetry-After: 1\r\nConnection: close\r\n\r\n"
        )
        try:
            request.settimeout(1.0)
            request.sendall(head.encode() + body)
        except OSError:
            pass
        self.shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        error = sys.exc_info()[1]
        if isinstance(error, OSError):  # the client went away, or was too slow
            logger.debug("connection from %s ended: %s", client_address, error)
        else:
            logger.exception("connection from %s failed", client_address)


def serve(app: App, limits: ApiLimits, host: str, port: int) -> ThreadingHTTPServer:
    """Start serving ``app`` in a background thread; ``server_address`` has the port."""
    handler = type("Handler", (_Handler,), {"app": app, "limits": limits})
    server = _BoundedServer((host, port), handler, limits.max_connections)
    threading.Thread(target=server.serve_forever, name="http", daemon=True).start()
    return server
