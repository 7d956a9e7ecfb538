"""MQTT topic names, versioned, shared by the server, the agent and the broker's ACL."""

from __future__ import annotations

__all__ = ["PREFIX", "device_topics", "fetch_request", "fetch_response"]

PREFIX = "edgec/v1"


def _check(part: str, what: str) -> str:
    if not part or any(c in part for c in "/+#\0"):
        raise ValueError(f"{what} {part!r} cannot be used in an MQTT topic (no '/', '+', '#')")
    return part


def device_topics(fleet: str, device: str) -> dict[str, str]:
    """``desired`` (server -> device, retained), ``state`` (retained), ``telemetry``, ``events``."""
    base = f"{PREFIX}/{_check(fleet, 'fleet')}/devices/{_check(device, 'device')}"
    return {name: f"{base}/{name}" for name in ("desired", "state", "telemetry", "events")}


def fetch_request(fleet: str, device: str) -> str:
    return f"{PREFIX}/{_check(fleet, 'fleet')}/fetch/{_check(device, 'device')}/request"


def fetch_response(fleet: str, device: str) -> str:
    return f"{PREFIX}/{_check(fleet, 'fleet')}/fetch/{_check(device, 'device')}/response"
