"""MQTT topic names, versioned, shared by the server, the agent and the broker's ACL.

Fleet and device ids become topic levels, so they are checked names (``edgec.names``): never
empty, no ``/``, no ``+`` or ``#`` wildcards, no NUL.
"""

from __future__ import annotations

from typing import NamedTuple

from edgec.errors import InvalidNameError, ProtocolError
from edgec.names import check_name

__all__ = [
    "DEVICE_KINDS",
    "FETCH_KINDS",
    "PREFIX",
    "DeviceTopic",
    "device_topics",
    "fetch_request",
    "fetch_response",
    "parse_topic",
]

PREFIX = "edgec/v1"
DEVICE_KINDS = ("desired", "state", "telemetry", "events")
FETCH_KINDS = ("request", "response")
_MAX_TOPIC_CHARS = 512


class DeviceTopic(NamedTuple):
    """One device's topic, split: ``kind`` is one of ``DEVICE_KINDS`` or ``FETCH_KINDS``."""

    fleet: str
    device: str
    kind: str


def device_topics(fleet: str, device: str) -> dict[str, str]:
    """``desired`` (server -> device, retained), ``state`` (retained), ``telemetry``, ``events``.

    Raises ``InvalidNameError`` for an id that cannot be a topic level."""
    base = f"{PREFIX}/{check_name(fleet, 'fleet')}/devices/{check_name(device, 'device')}"
    return {name: f"{base}/{name}" for name in DEVICE_KINDS}


def fetch_request(fleet: str, device: str) -> str:
    return f"{PREFIX}/{check_name(fleet, 'fleet')}/fetch/{check_name(device, 'device')}/request"


def fetch_response(fleet: str, device: str) -> str:
    return f"{PREFIX}/{check_name(fleet, 'fleet')}/fetch/{check_name(device, 'device')}/response"


def parse_topic(topic: str) -> DeviceTopic:
    """The fleet, device and kind of a device or fetch topic; ``ProtocolError`` (one line) for
    any other topic, or one whose ids are not valid names."""
    shown = repr(topic[:100]) + ("…" if len(topic) > 100 else "")
    parts = topic.split("/", 6) if len(topic) <= _MAX_TOPIC_CHARS else []
    if len(parts) != 6 or "/".join(parts[:2]) != PREFIX:
        raise ProtocolError(f"topic {shown} is not {PREFIX}/FLEET/devices|fetch/DEVICE/KIND")
    fleet, family, device, kind = parts[2:]
    kinds = DEVICE_KINDS if family == "devices" else FETCH_KINDS if family == "fetch" else ()
    if kind not in kinds:
        raise ProtocolError(f"topic {shown} is not {PREFIX}/FLEET/devices|fetch/DEVICE/KIND")
    try:
        return DeviceTopic(check_name(fleet, "fleet"), check_name(device, "device"), kind)
    except InvalidNameError as e:
        raise ProtocolError(f"topic {shown}: {e}") from e
