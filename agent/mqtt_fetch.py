"""Downloading over MQTT: one request per chunk, each chunk checked, resumable.

``MqttFetcher`` plugs into python-tuf's ngclient, which checks every file it gets against
the signed metadata. ``ResumableDownload`` fetches a large target into a ``.partial`` file,
checks every chunk against the sha256 list signed in the target's custom fields, and after
a disconnect or a restart carries on from the last good chunk instead of starting over.
"""

from __future__ import annotations

import hashlib
import os
import queue
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from tuf.api import exceptions as tuf_errors
from tuf.ngclient import FetcherInterface

from edgec.errors import FetchError, TrustError
from edgec.fetch_protocol import decode_response, encode_request
from edgec.topics import fetch_request, fetch_response

__all__ = ["ChunkClient", "MqttFetcher", "ResumableDownload"]

SCHEME = "edgec-mqtt:"


class ChunkClient:
    """Asks the server for one chunk at a time over the device's fetch topics."""

    def __init__(self, client: mqtt.Client, fleet: str, device: str, timeout_s: float = 10.0) -> None:
        self.client = client
        self.request_topic = fetch_request(fleet, device)
        self.timeout_s = timeout_s
        self._responses: queue.Queue[bytes] = queue.Queue()
        response_topic = fetch_response(fleet, device)
        client.message_callback_add(response_topic, lambda _c, _u, m: self._responses.put(bytes(m.payload)))
        client.subscribe(response_topic, qos=1)

    def chunk(self, path: str, offset: int, attempts: int = 3) -> tuple[int, bytes]:
        """``(total length, bytes at offset)``; raises ``FetchError`` on silence or 404.

        Responses come at QoS 0, so a lost one is asked for again (``attempts`` times)."""
        for _ in range(attempts):
            answer = self._ask(path, offset)
            if answer is not None:
                return answer
        raise FetchError(f"no answer for {path} at offset {offset} after {attempts} tries")

    def _ask(self, path: str, offset: int) -> tuple[int, bytes] | None:
        request_id = uuid.uuid4().hex
        info = self.client.publish(self.request_topic, encode_request(request_id, path, offset), qos=1)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            raise FetchError(f"cannot send a fetch request for {path}: not connected")
        while True:
            try:
                payload = self._responses.get(timeout=self.timeout_s)
            except queue.Empty:
                return None
            try:
                header, data = decode_response(payload)
            except ValueError:
                continue  # garbage on our topic: not an answer
            if header.get("id") != request_id:
                continue  # a late answer to an earlier request
            if header.get("status") != 200:
                raise FetchError(f"{path}: the server answered {header.get('status')}")
            return int(header["total"]), data


class MqttFetcher(FetcherInterface):
    """ngclient's transport over MQTT; URLs are ``edgec-mqtt:<path in the repository>``."""

    def __init__(self, chunks: ChunkClient) -> None:
        self.chunks = chunks

    def _fetch(self, url: str) -> Iterator[bytes]:
        path = url.removeprefix(SCHEME)
        try:
            total, data = self.chunks.chunk(path, 0)
        except FetchError as e:
            raise tuf_errors.DownloadHTTPError(str(e), 404) from e
        return self._rest(path, total, data)

    def _rest(self, path: str, total: int, first: bytes) -> Iterator[bytes]:
        yield first
        offset = len(first)
        while offset < total:
            try:
                _, data = self.chunks.chunk(path, offset)
            except FetchError as e:
                raise tuf_errors.DownloadError(str(e)) from e
            if not data:
                return
            yield data
            offset += len(data)


class ResumableDownload:
    """A target fetched chunk by chunk into ``dest.partial``, every chunk checked against the
    signed chunk hashes; only chunks that passed are kept, so a retry resumes after them."""

    def __init__(
        self, chunks: ChunkClient, path: str, dest: Path, *, custom: dict[str, Any], length: int, sha256: str
    ) -> None:
        self.chunks = chunks
        self.path = path
        self.dest = dest
        self.partial = dest.with_name(dest.name + ".partial")
        self.chunk_bytes = int(custom["chunk_bytes"])
        self.hashes: list[str] = list(custom["chunks"])
        self.length = length
        self.sha256 = sha256

    def good_bytes(self) -> int:
        return self.partial.stat().st_size if self.partial.exists() else 0

    def run(self) -> Path:
        offset = self.good_bytes()
        if offset % self.chunk_bytes and offset != self.length:
            offset -= offset % self.chunk_bytes  # a torn last write: drop the partial chunk
            with self.partial.open("r+b") as f:
                f.truncate(offset)
        with self.partial.open("ab") as out:
            while offset < self.length:
                index = offset // self.chunk_bytes
                _, data = self.chunks.chunk(self.path, offset)
                expected = min(self.chunk_bytes, self.length - offset)
                if len(data) != expected or hashlib.sha256(data).hexdigest() != self.hashes[index]:
                    raise TrustError(f"{self.path}: chunk {index} does not match its signed hash", "target")
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
                offset += len(data)
        digest = hashlib.sha256(self.partial.read_bytes()).hexdigest()
        if digest != self.sha256:
            self.partial.unlink()
            raise TrustError(f"{self.path}: the assembled file does not match its signed sha256", "target")
        os.replace(self.partial, self.dest)
        return self.dest
