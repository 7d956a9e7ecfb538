"""Serving the repository over MQTT: metadata and target blobs, chunk by chunk.

A device publishes a request on its fetch topic; the server answers on the device's response
topic with one chunk (at most ``chunk_bytes``, below every common broker's packet limit).
The wire format is in ``edgec.fetch_protocol``. Any chunk can be asked for, so a
download resumes wherever it stopped. Malformed requests are logged and dropped.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt

from edgec.fetch_protocol import encode_response
from edgec.topics import PREFIX, fetch_response

__all__ = ["FetchServer"]

logger = logging.getLogger(__name__)
REQUEST_FILTER = f"{PREFIX}/+/fetch/+/request"
MAX_REQUEST_BYTES = 4096


class FetchServer:
    """Answers fetch requests from ``folder`` (the image repository: metadata/, targets/)."""

    def __init__(self, folder: Path, client: mqtt.Client, chunk_bytes: int = 256 * 1024) -> None:
        self.folder = folder.resolve()
        self.client = client
        self.chunk_bytes = chunk_bytes
        self.dropped = 0
        client.message_callback_add(REQUEST_FILTER, self._on_request)

    def start(self) -> None:
        self.client.subscribe(REQUEST_FILTER, qos=1)

    def _on_request(self, _client: Any, _userdata: Any, message: mqtt.MQTTMessage) -> None:
        parts = message.topic.split("/")
        fleet, device = parts[2], parts[4]
        try:
            if len(message.payload) > MAX_REQUEST_BYTES:
                raise ValueError(f"request of {len(message.payload)} bytes")
            request = json.loads(message.payload)
            request_id, path, offset = str(request["id"]), str(request["path"]), int(request["offset"])
            if offset < 0:
                raise ValueError("negative offset")
        except (ValueError, KeyError, TypeError, RecursionError) as e:
            self.dropped += 1
            logger.warning("dropped a malformed fetch request from %s/%s: %s", fleet, device, e)
            return
        target = (self.folder / path).resolve()
        topic = fetch_response(fleet, device)
        if not target.is_relative_to(self.folder) or not target.is_file():
            self.client.publish(
                topic, encode_response({"id": request_id, "path": path, "status": 404}), qos=1
            )
            return
        total = target.stat().st_size
        with target.open("rb") as f:
            f.seek(offset)
            data = f.read(self.chunk_bytes)
        header = {"id": request_id, "path": path, "offset": offset, "total": total, "status": 200}
        # QoS 0: a response is only useful to the request waiting for it, and a lost one is
        # asked for again; QoS 1 here cost a ~40 ms stall per chunk (5.7 vs 167 MB/s measured)
        self.client.publish(topic, encode_response(header, data), qos=0)
