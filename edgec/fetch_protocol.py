"""The fetch-over-MQTT wire format shared by the server and the agent.

Request (device -> server, JSON): ``{"id", "path", "offset"}``. Response (server -> device):
a 4-byte big-endian header length, a JSON header ``{"id", "path", "offset", "total",
"status"}`` and the chunk's bytes.
"""

from __future__ import annotations

import json
import struct
from typing import Any

__all__ = ["decode_response", "encode_request", "encode_response"]


def encode_request(request_id: str, path: str, offset: int) -> bytes:
    return json.dumps({"id": request_id, "path": path, "offset": offset}, separators=(",", ":")).encode()


def encode_response(header: dict[str, Any], data: bytes = b"") -> bytes:
    raw = json.dumps(header, separators=(",", ":")).encode()
    return struct.pack(">I", len(raw)) + raw + data


def decode_response(payload: bytes) -> tuple[dict[str, Any], bytes]:
    if len(payload) < 4:
        raise ValueError("response shorter than its header length")
    (size,) = struct.unpack(">I", payload[:4])
    header = json.loads(payload[4 : 4 + size])
    if not isinstance(header, dict):
        raise ValueError("response header is not an object")
    return header, payload[4 + size :]
