"""The real-model corpus through ``edgec build``: every model x {onnx, tflite} x {fp16, int8}
for a Raspberry Pi and an x86 profile, plus the CoreML and TensorRT bundles, as a user runs
the builds (issue 13).

Run:  python samples/zoo/fetch_zoo.py          # once: the corpus in the zoo folder
      python bench/bench_zoo.py [--only NAME,...] [--formats onnx,tflite] [--precisions fp16,int8]
          [--profiles raspberry-pi-4,x86-64-cpu] [--no-extra] [--cache DIR]

One ``edgec build --json`` per model, format and precision, with both profiles as targets
and the model's calibration and evaluation inputs (``--input-shape``/``--freeze`` as
corpus.json gives them); then one build per model for ``apple-silicon-mac`` (CoreML) and
``jetson-orin-nano`` (TensorRT) at fp16. Every cell records its status, the figures each
output was judged on (by kind), the artifact's size over the source file's, the build time,
and for every failure its reason. The builds share a build cache that starts empty (as a
user's would on a first build): where the two profiles need the same artifact, the second
target takes it from the cache, and its cell says so (``cached``). ``--cache DIR`` keeps
and reuses a cache between runs (then build times are not first-build times). Writes
bench/results/zoo.json and zoo.md after every build (a stopped run is marked partial).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "samples" / "zoo"))

from fetch_zoo import CORPUS, zoo_dir  # noqa: E402

from bench._common import library_versions  # noqa: E402

RESULTS = ROOT / "bench" / "results"
PROFILES = "raspberry-pi-4,x86-64-cpu"
EXTRA = (("apple-silicon-mac", "coreml", "fp16"), ("jetson-orin-nano", "tensorrt", "fp16"))
SUFFIX = {"onnx": ".onnx", "tflite": ".tflite", "pytorch": ".pt2"}
# the figure each output kind is judged on, after cosine (compiler/verify.py)
JUDGED = {
    "classification": ("top1_agreement", "top-1"),
    "dense": ("psnr_db", "PSNR"),
    "sequence": ("sequence_agreement", "steps"),
    "detection": ("anchor_agreement", "anchors"),
    "regression": ("rel_err", "err/range"),
}


def _arguments(model: dict[str, Any], zoo: Path) -> list[str]:
    name = model["name"]
    found = [
        str(zoo / model["file"]),
        "--name",
        name,
        "--calibration",
        str(zoo / f"{name}-calibration.npz"),
        "--eval",
        str(zoo / f"{name}-evaluation.npz"),
    ]
    for shape in model.get("input_shape", []):
        found += ["--input-shape", shape]
    for value in model.get("freeze", []):
        found += ["--freeze", value]
    for kind in model.get("output_kinds", []):
        found += ["--output-kind", kind]
    return found


def build(
    args: list[str], targets: list[str], fmt: str, precision: str, *, out: Path, cache: Path
) -> tuple[list[dict[str, Any]], float, str | None]:
    command = [
        sys.executable, "-m", "edgec", "build", *args, "--format", fmt, "--precision", precision,
        "--out", str(out), "--force", "--json", *[a for t in targets for a in ("--target", t)],
    ]  # fmt: skip
    env = {**os.environ, "EDGEC_CACHE_DIR": str(cache)}
    started = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, check=False, env=env)
    wall = time.perf_counter() - started
    try:
        return json.loads(proc.stdout)["bundles"], wall, None
    except (json.JSONDecodeError, KeyError):
        lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
        return [], wall, f"exit {proc.returncode}: {lines[-1] if lines else 'no output'}"


def judged(metrics: dict[str, Any] | None) -> str:
    """Each output's kind and the figures it was judged on, short."""
    if not metrics:
        return "-"
    parts = []
    for output in metrics.get("outputs", []):
        attribute, label = JUDGED[output["kind"]]
        value = output.get(attribute)
        figures = []
        if output.get("cosine") is not None and output["kind"] != "regression":
            figures.append(f"cos {output['cosine']:.4f}")
        if value is not None:
            figures.append(f"{label} {value:.3g}" if attribute == "rel_err" else f"{label} {value:.4g}")
        parts.append(f"{output['name']} [{output['kind']}] {' '.join(figures)}".strip())
    return "; ".join(parts)


def cell(model: dict[str, Any], source_bytes: int, bundle: dict[str, Any], seconds: float) -> dict[str, Any]:
    size = bundle.get("size_bytes")
    search = bundle.get("search") or []
    chosen = next((s["configuration"] for s in search if s.get("chosen")), None)
    return {
        "model": model["name"],
        "source_format": model["format"],
        "profile": bundle["profile"],
        "format": bundle["format"],
        "precision": bundle["precision"],
        "status": bundle["status"],
        "configuration": chosen,
        "tries": len(search) or 1,
        "cached": bool(bundle.get("cached")),
        "metrics": bundle.get("metrics"),
        "judged": judged(bundle.get("metrics")),
        "size_bytes": size,
        "size_ratio": round(size / source_bytes, 4) if size else None,
        "build_s": round(sum((bundle.get("timings_s") or {}).values()), 1) or round(seconds, 1),
        "reason": bundle.get("error") or bundle.get("reason"),
        "gate_failures": bundle.get("gate_failures", []),
    }


def write(data: dict[str, Any], results: Path) -> None:
    """zoo.json and zoo.md as they stand (written after every build: a long run that is
    stopped keeps what it measured, marked partial)."""
    results.mkdir(parents=True, exist_ok=True)
    (results / "zoo.json").write_text(json.dumps(data, indent=2) + "\n")
    header = (
        f"# The real-model corpus through edgec build\n\n{data['machine']['cpu']}, "
        f"{data['machine']['cores']} cores; {data['created_at']}; {data['wall_s']:.0f} s in all"
        f"{' (a build cache kept from earlier runs: not first-build times)' if data['cached'] else ''}"
        f"{' (PARTIAL: the run was stopped before every build ran)' if data.get('partial') else ''}.\n\n"
    )
    (results / "zoo.md").write_text(header + markdown(data) + "\n")


def run(options: argparse.Namespace) -> dict[str, Any]:
    corpus = json.loads(CORPUS.read_text())
    zoo = zoo_dir()
    models = [m for m in corpus["models"] if not options.only or m["name"] in options.only.split(",")]
    missing = [m["file"] for m in models if not (zoo / m["file"]).exists()]
    if missing:
        raise SystemExit(f"the corpus is not fetched ({', '.join(missing)}): run samples/zoo/fetch_zoo.py")
    profiles = options.profiles.split(",")
    plan = [
        (fmt, precision) for fmt in options.formats.split(",") for precision in options.precisions.split(",")
    ]
    cells: list[dict[str, Any]] = []
    started = time.perf_counter()
    data: dict[str, Any] = {
        "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()},
        "versions": library_versions(
            ["onnxruntime", "onnx", "tensorflow", "onnx2tf", "ai-edge-litert", "coremltools", "torch"]
        ),
        "wall_s": 0.0,
        # a cache that held entries at the start: its cells are not first-build times
        "cached": options.cache is not None and options.cache.is_dir() and any(options.cache.iterdir()),
        "partial": True,
        "cells": cells,
    }
    with tempfile.TemporaryDirectory(prefix="edgec-zoo-") as tmp:
        cache = options.cache or Path(tmp) / "cache"
        for model in models:
            args = _arguments(model, zoo)
            source_bytes = (zoo / model["file"]).stat().st_size
            jobs = [(profiles, fmt, precision) for fmt, precision in plan]
            if options.extra:
                jobs += [([profile], fmt, precision) for profile, fmt, precision in EXTRA]
            for targets, fmt, precision in jobs:
                label = f"{model['name']} {fmt} {precision} ({', '.join(targets)})"
                print(f"[{time.perf_counter() - started:7.1f}s] {label}", file=sys.stderr, flush=True)
                bundles, wall, error = build(
                    args, targets, fmt, precision, out=Path(tmp) / "out", cache=cache
                )
                if error is not None:
                    for profile in targets:
                        cells.append(
                            {
                                "model": model["name"],
                                "source_format": model["format"],
                                "profile": profile,
                                "format": fmt,
                                "precision": precision,
                                "status": "failed",
                                "reason": f"the build stopped: {error}",
                                "build_s": round(wall / len(targets), 1),
                            }
                        )
                else:
                    for bundle in bundles:
                        cells.append(cell(model, source_bytes, bundle, wall / max(1, len(bundles))))
                        print(
                            f"    {bundle['profile']}: {cells[-1]['status']} {cells[-1]['judged']}",
                            file=sys.stderr,
                        )
                data["wall_s"] = round(time.perf_counter() - started, 1)
                write(data, options.results)
    data["partial"] = False
    write(data, options.results)
    return data


def markdown(data: dict[str, Any]) -> str:
    cells = data["cells"]
    main = [c for c in cells if c["format"] in ("onnx", "tflite")]
    ok = [c for c in main if c["status"] == "ok"]
    lines = [
        f"{len(ok)} of {len(main)} onnx/tflite cells ok within the default gates "
        f"({100 * len(ok) / max(1, len(main)):.0f}%); every other cell names its reason.",
        "",
        "| model | source | profile | format | precision | status | judged on (output [kind] figures) "
        "| size / source | build s | reason |",
        "|---|---|---|---|---|---|---|---:|---:|---|",
    ]
    for c in cells:
        ratio = f"{c['size_ratio']:.3f}" if c.get("size_ratio") else "-"
        seconds = f"{c.get('build_s', '-')}{' (cache)' if c.get('cached') else ''}"
        config = f" ({c['configuration']})" if c.get("configuration") not in (None, c["precision"]) else ""
        reason = (c.get("reason") or "").replace("|", "/")
        if len(reason) > 220:
            reason = reason[:217] + "..."
        lines.append(
            f"| {c['model']} | {c['source_format']} | {c['profile']} | {c['format']} "
            f"| {c['precision']}{config} | {c['status']} | {c.get('judged', '-')} | {ratio} "
            f"| {seconds} | {reason} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", help="comma list of corpus model names")
    parser.add_argument("--formats", default="onnx,tflite")
    parser.add_argument("--precisions", default="fp16,int8")
    parser.add_argument("--profiles", default=PROFILES)
    parser.add_argument(
        "--no-extra", dest="extra", action="store_false", help="skip the CoreML/TensorRT builds"
    )
    parser.add_argument(
        "--cache", type=Path, help="use (and fill) this build cache: faster, build times not real"
    )
    parser.add_argument("--results", type=Path, default=RESULTS)
    options = parser.parse_args()
    print(markdown(run(options)))


if __name__ == "__main__":
    main()
