"""Helpers the benchmark scripts share."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as dist_version

__all__ = ["ResponseFramer", "library_versions"]


def library_versions(names: Iterable[str]) -> dict[str, str | None]:
    """Each distribution's installed version, None where it is not installed."""
    found: dict[str, str | None] = {}
    for name in names:
        try:
            found[name] = dist_version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


class ResponseFramer:
    """Keep-alive HTTP/1.1 answers, each with a Content-Length, cut out of the bytes of one
    connection as they arrive (the load generators' client side)."""

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.need: int | None = None  # the length of the answer being read, once its head is in
        self.status = 0

    @property
    def partial(self) -> bool:
        """Part of an answer has arrived, not all of it."""
        return self.need is not None or bool(self.buffer)

    def feed(self, data: bytes) -> Iterator[tuple[int, bytes]]:
        """Each answer ``data`` completes: its status and the whole message, head included."""
        self.buffer += data
        while True:
            if self.need is None:
                end = self.buffer.find(b"\r\n\r\n")
                if end < 0:
                    return
                head = bytes(self.buffer[:end]).decode("latin-1").lower()
                self.status = int(head[9:12])
                length = int(head.split("content-length:", 1)[1].split("\r\n", 1)[0])
                self.need = end + 4 + length
            if len(self.buffer) < self.need:
                return
            message = bytes(self.buffer[: self.need])
            del self.buffer[: self.need]
            self.need = None
            yield self.status, message
