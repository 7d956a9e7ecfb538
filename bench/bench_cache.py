"""Build cache: a cold build against a repeat of the same build, side by side.

Run:  python bench/bench_cache.py [--repeats 3]

Builds the MobileNetV2-sized sample for raspberry-pi-4 (TFLite int8) and x86-64-cpu (ONNX
int8) with ``edgec build`` as a user runs it (a subprocess, so TensorFlow's import is
counted), each round once with an empty cache and once again with the cache it filled.
Reports the median wall time of each and the speed-up; writes bench/results/cache.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "samples" / "mobilenet"
RESULTS = ROOT / "bench" / "results"


def _build(cache: Path, out: Path) -> float:
    command = [
        sys.executable,
        "-m",
        "edgec",
        "build",
        str(SAMPLES / "mobilenetv2.onnx"),
        "--target",
        "raspberry-pi-4",
        "--target",
        "x86-64-cpu",
        "--precision",
        "int8",
        "--calibration",
        str(SAMPLES / "calib.npz"),
        "--eval",
        str(SAMPLES / "eval.npz"),
        "--out",
        str(out),
        "--force",
        "--json",
    ]
    started = time.perf_counter()
    proc = subprocess.run(
        command,
        capture_output=True,
        text=True,
        check=False,
        env={
            **__import__("os").environ,
            "EDGEC_CACHE_DIR": str(cache),
        },
    )
    elapsed = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"build failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if not (SAMPLES / "mobilenetv2.onnx").exists():
        subprocess.run([sys.executable, str(SAMPLES / "make_mobilenetv2.py")], check=True)
    cold, warm = [], []
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as tmp:
            cache, out = Path(tmp) / "cache", Path(tmp) / "out"
            cold.append(_build(cache, out))
            warm.append(_build(cache, out))
    result = {
        "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "cold_s": [round(t, 2) for t in cold],
        "cached_s": [round(t, 2) for t in warm],
        "cold_median_s": round(statistics.median(cold), 2),
        "cached_median_s": round(statistics.median(warm), 2),
        "speedup": round(statistics.median(cold) / statistics.median(warm), 2),
    }
    print("build of the MobileNetV2-sized sample for raspberry-pi-4 (tflite int8) + x86-64-cpu (onnx int8)")
    print(f"  cold (empty cache): median {result['cold_median_s']} s  {result['cold_s']}")
    print(f"  repeat (cache hit): median {result['cached_median_s']} s  {result['cached_s']}")
    print(f"  speed-up: {result['speedup']}x")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "cache.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
