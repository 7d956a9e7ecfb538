"""Telemetry windows as time series for the dashboard's plots (pure: no I/O).

Windows from many devices arrive at their own moments; a plot needs one time axis. Each
window is put in the bucket of its end time (``bucket_s`` wide), per release, and each
bucket gets: latency percentiles (the median over the windows in it), request rate (the
requests of its windows over the bucket's width), error rate (errors over requests), and
the PSI of each input (the largest in the bucket: the device that drifts most). Buckets with
no window for a release are ``None``, which uPlot draws as a gap.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Iterable, Mapping
from typing import Any

from edgec._time import utc_moment

__all__ = ["MAX_BUCKETS", "MAX_INPUTS", "series"]

MAX_BUCKETS = 720  # an hour of 5 s buckets: what a page plots at most
MAX_INPUTS = 16  # PSI series per release (the inputs that drift most)


def _moment(value: Any) -> float | None:
    moment = utc_moment(value)
    return None if moment is None else moment.timestamp()


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def series(windows: Iterable[Mapping[str, Any]], bucket_s: float, now: float | None = None) -> dict[str, Any]:
    """``{"bucket_s", "t": [bucket start, unix s], "releases": {release: {"p50_ms": [...], "p95_ms",
    "p99_ms", "requests_per_s", "error_rate", "psi": {input: [...]}}}}`` from telemetry windows
    (each with ``ended_at`` or ``received_at``, ``model``, and its figures)."""
    bucket_s = max(float(bucket_s), 1.0)
    buckets: dict[str, dict[int, list[Mapping[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    for window in windows:
        at = _moment(window.get("ended_at")) or _moment(window.get("received_at"))
        if at is None:
            continue
        release = str(window.get("model") or "unknown")
        buckets[release][int(at // bucket_s)].append(window)
    keys = sorted({k for per_release in buckets.values() for k in per_release})
    if not keys:
        return {"bucket_s": bucket_s, "t": [], "releases": {}}
    last = keys[-1] if now is None else max(keys[-1], int(now // bucket_s))
    first = max(keys[0], last - MAX_BUCKETS + 1)
    axis = list(range(first, last + 1))
    releases: dict[str, Any] = {}
    for release, per_bucket in sorted(buckets.items()):
        releases[release] = _release_series(axis, per_bucket, bucket_s)
    return {"bucket_s": bucket_s, "t": [k * bucket_s for k in axis], "releases": releases}


def _release_series(
    axis: list[int], per_bucket: Mapping[int, list[Mapping[str, Any]]], bucket_s: float
) -> dict[str, Any]:
    out: dict[str, Any] = {k: [] for k in ("p50_ms", "p95_ms", "p99_ms", "requests_per_s", "error_rate")}
    psi_values: dict[str, list[float | None]] = {}
    for index, key in enumerate(axis):
        windows = per_bucket.get(key, [])
        for figure in ("p50_ms", "p95_ms", "p99_ms"):
            values = [v for w in windows if (v := _number(w.get(figure))) is not None]
            out[figure].append(round(statistics.median(values), 4) if values else None)
        requests = sum(int(v) for w in windows if (v := _number(w.get("requests"))) is not None)
        errors = sum(int(v) for w in windows if (v := _number(w.get("errors"))) is not None)
        out["requests_per_s"].append(round(requests / bucket_s, 3) if windows else None)
        out["error_rate"].append(round(errors / requests, 5) if requests else None)
        for w in windows:
            psi = w.get("psi")
            if not isinstance(psi, Mapping):
                continue
            for name, value in psi.items():
                number = _number(value)
                if number is None:
                    continue
                column = psi_values.setdefault(str(name)[:128], [None] * len(axis))
                previous = column[index]
                column[index] = number if previous is None else max(previous, number)
    worst = sorted(psi_values, key=lambda n: -max((v for v in psi_values[n] if v is not None), default=0))
    out["psi"] = {name: psi_values[name] for name in worst[:MAX_INPUTS]}
    return out
