"""The load generator of ``edgec demo``: paced inference requests to each agent's v2 API.

``LoadGenerator`` sends the digits evaluation samples (``read_npy_float32`` reads them
without numpy, which edgec does not import) over one keep-alive connection per agent, and
counts what was sent and what failed.
"""

from __future__ import annotations

import http.client
import json
import threading
import time
from pathlib import Path

from cli._demo_processes import DemoError

__all__ = ["LOAD_PER_AGENT_PER_S", "LoadGenerator", "read_npy_float32"]

LOAD_PER_AGENT_PER_S = 50.0


def read_npy_float32(data: bytes) -> tuple[tuple[int, ...], list[float]]:
    """A little-endian float32 C-order ``.npy`` array: its shape and values (no numpy in edgec)."""
    import ast
    import struct

    if data[:6] != b"\x93NUMPY":
        raise DemoError("not a .npy array")
    length_bytes = 2 if data[6] == 1 else 4
    (header_len,) = struct.unpack("<H" if length_bytes == 2 else "<I", data[8 : 8 + length_bytes])
    start = 8 + length_bytes
    header = ast.literal_eval(data[start : start + header_len].decode("latin1"))
    if header["descr"] != "<f4" or header["fortran_order"]:
        raise DemoError(f"expected a little-endian float32 C-order array, got {header}")
    body = data[start + header_len :]
    return tuple(header["shape"]), list(struct.unpack(f"<{len(body) // 4}f", body))


class LoadGenerator:
    """Inference requests to each agent's KServe v2 API, paced, one thread and one keep-alive
    connection per agent."""

    def __init__(self, ports: list[int], inputs: Path, rate_per_s: float = LOAD_PER_AGENT_PER_S) -> None:
        import zipfile

        with zipfile.ZipFile(inputs) as z:
            shape, values = read_npy_float32(z.read("x.npy"))
        size = len(values) // shape[0]
        sample = [1, *shape[1:]]
        self.bodies = [
            json.dumps(
                {"inputs": [{"name": "x", "shape": sample, "datatype": "FP32", "data": values[i : i + size]}]}
            ).encode()
            for i in range(0, len(values), size)
        ]
        self.interval_s = 1.0 / rate_per_s
        self.threads = [threading.Thread(target=self._run, args=(port,), daemon=True) for port in ports]
        self.sent = self.failed = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    def stop(self) -> None:
        self._stop.set()
        for thread in self.threads:
            thread.join(timeout=15)

    def counts(self) -> tuple[int, int]:
        with self._lock:
            return self.sent, self.failed

    def _run(self, port: int) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        n, next_at = 0, time.perf_counter()
        while not self._stop.is_set():
            delay = next_at - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            next_at = max(next_at + self.interval_s, time.perf_counter() - 1.0)
            ok = False
            try:
                connection.request(
                    "POST",
                    "/v2/models/digits/infer",
                    self.bodies[n % len(self.bodies)],
                    {"Content-Type": "application/json"},
                )
                response = connection.getresponse()
                response.read()
                ok = response.status == 200
            except (OSError, http.client.HTTPException):
                connection.close()
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            n += 1
            with self._lock:
                self.sent += 1
                self.failed += not ok
        connection.close()
