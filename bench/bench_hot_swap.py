"""Hot swap under load: latency over time through ten installs, and every failed request.

Run:  python bench/bench_hot_swap.py [--swaps 10] [--rate 250]

A real Mosquitto, the OTA server and one agent process (as in tests/e2e): the digits sample
as 1.0.0 and a 2.0.0 with doubled logits; a paced load generator sends ``--rate`` requests/s
to the agent's v2 API on keep-alive connections while the operator assigns 2.0.0, 1.0.0,
2.0.0, ... ``--swaps`` times, each through the whole install pipeline (verify, fetch, self-
test, swap, probation, commit). Every answer is checked against the model it names.
Writes bench/results/hot_swap.json and hot_swap.png (latency over time, swaps marked).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402

from localfleet import LoadGenerator, LocalFleet, wait_for  # noqa: E402
from localfleet.releases import DIGITS, build_digits, doubled_logits  # noqa: E402

PROFILE = "x86-64-cpu"
# short probation and telemetry windows, so that a swap takes seconds
AGENT_SETTINGS = {
    "install": {"probation_s": 2.0, "probation_min_requests": 10},
    "telemetry": {"window_s": 1.0},
}

RESULTS = ROOT / "bench" / "results"


def _reference(bundle: Path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(bundle / "model.onnx"), providers=["CPUExecutionProvider"])
    return np.concatenate([session.run(None, {"x": x[i : i + 1]})[0] for i in range(len(x))])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--swaps", type=int, default=10)
    parser.add_argument("--rate", type=float, default=250.0, help="requests per second")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        with np.load(DIGITS / "eval.npz") as data:
            np.savez(work / "eval-small.npz", x=data["x"][:24], y=data["y"][:24])
            x = data["x"][:64]
        doubled = work / "doubled.onnx"
        onnx.save(doubled_logits(onnx.load(DIGITS / "model.onnx")), doubled)
        print("building digits 1.0.0 and 2.0.0 ...", flush=True)
        bundles = {
            "1.0.0": build_digits(DIGITS / "model.onnx", "1.0.0", work / "out", work / "eval-small.npz"),
            "2.0.0": build_digits(doubled, "2.0.0", work / "out", work / "eval-small.npz"),
        }
        expected = {v: _reference(b, x) for v, b in bundles.items()}
        fleet = LocalFleet.create(work / "fleet")
        fleet.init_keys(b"bench passphrase")
        try:
            agent = fleet.add_agent("bench-1", PROFILE, settings=AGENT_SETTINGS)
            fleet.up()
            fleet.publish(*bundles.values())
            agent.start()

            def installed(release: str) -> bool:
                row = fleet.device("bench-1")
                return bool(row["installed_release"] == release and row["status"] == "serving")

            fleet.assign("bench-1", "digits:1.0.0")
            if not wait_for(lambda: installed("digits:1.0.0"), 60):
                raise SystemExit(agent.log.read_text()[-2000:])
            load = LoadGenerator(agent.http_port, x, rate_per_s=args.rate, threads=4)
            load.start()
            time.sleep(2)
            swaps = []
            for n in range(args.swaps):
                version = "2.0.0" if n % 2 == 0 else "1.0.0"
                assigned = time.perf_counter() - load.started
                fleet.assign("bench-1", f"digits:{version}")
                if not wait_for(lambda v=version: installed(f"digits:{v}"), 60, step_s=0.02):
                    raise SystemExit(f"swap {n + 1} did not complete: {agent.log.read_text()[-2000:]}")
                swaps.append(
                    {"to": version, "assigned_s": assigned, "committed_s": time.perf_counter() - load.started}
                )
                print(f"  swap {n + 1}: {version} in {swaps[-1]['committed_s'] - assigned:.2f} s", flush=True)
                time.sleep(1)
            responses = load.stop()
        finally:
            fleet.down()
    failed = [r for r in responses if r.error]
    wrong = [
        r
        for r in responses
        if not r.error and not np.allclose(r.logits[0], expected[r.version][r.index], rtol=1e-5, atol=1e-5)
    ]
    latencies = [r.latency_s * 1e3 for r in responses if not r.error]
    near = [
        r.latency_s * 1e3
        for r in responses
        if not r.error and any(s["assigned_s"] <= r.sent_at <= s["committed_s"] + 0.5 for s in swaps)
    ]
    calm = [
        r.latency_s * 1e3
        for r in responses
        if not r.error
        and not any(s["assigned_s"] - 0.5 <= r.sent_at <= s["committed_s"] + 0.5 for s in swaps)
    ]
    duration = responses[-1].sent_at - responses[0].sent_at
    result = {
        "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.processor() or platform.machine()}, python {platform.python_version()}",
        "profile": PROFILE,
        "swaps": len(swaps),
        "requests": len(responses),
        "requests_per_s": round(len(responses) / duration, 1),
        "failed": len(failed),
        "answers_not_from_the_model_they_name": len(wrong),
        "install_s_median": round(statistics.median(s["committed_s"] - s["assigned_s"] for s in swaps), 2),
        "p50_ms_calm": round(float(np.percentile(calm, 50)), 3),
        "p99_ms_calm": round(float(np.percentile(calm, 99)), 3),
        "p50_ms_during_installs": round(float(np.percentile(near, 50)), 3),
        "p99_ms_during_installs": round(float(np.percentile(near, 99)), 3),
        "max_ms": round(max(latencies), 3),
        "swap_times": swaps,
    }
    print(json.dumps({k: v for k, v in result.items() if k != "swap_times"}, indent=2))
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "hot_swap.json").write_text(json.dumps(result, indent=2) + "\n")
    _plot(responses, swaps, RESULTS / "hot_swap.png")


def _plot(responses, swaps, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(11, 4))
    for version, colour in (("1.0.0", "tab:blue"), ("2.0.0", "tab:orange")):
        points = [(r.sent_at, r.latency_s * 1e3) for r in responses if r.version == version]
        if points:
            ax.scatter(*zip(*points, strict=True), s=2, color=colour, label=f"answered by {version}")
    failed = [(r.sent_at, r.latency_s * 1e3) for r in responses if r.error]
    if failed:
        ax.scatter(*zip(*failed, strict=True), s=12, color="red", marker="x", label="failed")
    for swap in swaps:
        ax.axvspan(swap["assigned_s"], swap["committed_s"], color="grey", alpha=0.15)
    ax.set_yscale("log")
    ax.set_xlabel("seconds since the load started (grey: an install in progress, assign to commit)")
    ax.set_ylabel("request latency, ms")
    ax.set_title(f"edgec agent: {len(swaps)} hot swaps under load, {len(failed)} failed requests")
    ax.legend(loc="upper right", markerscale=4)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")


if __name__ == "__main__":
    main()
