"""A paced load generator for agents' KServe v2 inference APIs.

Keep-alive connections, ``threads`` of them per agent, each paced so that every agent gets
``rate_per_s`` requests a second; each answer is recorded (when it was sent, how long it
took, which model version answered and its first output) for the tests and benchmarks that
check what a hot swap did, and counted for ``edgec demo``.
"""

from __future__ import annotations

import http.client
import json
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # numpy is imported when a generator is made: ``import localfleet`` stays light
    import numpy as np

__all__ = ["LoadGenerator", "Response"]


@dataclass
class Response:
    port: int  # which agent
    sent_at: float  # seconds since the generator started
    latency_s: float
    index: int  # which input
    version: str | None
    logits: np.ndarray | None  # the first output (numpy)
    error: str | None


class LoadGenerator:
    def __init__(
        self,
        ports: int | Sequence[int],
        inputs: Any,
        rate_per_s: float,
        *,
        threads: int = 1,
        model: str = "digits",
        input_name: str = "x",
    ) -> None:
        """``rate_per_s`` requests a second to each agent, over ``threads`` connections each;
        ``inputs``: one sample per row of the first axis, sent in turn."""
        import numpy as np

        self.ports = [ports] if isinstance(ports, int) else list(ports)
        self.inputs = np.asarray(inputs, dtype=np.float32)
        self.path = f"/v2/models/{model}/infer"
        self.input_name = input_name
        self.interval_s = threads / rate_per_s  # each thread's pace
        self.per_port = threads
        self.threads = [
            threading.Thread(target=self._run, args=(port, i), daemon=True)
            for port in self.ports
            for i in range(threads)
        ]
        self.responses: list[Response] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.started = 0.0

    def start(self) -> None:
        self.started = time.perf_counter()
        for thread in self.threads:
            thread.start()

    def stop(self) -> list[Response]:
        """Stop sending; every answer, in the order sent."""
        self._stop.set()
        for thread in self.threads:
            thread.join(timeout=30)
        with self._lock:
            return sorted(self.responses, key=lambda r: r.sent_at)

    def counts(self) -> tuple[int, int]:
        """Requests sent so far, and how many failed."""
        with self._lock:
            return len(self.responses), sum(1 for r in self.responses if r.error)

    def _body(self, index: int) -> bytes:
        x = self.inputs[index : index + 1]
        tensor = {
            "name": self.input_name,
            "shape": list(x.shape),
            "datatype": "FP32",
            "data": x.ravel().tolist(),
        }
        return json.dumps({"inputs": [tensor]}).encode()

    def _answer(self, port: int, sent: float, index: int, status: int, body: bytes) -> Response:
        latency = time.perf_counter() - sent
        if status != 200:
            return Response(port, sent - self.started, latency, index, None, None, f"{status} {body[:200]!r}")
        import numpy as np

        answer: dict[str, Any] = json.loads(body)
        out = answer["outputs"][0]
        logits = np.asarray(out["data"], dtype=np.float32).reshape(out["shape"])
        return Response(port, sent - self.started, latency, index, answer.get("model_version"), logits, None)

    def _run(self, port: int, offset: int) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        n = offset
        next_at = time.perf_counter() + offset * self.interval_s / self.per_port
        while not self._stop.is_set():
            delay = next_at - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            next_at = max(next_at + self.interval_s, time.perf_counter() - 1.0)  # no burst after a stall
            index = n % len(self.inputs)
            n += self.per_port
            sent = time.perf_counter()
            try:
                connection.request("POST", self.path, self._body(index), {"Content-Type": "application/json"})
                reply = connection.getresponse()
                result = self._answer(port, sent, index, reply.status, reply.read())
            except (OSError, http.client.HTTPException, ValueError, KeyError) as e:
                result = Response(
                    port, sent - self.started, time.perf_counter() - sent, index, None, None, repr(e)
                )
                connection.close()
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            with self._lock:
                self.responses.append(result)
        connection.close()
