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
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO, Protocol

import paho.mqtt.client as mqtt
from tuf.api import exceptions as tuf_errors
from tuf.ngclient import FetcherInterface

from edgec._atomic import atomic_replace
from edgec.errors import FetchError, HashMismatchError
from edgec.fetch_protocol import decode_response, encode_request
from edgec.topics import fetch_request, fetch_response

__all__ = [
    "ChunkClient",
    "ChunkSource",
    "HttpChunks",
    "MqttFetcher",
    "PartialWriter",
    "ResumableDownload",
    "Throttled",
]

SCHEME = "edgec-mqtt:"


class ChunkSource(Protocol):
    def chunk(self, path: str, offset: int, length: int | None = None) -> tuple[int, bytes]:
        """``(total length, the bytes at offset)`` of a repository file: one chunk of the
        source's size, or at most ``length`` bytes."""
        ...


class Throttled:
    """A chunk source held to ``bytes_per_s`` (devices on metered or shared links)."""

    def __init__(self, source: ChunkSource, bytes_per_s: float) -> None:
        self.source = source
        self.bytes_per_s = bytes_per_s
        self._started = time.monotonic()
        self._bytes = 0

    def chunk(self, path: str, offset: int, length: int | None = None) -> tuple[int, bytes]:
        total, data = self.source.chunk(path, offset, length)
        self._bytes += len(data)
        ahead = self._bytes / self.bytes_per_s - (time.monotonic() - self._started)
        if ahead > 0:
            time.sleep(ahead)
        return total, data


class HttpChunks:
    """The same chunks over HTTP Range requests (a server or a CDN in front of it)."""

    def __init__(self, base_url: str, chunk_bytes: int = 256 * 1024, timeout_s: float = 10.0) -> None:
        self.base_url = base_url.rstrip("/") + "/"
        self.chunk_bytes = chunk_bytes
        self.timeout_s = timeout_s

    def chunk(self, path: str, offset: int, length: int | None = None) -> tuple[int, bytes]:
        request = urllib.request.Request(self.base_url + path)
        request.add_header("Range", f"bytes={offset}-{offset + (length or self.chunk_bytes) - 1}")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                data = response.read()
                content_range = response.headers.get("Content-Range", "")
        except (OSError, ValueError) as e:  # URLError and HTTPError are OSErrors
            raise FetchError(f"cannot fetch {path} at {offset} over HTTP: {e}") from e
        total = int(content_range.rsplit("/", 1)[1]) if "/" in content_range else offset + len(data)
        return total, data


class ChunkClient:
    """Asks the server for one chunk at a time over the device's fetch topics."""

    def __init__(self, client: mqtt.Client, fleet: str, device: str, timeout_s: float = 10.0) -> None:
        self.client = client
        self.request_topic = fetch_request(fleet, device)
        self.timeout_s = timeout_s
        self._responses: queue.Queue[bytes] = queue.Queue()
        response_topic = fetch_response(fleet, device)
        self.response_topic = response_topic
        client.message_callback_add(response_topic, lambda _c, _u, m: self._responses.put(bytes(m.payload)))
        self.subscribe()

    def subscribe(self) -> None:
        """(Again, after a reconnect with a clean session.)"""
        self.client.subscribe(self.response_topic, qos=1)

    def chunk(
        self, path: str, offset: int, length: int | None = None, attempts: int = 3
    ) -> tuple[int, bytes]:
        """``(total length, bytes at offset)``, at most ``length`` of them when given (a server
        that does not know the field answers a whole chunk: the rest is dropped); raises
        ``FetchError`` on silence or 404.

        Responses come at QoS 0, so a lost one is asked for again (``attempts`` times)."""
        for _ in range(attempts):
            answer = self._ask(path, offset, length)
            if answer is not None:
                total, data = answer
                return total, data if length is None else data[:length]
        raise FetchError(f"no answer for {path} at offset {offset} after {attempts} tries")

    def _ask(self, path: str, offset: int, length: int | None) -> tuple[int, bytes] | None:
        request_id = uuid.uuid4().hex
        request = encode_request(request_id, path, offset, length)
        info = self.client.publish(self.request_topic, request, qos=1)
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
    signed chunk hashes; only chunks that passed are kept, so a retry resumes after them.

    ``pieces`` are the signed chunks in file order, ``(offset, length, sha256)``: here the fixed
    ``chunk_bytes`` ones; ``agent.delta.DeltaDownload`` uses the content-defined ones and takes
    some of them from disk. ``fetched_bytes`` and ``reused_bytes`` count this run's bytes."""

    def __init__(
        self, chunks: ChunkSource, path: str, dest: Path, *, custom: dict[str, Any], length: int, sha256: str
    ) -> None:
        chunk_bytes = int(custom["chunk_bytes"])
        spans = [(o, min(chunk_bytes, length - o)) for o in range(0, length, chunk_bytes)]
        # a list of hashes shorter than the file leaves its tail without pieces: refused in run()
        pieces = [(o, n, str(h)) for (o, n), h in zip(spans, custom["chunks"], strict=False)]
        self._setup(chunks, path, dest, pieces=pieces, length=length, sha256=sha256)

    def _setup(
        self,
        chunks: ChunkSource,
        path: str,
        dest: Path,
        *,
        pieces: list[tuple[int, int, str]],
        length: int,
        sha256: str,
    ) -> None:
        self.chunks = chunks
        self.path = path
        self.dest = dest
        self.partial = dest.with_name(dest.name + ".partial")
        self.pieces = pieces
        self.length = length
        self.sha256 = sha256
        self.fetched_bytes = 0
        self.reused_bytes = 0

    def good_bytes(self) -> int:
        return self.partial.stat().st_size if self.partial.exists() else 0

    def _resume(self) -> int:
        """The index of the first piece not on disk: the pieces already there that still match
        their hashes are kept (a crash may have torn the last write); anything after is cut off."""
        if not self.partial.exists():
            return 0
        index = good = 0
        with self.partial.open("r+b") as f:
            for offset, length, digest in self.pieces:
                block = f.read(length)
                if len(block) != length or hashlib.sha256(block).hexdigest() != digest:
                    break
                index, good = index + 1, offset + length
            f.truncate(good)
        return index

    def _check(self, index: int, data: bytes) -> None:
        _, length, digest = self.pieces[index]
        if len(data) != length or hashlib.sha256(data).hexdigest() != digest:
            raise HashMismatchError(f"{self.path}: chunk {index} does not match its signed hash", "target")

    def _fill(self, out: PartialWriter, start: int) -> None:
        """Write the pieces from ``start`` on, each checked before it is written."""
        for index in range(start, len(self.pieces)):
            offset, _, _ = self.pieces[index]
            _, data = self.chunks.chunk(self.path, offset)
            self._check(index, data)
            self.fetched_bytes += len(data)
            out.write(data)

    def run(self) -> Path:
        start = self._resume()
        with self.partial.open("ab") as f:
            out = PartialWriter(f)
            self._fill(out, start)
            out.sync()
        if self.good_bytes() != self.length:
            raise HashMismatchError(
                f"{self.path}: the signed chunks do not cover its {self.length} bytes", "target"
            )
        digest = hashlib.sha256()
        with self.partial.open("rb") as f:
            while block := f.read(1 << 20):
                digest.update(block)
        if digest.hexdigest() != self.sha256:
            self.partial.unlink()
            raise HashMismatchError(
                f"{self.path}: the assembled file does not match its signed sha256", "target"
            )
        atomic_replace(self.partial, self.dest)
        return self.dest


class PartialWriter:
    """The ``.partial`` file, synced to disk after every ``SYNC_BYTES`` written (a resume
    rechecks every piece, so syncing less often only costs work redone after a crash)."""

    SYNC_BYTES = 256 * 1024

    def __init__(self, f: BinaryIO) -> None:
        self.f = f
        self._unsynced = 0

    def write(self, data: bytes) -> None:
        self.f.write(data)
        self._unsynced += len(data)
        if self._unsynced >= self.SYNC_BYTES:
            self.sync()

    def sync(self) -> None:
        self.f.flush()
        os.fsync(self.f.fileno())
        self._unsynced = 0
