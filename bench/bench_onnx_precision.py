"""Benchmark fp32 vs fp16 vs int8 ONNX Runtime artifacts of a MobileNetV2-sized model.

Run:  make bench
  or  .venv/bin/python bench/bench_onnx_precision.py [--repeats 7] [--runs 20] [--threads 2]

What it does:

1. makes sure ``samples/mobilenet/`` holds the MobileNetV2-sized model and its calibration
   and eval data, generating them with ``samples/mobilenet/make_mobilenetv2.py`` if missing;
2. builds it with ``edgec build`` (the library call, ``compiler.build.build``) for
   ``x86-64-cpu --format onnx`` at fp32, fp16 and int8 (int8 calibrated on ``calib.npz``,
   every precision verified on ``eval.npz``, with its labels); gates are never waived: a
   precision that misses its gate has no bundle and is reported as FAILED with its figures,
   without size or latency;
3. times the bundles' models on single samples with onnxruntime on the CPU, each session
   opened with its bundle's ``runtime_config`` (``--threads`` intra-op threads, default 2):
   warm-up runs, then ``--repeats`` rounds in which each model runs a block of timed runs
   (``--runs`` for the slowest, proportionally more for faster ones, so every block lasts
   about as long), the models interleaved in each round (the order rotates) so they are
   measured side by side under the same machine load; each block starts after a short pause
   and one untimed run, so the previous model's spinning thread-pool workers have gone idle
   (else they steal the cores and inflate the tail); reports the median and p90 per run;
4. counts the ops onnxruntime runs after its graph optimizations (``optimized_model_filepath``)
   for each artifact: an int8 graph should be integer kernels end to end (QLinearConv,
   QLinearAdd, QGemm...), with no Conv, MatMul, Gemm or Add left in float between a
   DequantizeLinear and a QuantizeLinear;
5. prints a table and the checks (int8 size <= 0.30x fp32; int8 latency <= 0.60x fp32's, as
   the median over rounds of each round's int8/fp32 ratio, since the two ran next to each other
   in every round; the ratio of the overall medians is printed beside it) and writes
   ``bench/results/onnx_precision.json`` and ``.png``.

Bundles go to ``build/bench/`` (``--bundles``). About a minute on 2 cores.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import importlib.util
import json
import logging
import os
import platform
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "samples" / "mobilenet"
GENERATOR = SAMPLES / "make_mobilenetv2.py"
MODEL = SAMPLES / "mobilenetv2.onnx"
CALIB = SAMPLES / "calib.npz"
EVAL = SAMPLES / "eval.npz"
RESULTS = ROOT / "bench" / "results"
PROFILE = "x86-64-cpu"
PRECISIONS = ("fp32", "fp16", "int8")
INT8_MAX_SIZE_RATIO = 0.30
INT8_MAX_LATENCY_RATIO = 0.60  # int8 median / fp32 median, where the CPU has int8 dot products
FLOAT_COMPUTE_OPS = ("Conv", "MatMul", "Gemm", "Add")  # left in float in an int8 graph: not fused
SETTLE_S = 0.1  # pause, then one untimed run, before each model's block of timed runs
VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


@dataclass
class Entry:
    """One precision: its build outcome, its artifact, its timings."""

    precision: str
    status: str = "failed"
    bundle: str | None = None
    artifact: Path | None = None
    runtime_config: dict[str, str] = field(default_factory=dict)  # the bundle's session settings
    error: str | None = None
    gate: dict[str, float] = field(default_factory=dict)
    gate_failures: list[str] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)
    build_s: float = 0.0
    size_bytes: int | None = None
    times_ms: list[float] = field(default_factory=list)
    repeat_medians_ms: list[float] = field(default_factory=list)
    optimized_ops: dict[str, int] = field(default_factory=dict)  # what onnxruntime runs, by op type
    unfused: list[str] = field(default_factory=list)  # float compute ops fed by a DequantizeLinear
    runs_per_round: int = 0  # timed runs in each round's block (blocks last about as long)

    def latency(self) -> dict[str, float] | None:
        if not self.times_ms:
            return None
        t = np.asarray(self.times_ms)
        return {
            "median": float(np.median(t)),
            "p90": float(np.percentile(t, 90)),
            "mean": float(t.mean()),
            "min": float(t.min()),
            "max": float(t.max()),
        }


# --------------------------------------------------------------------------- machine


def machine_info() -> dict[str, Any]:
    import onnxruntime as ort

    cpu: str | None = None
    flags: set[str] = set()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and cpu is None:
                cpu = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    cpu = cpu or platform.processor() or platform.machine()
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "usable_cores": usable,
        "isa": sorted(f for f in flags if f in {"avx2", "avx512f", "fma", *VNNI_FLAGS}),
        "int8_dot_product_vnni": any(f in flags for f in VNNI_FLAGS) if flags else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "onnxruntime": ort.__version__,
    }


# --------------------------------------------------------------------------- model and builds


def ensure_model(regenerate: bool) -> None:
    if not regenerate and all(p.exists() for p in (MODEL, CALIB, EVAL)):
        print(f"model: {MODEL.relative_to(ROOT)} (present; --regenerate to rebuild it)")
        return
    print(f"generating the model with {GENERATOR.relative_to(ROOT)}", flush=True)
    spec = importlib.util.spec_from_file_location("make_mobilenetv2", GENERATOR)
    if spec is None or spec.loader is None:
        raise SystemExit(f"cannot import {GENERATOR}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    module.generate(SAMPLES)


def parameter_count(path: Path) -> int:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return sum(int(np.prod(t.dims)) for t in model.graph.initializer if len(t.dims) > 0)


def _progress(message: str) -> None:
    print(f"    {message}", file=sys.stderr, flush=True)


def build_all(bundles: Path, use_cache: bool) -> list[Entry]:
    from compiler.build import BuildRequest, build
    from compiler.cache import default_cache_dir
    from edgec.manifest import BundleStatus, Precision, TargetFormat, read_manifest

    entries = []
    for precision in PRECISIONS:
        entry = Entry(precision)
        print(
            f"edgec build {MODEL.name} --target {PROFILE} --format onnx --precision {precision}", flush=True
        )
        request = BuildRequest(
            model=MODEL,
            targets=[PROFILE],
            out=bundles,
            format=TargetFormat.ONNX,
            precision=Precision(precision),
            calibration=CALIB if precision == "int8" else None,
            eval=EVAL,
            name=f"mobilenetv2-{precision}",
            force=True,
            cache=default_cache_dir() if use_cache else None,
        )
        started = time.perf_counter()
        result = build(request, progress=_progress).bundles[0]
        entry.build_s = time.perf_counter() - started
        entry.status = "ok" if result.status is BundleStatus.OK else "failed"
        entry.error = result.error
        entry.gate = result.gate
        entry.gate_failures = list(result.gate_failures)
        entry.metrics = result.metrics.model_dump() if result.metrics else {}
        if result.path:
            manifest = read_manifest(Path(result.path))
            entry.bundle = result.path
            entry.artifact = Path(result.path) / manifest.model_file
            entry.runtime_config = manifest.runtime_config
            entry.size_bytes = entry.artifact.stat().st_size
        entries.append(entry)
    return entries


# --------------------------------------------------------------------------- the graph as run


def optimized_ops(entry: Entry, workdir: Path) -> tuple[dict[str, int], list[str]]:
    """Op types of the graph onnxruntime's CPU provider runs after its optimizations, opened
    with the bundle's session settings, and the float compute ops in it that read a
    DequantizeLinear: int8 nodes onnxruntime did not fuse (a node left in float on purpose,
    such as a stem conv over the float input, reads no DequantizeLinear)."""
    import onnx
    import onnxruntime as ort

    if entry.artifact is None:
        return {}, []
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.optimized_model_filepath = str(workdir / f"{entry.precision}-optimized.onnx")
    for key, value in entry.runtime_config.items():
        options.add_session_config_entry(key, value)
    ort.InferenceSession(str(entry.artifact), options, providers=["CPUExecutionProvider"])
    model = onnx.load(options.optimized_model_filepath, load_external_data=False)
    counts: dict[str, int] = {}
    for node in model.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    dequantized = {n.output[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    unfused = [
        f"{n.op_type} {n.name}"
        for n in model.graph.node
        if n.op_type in FLOAT_COMPUTE_OPS and dequantized.intersection(n.input)
    ]
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))), unfused


def fusion_summary(entry: Entry) -> str:
    ops = entry.optimized_ops
    integer = {k: v for k, v in ops.items() if k.startswith(("QLinear", "QGemm", "MatMulInteger"))}
    left = {k: ops[k] for k in FLOAT_COMPUTE_OPS if ops.get(k)}
    return (
        f"{entry.precision} as onnxruntime runs it: "
        + (", ".join(f"{v} {k}" for k, v in integer.items()) or "no integer kernels")
        + "; left in float: "
        + (", ".join(f"{v} {k}" for k, v in left.items()) or "none")
        + f"; between DequantizeLinear and QuantizeLinear (not fused): {len(entry.unfused)}; "
        + f"QuantizeLinear {ops.get('QuantizeLinear', 0)}, DequantizeLinear {ops.get('DequantizeLinear', 0)}"
    )


# --------------------------------------------------------------------------- timing


def time_models(
    entries: list[Entry], sample: np.ndarray, *, threads: int, warmup: int, repeats: int, runs: int
) -> None:
    import onnxruntime as ort

    timed = [e for e in entries if e.artifact is not None]
    sessions = {}
    for entry in timed:
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.log_severity_level = 3
        for key, value in entry.runtime_config.items():
            options.add_session_config_entry(key, value)
        session = ort.InferenceSession(str(entry.artifact), options, providers=["CPUExecutionProvider"])
        sessions[entry.precision] = (session, session.get_inputs()[0].name)
    warm_ms = {}
    for entry in timed:
        session, name = sessions[entry.precision]
        started = time.perf_counter_ns()
        for _ in range(warmup):
            session.run(None, {name: sample})
        warm_ms[entry.precision] = (time.perf_counter_ns() - started) / 1e6 / max(warmup, 1)
    # Every block lasts about as long: the slowest model runs ``runs`` times, a faster one more
    # often. Load from elsewhere on the machine that comes and goes then hits all models alike
    # (a fixed count gives a fast model short blocks, which one burst of load can swamp).
    slowest = max(warm_ms.values(), default=1.0)
    for entry in timed:
        entry.runs_per_round = max(runs, round(runs * slowest / warm_ms[entry.precision]))
    for round_index in range(repeats):
        shift = round_index % len(timed)
        for entry in timed[shift:] + timed[:shift]:
            session, name = sessions[entry.precision]
            # Let the previous model's intra-op workers stop spinning (onnxruntime's default)
            # before this one runs; else they compete for the same cores and inflate the tail.
            time.sleep(SETTLE_S)
            session.run(None, {name: sample})
            times = []
            for _ in range(entry.runs_per_round):
                started = time.perf_counter_ns()
                session.run(None, {name: sample})
                times.append((time.perf_counter_ns() - started) / 1e6)
            entry.times_ms += times
            entry.repeat_medians_ms.append(float(np.median(times)))


def paired_ratio(entry: Entry, baseline: Entry) -> float | None:
    """The median over rounds of ``entry``'s round median / ``baseline``'s: the two ran next to
    each other in every round, so a load that comes and goes during the run cancels out."""
    pairs = list(zip(entry.repeat_medians_ms, baseline.repeat_medians_ms, strict=False))
    return float(np.median([a / b for a, b in pairs])) if pairs else None


# --------------------------------------------------------------------------- report


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def render(entries: list[Entry], fp32_size: int | None) -> str:
    headers = ["precision", "gate", "size MiB", "x fp32", "median ms", "p90 ms", "rounds ms"]
    headers += ["cosine", "top-1", "acc %", "max err"]
    rows = [headers]
    for e in entries:
        lat, m, size = e.latency() or {}, e.metrics, e.size_bytes
        rounds = e.repeat_medians_ms
        rows.append(
            [
                e.precision,
                "pass" if e.status == "ok" else "FAILED",
                _fmt(size / 2**20 if size else None, ".2f"),
                _fmt(size / fp32_size if size and fp32_size else None, ".3f"),
                _fmt(lat.get("median"), ".2f"),
                _fmt(lat.get("p90"), ".2f"),
                f"{min(rounds):.1f}..{max(rounds):.1f}" if rounds else "-",
                _fmt(m.get("cosine"), ".5f"),
                _fmt(m.get("top1_agreement"), ".4f"),
                _fmt(100 * m["accuracy"] if m.get("accuracy") is not None else None, ".1f"),
                _fmt(m.get("max_abs_err"), ".2e"),
            ]
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(headers))]
    rows.insert(1, ["-" * w for w in widths])
    lines = [
        "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
        for r in rows
    ]
    lines += [
        f"{e.precision}: gate FAILED, no bundle: {'; '.join(e.gate_failures) or e.error}"
        for e in entries
        if e.status != "ok"
    ]
    lines.append("rounds ms: the lowest and highest per-round median (a wide span means a noisy machine)")
    return "\n".join(lines)


def plot(entries: list[Entry], fp32_size: int | None, machine: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [e for e in entries if e.times_ms and e.size_bytes]
    palette = {"fp32": "#4c72b0", "fp16": "#55a868", "int8": "#c44e52"}
    labels = [e.precision for e in shown]
    colours = [palette.get(e.precision, "grey") for e in shown]
    lats = [e.latency() or {} for e in shown]
    medians = [lat["median"] for lat in lats]
    upper = [lat["p90"] - lat["median"] for lat in lats]
    sizes = [(e.size_bytes or 0) / 2**20 for e in shown]

    fig, (ax_lat, ax_size) = plt.subplots(1, 2, figsize=(10, 4.2))
    bars = ax_lat.bar(labels, medians, color=colours, yerr=[[0] * len(shown), upper], capsize=6)
    for bar, lat in zip(bars, lats, strict=True):
        ax_lat.annotate(
            f"median {lat['median']:.2f} ms\np90 {lat['p90']:.2f} ms",
            (bar.get_x() + bar.get_width() / 2, lat["p90"]),
            xytext=(0, 4),
            textcoords="offset points",
            ha="center",
            va="bottom",
            fontsize=9,
        )
    ax_lat.set_ylabel("ms per sample")
    ax_lat.set_title("single-sample latency (bar: median, whisker: p90)", fontsize=10)
    ax_lat.set_ylim(0, max((m + u for m, u in zip(medians, upper, strict=True)), default=1) * 1.3)
    bars = ax_size.bar(labels, sizes, color=colours)
    for bar, e in zip(bars, shown, strict=True):
        ratio = f"\n{(e.size_bytes or 0) / fp32_size:.2f}x" if fp32_size else ""
        ax_size.annotate(
            f"{bar.get_height():.2f} MiB{ratio}",
            (bar.get_x() + bar.get_width() / 2, bar.get_height()),
            xytext=(0, 2),
            textcoords="offset points",
            ha="center",
            va="bottom",
            fontsize=9,
        )
    ax_size.set_ylabel("artifact size, MiB")
    ax_size.set_title("artifact size")
    ax_size.set_ylim(0, max(sizes, default=1) * 1.25)
    failed = [e.precision for e in entries if e.status != "ok"]
    fig.suptitle(
        f"MobileNetV2-sized model, onnxruntime {machine['onnxruntime']} CPU, "
        f"{machine['threads']} threads\n{machine['cpu']} ({machine['usable_cores']} cores; "
        f"{', '.join(machine['isa']) or 'ISA unknown'})"
        + (f"; gate FAILED, not shown: {', '.join(failed)}" if failed else ""),
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads (default 2)")
    parser.add_argument("--warmup", type=int, default=10, help="untimed runs per model first (default 10)")
    parser.add_argument("--repeats", type=int, default=7, help="interleaved rounds (default 7)")
    parser.add_argument(
        "--runs", type=int, default=20, help="timed runs per round of the slowest model (default 20)"
    )
    parser.add_argument("--bundles", type=Path, default=ROOT / "build" / "bench", help="bundle output folder")
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder for the JSON and PNG")
    parser.add_argument("--regenerate", action="store_true", help="regenerate the model and data first")
    parser.add_argument(
        "--no-cache", action="store_true", help="build without the build cache (after changing the compiler)"
    )
    args = parser.parse_args(argv)

    warnings.filterwarnings("ignore", module="onnxconverter_common")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("root").setLevel(logging.ERROR)  # onnxruntime.quantization's chatter
    started = time.perf_counter()

    machine = machine_info()
    machine["threads"] = args.threads
    print(f"machine: {machine['cpu']}, {machine['cores']} cores ({machine['usable_cores']} usable)")
    print(f"         ISA: {', '.join(machine['isa']) or '?'}; int8 VNNI: {machine['int8_dot_product_vnni']}")
    print(f"onnxruntime {machine['onnxruntime']}, python {machine['python']}, numpy {machine['numpy']}")

    ensure_model(args.regenerate)
    params = parameter_count(MODEL)
    source_size = MODEL.stat().st_size
    print(f"model: {params:,} parameters, {source_size / 2**20:.2f} MiB fp32 source\n")

    entries = build_all(args.bundles, use_cache=not args.no_cache)
    for entry in entries:
        if entry.artifact is not None:
            entry.optimized_ops, entry.unfused = optimized_ops(entry, args.bundles)

    with np.load(EVAL) as data:
        sample = np.ascontiguousarray(data["input"][:1])
    print(
        f"\ntiming: {args.threads} threads, {args.warmup} warm-up runs, "
        f"{args.repeats} interleaved rounds, blocks of {args.runs}+ runs of about equal length, "
        f"input {list(sample.shape)}",
        flush=True,
    )
    time_models(
        entries, sample, threads=args.threads, warmup=args.warmup, repeats=args.repeats, runs=args.runs
    )

    fp32 = next((e for e in entries if e.precision == "fp32"), None)
    fp32_size = fp32.size_bytes if fp32 else None
    int8 = next((e for e in entries if e.precision == "int8"), None)
    int8_ratio = int8.size_bytes / fp32_size if int8 and int8.size_bytes and fp32_size else None
    fp32_lat, int8_lat = (fp32.latency() if fp32 else None), (int8.latency() if int8 else None)
    int8_speed = int8_lat["median"] / fp32_lat["median"] if fp32_lat and int8_lat else None
    paired = paired_ratio(int8, fp32) if int8 and fp32 else None

    print()
    print(render(entries, fp32_size))
    if int8_ratio is not None:
        verdict = "ok" if int8_ratio <= INT8_MAX_SIZE_RATIO else "TOO LARGE"
        print(f"int8 size {int8_ratio:.3f}x fp32 (requirement <= {INT8_MAX_SIZE_RATIO:.2f}x): {verdict}")
    if int8_speed is not None and paired is not None:
        verdict = "ok" if paired <= INT8_MAX_LATENCY_RATIO else "TOO SLOW"
        print(
            f"int8 latency {paired:.3f}x fp32's, the median of the {args.repeats} rounds' int8/fp32 "
            f"ratios (ratio of the overall medians: {int8_speed:.3f}x); requirement <= "
            f"{INT8_MAX_LATENCY_RATIO:.2f}x where the CPU has int8 dot products (VNNI here: "
            f"{machine['int8_dot_product_vnni']}): {verdict}"
        )
    if int8 and int8.optimized_ops:
        print(fusion_summary(int8))

    args.results.mkdir(parents=True, exist_ok=True)
    report = {
        "benchmark": "onnx_precision",
        "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": machine,
        "model": {"path": str(MODEL.relative_to(ROOT)), "parameters": params, "size_bytes": source_size},
        "profile": PROFILE,
        "settings": {
            "threads": args.threads,
            "warmup_runs": args.warmup,
            "repeats": args.repeats,
            "runs_per_repeat": args.runs,
            "input_shape": list(sample.shape),
            "interleaved": True,
        },
        "results": [
            {
                "precision": e.precision,
                "gate_status": e.status,
                "gate": e.gate,
                "gate_failures": e.gate_failures,
                "error": e.error,
                "bundle": e.bundle,
                "runtime_config": e.runtime_config,
                "size_bytes": e.size_bytes,
                "size_ratio_vs_fp32": e.size_bytes / fp32_size if e.size_bytes and fp32_size else None,
                "latency_ms": e.latency(),
                "repeat_medians_ms": e.repeat_medians_ms,
                "runs_per_round": e.runs_per_round,
                "metrics": e.metrics,
                "optimized_ops": e.optimized_ops,
                "unfused_ops": e.unfused,
                "build_s": round(e.build_s, 2),
            }
            for e in entries
        ],
        "checks": {
            "int8_size_ratio": int8_ratio,
            "int8_size_ratio_max": INT8_MAX_SIZE_RATIO,
            "int8_size_ok": None if int8_ratio is None else int8_ratio <= INT8_MAX_SIZE_RATIO,
            "int8_latency_ratio": paired,  # median of the per-round int8/fp32 ratios
            "int8_latency_ratio_of_medians": int8_speed,
            "int8_latency_ratio_max": INT8_MAX_LATENCY_RATIO,
            "int8_latency_ok": None if paired is None else paired <= INT8_MAX_LATENCY_RATIO,
            "int8_unfused_ops": len(int8.unfused) if int8 and int8.optimized_ops else None,
            "all_gates_passed": all(e.status == "ok" for e in entries),
        },
        "elapsed_s": round(time.perf_counter() - started, 1),
    }
    json_path = args.results / "onnx_precision.json"
    png_path = args.results / "onnx_precision.png"
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    plot(entries, fp32_size, machine, png_path)
    print(f"\nwrote {json_path}\nwrote {png_path}\n({report['elapsed_s']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
