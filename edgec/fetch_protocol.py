"""The fetch-over-MQTT wire format shared by the server and the agent.

Request (device -> server, JSON): ``{"id", "path", "offset"}`` and optionally ``"length"``
(1 to ``MAX_CHUNK_BYTES``: a content-defined chunk is shorter than the server's chunk; a server
before it ignores the field and answers up to its chunk size, so the device keeps the first
``length`` bytes). Response (server -> device): a 4-byte big-endian header length, a JSON
header ``{"id", "path", "offset", "total", "status"}`` and the chunk's bytes.

Both decoders accept exactly that or raise ``ProtocolError`` (a ``ValueError``, one line):
never another exception, whatever arrives.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from typing import Any

from edgec.chunking import MAX_CHUNK_BYTES
from edgec.errors import InvalidNameError, ProtocolError
from edgec.names import check_relative_path

__all__ = [
    "MAX_CHUNK_BYTES",
    "MAX_HEADER_BYTES",
    "MAX_REQUEST_BYTES",
    "FetchRequest",
    "decode_request",
    "decode_response",
    "encode_request",
    "encode_response",
]

MAX_REQUEST_BYTES = 4096
MAX_HEADER_BYTES = 4096
_MAX_ID_CHARS = 128


@dataclass(frozen=True)
class FetchRequest:
    id: str
    path: str  # in the repository: relative, checked by ``edgec.names.check_relative_path``
    offset: int
    length: int | None = None  # at most this many bytes (1 to MAX_CHUNK_BYTES); None: the server's chunk


def encode_request(request_id: str, path: str, offset: int, length: int | None = None) -> bytes:
    request: dict[str, Any] = {"id": request_id, "path": path, "offset": offset}
    if length is not None:
        request["length"] = length
    return json.dumps(request, separators=(",", ":")).encode()


def encode_response(header: dict[str, Any], data: bytes = b"") -> bytes:
    raw = json.dumps(header, separators=(",", ":")).encode()
    return struct.pack(">I", len(raw)) + raw + data


def _object(raw: bytes | bytearray, what: str) -> dict[str, Any]:
    try:
        value = json.loads(raw)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError, JSONDecodeError are ValueErrors
        raise ProtocolError(f"{what} is not JSON: {type(e).__name__}") from e
    if not isinstance(value, dict):
        raise ProtocolError(f"{what} is not a JSON object")
    return value


def _count(value: object, what: str) -> int:
    """A non-negative integer (``bool`` is not one)."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ProtocolError(f"{what} {str(value)[:40]!r} is not a non-negative integer")
    return value


def decode_request(payload: bytes | bytearray) -> FetchRequest:
    """A device's fetch request, bounded and checked; ``ProtocolError`` otherwise."""
    if len(payload) > MAX_REQUEST_BYTES:
        raise ProtocolError(f"fetch request of {len(payload)} bytes, over the limit of {MAX_REQUEST_BYTES}")
    raw = _object(payload, "fetch request")
    request_id, path = raw.get("id"), raw.get("path")
    if not isinstance(request_id, str) or not 0 < len(request_id) <= _MAX_ID_CHARS:
        raise ProtocolError(f"fetch request id {str(request_id)[:40]!r} is not a string of 1-{_MAX_ID_CHARS}")
    try:
        check_relative_path(path, "fetch request path")
    except InvalidNameError as e:
        raise ProtocolError(str(e)) from e
    assert isinstance(path, str)  # checked just above
    offset = _count(raw.get("offset"), "fetch request offset")
    length = raw.get("length")
    if length is not None and not 0 < _count(length, "fetch request length") <= MAX_CHUNK_BYTES:
        raise ProtocolError(f"fetch request length {length} is not 1-{MAX_CHUNK_BYTES}")
    return FetchRequest(request_id, path, offset, length)


def decode_response(payload: bytes | bytearray) -> tuple[dict[str, Any], bytes]:
    """``(header, chunk bytes)``; the header is an object with a string ``id`` and an integer
    ``status``, and for status 200 non-negative integers ``total`` and ``offset``. Other fields
    are kept. ``ProtocolError`` otherwise."""
    if len(payload) < 4:
        raise ProtocolError("fetch response shorter than its header length")
    (size,) = struct.unpack(">I", payload[:4])
    if size > MAX_HEADER_BYTES or size > len(payload) - 4:
        raise ProtocolError(f"fetch response header length {size} is over the limit or the payload")
    header = _object(payload[4 : 4 + size], "fetch response header")
    if not isinstance(header.get("id"), str):
        raise ProtocolError("fetch response header has no string id")
    status = header.get("status")
    if not isinstance(status, int) or isinstance(status, bool):
        raise ProtocolError(f"fetch response status {str(status)[:40]!r} is not an integer")
    if status == 200:
        _count(header.get("total"), "fetch response total")
        _count(header.get("offset"), "fetch response offset")
    return header, bytes(payload[4 + size :])
