"""HTTP/1.1 messages of the agent's local inference API, with no I/O.

``Request`` is one complete request as the connection hands it to the application,
``Response`` one answer as it goes on the wire (``Response.encode``), ``HttpError`` a
refusal that says whose fault it is by its status, and ``error_response`` the
``{"error": ...}`` answer every refusal gets. ``Dispatch`` is the application's side: a
callable from a ``Request`` to a ``Response`` (or a future one).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

from edgec.errors import EdgecError

__all__ = ["MAX_MESSAGE_CHARS", "Dispatch", "HttpError", "Request", "Response", "error_response"]

logger = logging.getLogger(__name__)

MAX_MESSAGE_CHARS = 1000  # an error message echoes what the client sent: bounded

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


Dispatch = Callable[[Request], "Response | asyncio.Future[Response]"]
"""The application: a response now, or a future one (the connection waits for it, in order)."""
