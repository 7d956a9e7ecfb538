"""A paced load generator for the agent's v2 API: keep-alive connections, one per thread."""

from __future__ import annotations

import http.client
import json
import threading
import time
from dataclasses import dataclass

import numpy as np


@dataclass
class Response:
    sent_at: float  # seconds since the generator started
    latency_s: float
    index: int  # which input
    version: str | None
    logits: np.ndarray | None
    error: str | None


class LoadGenerator:
    def __init__(self, port: int, inputs: np.ndarray, rate_per_s: float, threads: int = 4) -> None:
        self.port = port
        self.inputs = inputs
        self.interval_s = threads / rate_per_s  # each thread's pace
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(threads)]
        self.responses: list[Response] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.started = 0.0

    def start(self) -> None:
        self.started = time.perf_counter()
        for thread in self.threads:
            thread.start()

    def stop(self) -> list[Response]:
        self._stop.set()
        for thread in self.threads:
            thread.join(timeout=30)
        return sorted(self.responses, key=lambda r: r.sent_at)

    def _body(self, index: int) -> bytes:
        x = self.inputs[index : index + 1]
        tensor = {"name": "x", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}
        return json.dumps({"inputs": [tensor]}).encode()

    def _run(self, offset: int) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        n = offset
        next_at = time.perf_counter() + offset * self.interval_s / len(self.threads)
        while not self._stop.is_set():
            delay = next_at - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            next_at += self.interval_s
            index = n % len(self.inputs)
            n += len(self.threads)
            sent = time.perf_counter()
            try:
                connection.request(
                    "POST", "/v2/models/digits/infer", self._body(index), {"Content-Type": "application/json"}
                )
                reply = connection.getresponse()
                body = reply.read()
                latency = time.perf_counter() - sent
                if reply.status != 200:
                    result = Response(
                        sent - self.started, latency, index, None, None, f"{reply.status} {body[:200]!r}"
                    )
                else:
                    answer = json.loads(body)
                    out = answer["outputs"][0]
                    logits = np.asarray(out["data"], dtype=np.float32).reshape(out["shape"])
                    result = Response(
                        sent - self.started, latency, index, answer["model_version"], logits, None
                    )
            except (OSError, http.client.HTTPException, ValueError) as e:
                result = Response(sent - self.started, time.perf_counter() - sent, index, None, None, repr(e))
                connection.close()
                connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
            with self._lock:
                self.responses.append(result)
        connection.close()
