"""The compile matrix for the samples: per profile, format and precision — size, agreement with
the source, build time, and latency on this machine.

Run:  python bench/bench_compile_matrix.py [--models digits,outlier] [--precisions fp32,fp16,int8]
          [--targets x86-64-cpu,raspberry-pi-4,jetson-orin-nano,apple-silicon-mac] [--repeats 5] [--runs 50]

For each model and precision, one ``edgec build --format all --no-cache`` call for every
target (every format each profile lists), as a user runs it; the figures (cosine, top-1
agreement, accuracy next to the source's) are the build's own verification on the eval set.
Then every artifact that runs here is timed on single samples through the agent's runtime
(``agent.runtime.load_bundle``: onnxruntime for ONNX, LiteRT for TFLite), side by side with
the fp32 source in onnxruntime, interleaved in every round; median and p90 per artifact.
TensorRT and CoreML artifacts are built and verified (TensorRT's figures come from
onnxruntime on the TensorRT-ready graph) but not timed: no GPU, no macOS here.
Writes bench/results/compile_matrix.json and compile_matrix.png.
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
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

RESULTS = ROOT / "bench" / "results"
DIGITS = ROOT / "samples" / "digits"
MODELS = {
    "digits": (DIGITS / "model.onnx", DIGITS / "calib.npz", DIGITS / "eval.npz"),
    "outlier": (ROOT / "samples" / "outlier" / "model.onnx", DIGITS / "calib.npz", DIGITS / "eval.npz"),
}
TARGETS = "x86-64-cpu,raspberry-pi-4,jetson-orin-nano,apple-silicon-mac"


def build(model: str, precision: str, targets: list[str], out: Path) -> tuple[list[dict[str, Any]], float]:
    path, calib, evaluation = MODELS[model]
    command = [
        sys.executable, "-m", "edgec", "build", str(path), "--name", model, "--format", "all",
        "--precision", precision, "--calibration", str(calib), "--eval", str(evaluation),
        "--out", str(out), "--force", "--no-cache", "--json",
        *[arg for t in targets for arg in ("--target", t)],
    ]  # fmt: skip
    started = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, check=False)
    wall = time.perf_counter() - started
    if proc.returncode not in (0, 3):  # 3: some target failed its gate; reported, not fatal
        raise SystemExit(f"build failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    return json.loads(proc.stdout)["bundles"], wall


def time_artifacts(
    rows: list[dict[str, Any]], source: Path, sample: dict[str, np.ndarray], repeats: int, runs: int
) -> None:
    """Median and p90 ms per row that runs here; rows and the source interleaved per round."""
    import onnxruntime as ort

    from agent.runtime import load_bundle

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(source), options, providers=["CPUExecutionProvider"])
    calls = {"source": lambda s: session.run(None, s)}
    for row in rows:
        if row["format"] in ("onnx", "tflite") and row.get("path"):
            model = load_bundle(Path(row["path"]), threads=1)
            calls[row["label"]] = model.infer
            row["timed_with"] = "onnxruntime" if row["format"] == "onnx" else "LiteRT"
        else:
            row["timed_with"] = None
    times: dict[str, list[float]] = {key: [] for key in calls}
    for call in calls.values():
        for _ in range(10):
            call(sample)
    keys = list(calls)
    for round_ in range(repeats):
        for key in keys[round_ % len(keys) :] + keys[: round_ % len(keys)]:
            call = calls[key]
            for _ in range(runs):
                started = time.perf_counter()
                call(sample)
                times[key].append(time.perf_counter() - started)
    for row in [{"label": "source"}, *rows]:
        measured = times.get(row["label"])
        if measured:
            row["median_ms"] = round(statistics.median(measured) * 1e3, 4)
            row["p90_ms"] = round(float(np.percentile(measured, 90)) * 1e3, 4)
    source_row = {
        "label": "source",
        "format": "onnx",
        "precision": "fp32",
        "size_bytes": source.stat().st_size,
        "median_ms": round(statistics.median(times["source"]) * 1e3, 4),
        "p90_ms": round(float(np.percentile(times["source"], 90)) * 1e3, 4),
        "timed_with": "onnxruntime",
        "status": "baseline",
    }
    rows.insert(0, source_row)


def _cell(value: Any, spec: str = "") -> str:
    if value is None:
        return "-"
    return format(value, spec) if spec else str(value)


COLUMNS = (
    "artifact", "status", "size KiB", "x source size", "cosine", "top-1 agree", "accuracy (source)",
    "build s", "median ms", "p90 ms", "timed with",
)  # fmt: skip


def render(model: str, rows: list[dict[str, Any]], source_size: int) -> str:
    lines = [f"### {model}", "", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        metrics = r.get("metrics") or {}
        accuracy = metrics.get("accuracy")
        source_accuracy = metrics.get("source_accuracy") or 0.0
        cells = [
            r["label"],
            r["status"],
            f"{r['size_bytes'] / 1024:.1f}",
            f"{r['size_bytes'] / source_size:.2f}",
            _cell(metrics.get("cosine"), ".5f"),
            _cell(metrics.get("top1_agreement"), ".3f"),
            "-" if accuracy is None else f"{accuracy:.2%} ({source_accuracy:.2%})",
            _cell(r.get("build_s"), ".1f"),
            _cell(r.get("median_ms"), ".3f"),
            _cell(r.get("p90_ms"), ".3f"),
            r.get("timed_with") or "not timed here",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results: dict[str, list[dict[str, Any]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6.5 * len(results), 4.5), squeeze=False)
    colours = {"fp32": "tab:blue", "fp16": "tab:green", "int8": "tab:orange"}
    markers = {"onnx": "o", "tflite": "s"}
    for ax, (model, rows) in zip(axes[0], results.items(), strict=True):
        for r in rows:
            if r.get("median_ms") is None or r["label"] == "source":
                continue
            colour = colours.get(r["precision"], "grey")
            marker = markers.get(r["format"], "x")
            ax.scatter(r["size_bytes"] / 1024, r["median_ms"] * 1e3, color=colour, marker=marker, s=50)
        source = rows[0]
        ax.scatter(source["size_bytes"] / 1024, source["median_ms"] * 1e3, color="black", marker="*", s=120)
        ax.set_title(f"{model}: size vs latency here (● onnx, ■ tflite, ★ source)")
        ax.set_xlabel("artifact size, KiB")
        ax.set_ylabel("median latency per sample, µs (1 thread)")
        for precision, colour in colours.items():
            ax.scatter([], [], color=colour, label=precision)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="digits")
    parser.add_argument("--precisions", default="fp32,fp16,int8")
    parser.add_argument("--targets", default=TARGETS)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--runs", type=int, default=50)
    args = parser.parse_args()
    targets = args.targets.split(",")
    results: dict[str, list[dict[str, Any]]] = {}
    report = ["# Compile matrix", ""]
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models.split(","):
            rows: list[dict[str, Any]] = []
            for precision in args.precisions.split(","):
                print(
                    f"{model} {precision}: building for {', '.join(targets)} (every format) ...", flush=True
                )
                bundles, wall = build(model, precision, targets, Path(tmp) / model / precision)
                print(f"  {len(bundles)} artifacts in {wall:.1f} s", flush=True)
                for b in bundles:
                    b["label"] = f"{b['profile']} {b['format']} {b['precision']}"
                    b["build_s"] = round(sum(b.get("timings_s", {}).values()), 2)
                    b["call_wall_s"] = round(wall, 1)
                    b.pop("search", None)
                    b.pop("layer_errors", None)
                    rows.append(b)
            path, _, evaluation = MODELS[model]
            with np.load(evaluation) as data:
                sample = {k: data[k][:1] for k in data.files if k != "y"}
            print(f"  timing {model}: {args.repeats} rounds x {args.runs} runs per artifact ...", flush=True)
            time_artifacts(rows, path, sample, args.repeats, args.runs)
            results[model] = rows
            table = render(model, rows, path.stat().st_size)
            print(table, flush=True)
            report += [table, ""]
    RESULTS.mkdir(parents=True, exist_ok=True)
    report_json = {"created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "models": results}
    (RESULTS / "compile_matrix.json").write_text(json.dumps(report_json, indent=2, default=str) + "\n")
    (RESULTS / "compile_matrix.md").write_text("\n".join(report) + "\n")
    plot(results, RESULTS / "compile_matrix.png")
    print(f"wrote {RESULTS / 'compile_matrix.json'}, .md and .png")


if __name__ == "__main__":
    main()
