"""Telemetry overhead: what ``WindowRecorder.record`` adds to every request.

Run:  python bench/bench_telemetry_overhead.py [--repeats 7] [--requests 5000]

Records requests of a model that takes one 1x1x28x28 float32 image and gives 1x10 logits,
with reference statistics for both (quantile bins, as ``edgec build`` writes them), and
reports the median per-request cost over the repeats: latency and counts only, with drift
on the input, and with drift on input and output; then the same from 4 threads at once.
Needs only numpy and the agent.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time

import numpy as np

from agent.telemetry import WindowRecorder
from edgec.manifest import TensorStats

BINS = 10


def _reference(name: str, values: np.ndarray) -> TensorStats:
    """Quantile-binned statistics, made as compiler/stats.py makes them."""
    flat = values.astype(np.float64).ravel()
    edges = np.unique(np.quantile(flat, np.linspace(0.0, 1.0, BINS + 1)))
    counts, _ = np.histogram(flat, bins=edges)
    return TensorStats(
        name=name,
        count=flat.size,
        mean=float(flat.mean()),
        std=float(flat.std()),
        min=float(flat.min()),
        max=float(flat.max()),
        bin_edges=edges.tolist(),
        bin_fractions=(counts / flat.size).tolist(),
    )


def _per_request_us(
    recorder: WindowRecorder, requests: list[tuple[dict, dict]], drift: str, threads: int
) -> float:
    def serve(share: list[tuple[dict, dict]]) -> None:
        for inputs, outputs in share:
            recorder.record(
                "digits:1",
                0.002,
                True,
                inputs if drift != "none" else None,
                outputs if drift == "inputs+outputs" else None,
            )

    shares = [requests[i::threads] for i in range(threads)]
    workers = [threading.Thread(target=serve, args=(share,)) for share in shares]
    start = time.perf_counter()
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    elapsed = time.perf_counter() - start
    recorder.close_window()
    return elapsed / len(requests) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--requests", type=int, default=5000)
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    images = rng.random((256, 1, 1, 28, 28), dtype=np.float32)
    logits = rng.normal(size=(256, 1, 10)).astype(np.float32)
    reference = [_reference("x", images), _reference("logits", logits)]
    requests = [({"x": images[i % 256]}, {"logits": logits[i % 256]}) for i in range(args.requests)]
    recorder = WindowRecorder(reference, 60.0, model="digits:1")
    _per_request_us(recorder, requests[:500], "inputs+outputs", 1)  # warm up

    print(f"WindowRecorder.record, 1x1x28x28 float32 input, 1x10 output, {args.requests} requests")
    for threads in (1, 4):
        for drift in ("none", "inputs", "inputs+outputs"):
            runs = [_per_request_us(recorder, requests, drift, threads) for _ in range(args.repeats)]
            print(
                f"  {threads} thread(s), drift on {drift:<15} median {statistics.median(runs):6.1f} µs"
                f"  (min {min(runs):.1f}, max {max(runs):.1f}, {args.repeats} repeats)"
            )


if __name__ == "__main__":
    main()
