"""Compile the MobileNetV2-sized model for every bundled device profile and compare the bundles.

Run:  make bench
  or  .venv/bin/python bench/bench_formats.py [--repeats 7] [--runs 20] [--threads 2]

What it measures:

1. makes sure ``samples/mobilenet/`` holds the MobileNetV2-sized model and its calibration
   and eval data, generating them with ``samples/mobilenet/make_mobilenetv2.py`` if missing;
2. builds it for every bundled device profile at the profile's default format and default
   precision (x86-64-cpu: onnx fp32; raspberry-pi-4/5, android-arm64: tflite int8; jetson-*:
   tensorrt fp16; apple-silicon-mac, iphone: coreml fp16) with ``--calibration calib.npz`` and
   ``--eval eval.npz``, in ONE build call (``compiler.build.build`` with all targets in one
   ``BuildRequest``) so the shared work (preparing the graph, running the source on the eval
   set, the onnx2tf SavedModel) is done once; records the build's wall time. Gates are never
   waived: a bundle that misses its gate is reported FAILED with its figures;
3. reports per bundle: status (ok, unverified with its reason, failed with its error), size,
   max abs error, cosine, top-1 agreement, accuracy vs the source's, from the build's own
   verification on ``eval.npz``;
4. times, on this machine, every artifact whose runtime runs here, on single samples with
   ``--threads`` threads (default 2): the fp32 source ONNX in onnxruntime (the baseline), the
   onnx bundles in onnxruntime (each session opened with its manifest's ``runtime_config``),
   the tflite bundles in LiteRT (``ai_edge_litert`` Interpreter and signature runner, inputs
   fed in the manifest's layout, NHWC), and the TensorRT bundles' TensorRT-ready
   ``model.trt/model.onnx`` in onnxruntime: an onnxruntime CPU stand-in, NOT TensorRT's
   latency. CoreML runs only on macOS: its latency is not measurable here. As in
   ``bench_onnx_precision.py``: warm-up runs, then ``--repeats`` rounds of ``--runs`` runs per
   artifact, all artifacts interleaved in each round (the order rotates), each block after a
   short pause and one untimed run; median and p90 per run. Each timed artifact's output on
   the timed sample is also checked against the source's (a wrongly fed input shows there);
5. prints the machine, the library versions and a table, and writes
   ``bench/results/formats.json`` and ``bench/results/formats.png``.

Bundles go to ``build/bench/formats/`` (``--bundles``), replacing earlier ones. About 1.5
minutes on 2 cores: the build about one (three TFLite int8 conversions, two CoreML ones).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

BENCH = Path(__file__).resolve().parent
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

from _common import library_versions  # noqa: E402  (a sibling module, found through BENCH)
from bench_onnx_precision import (  # noqa: E402  (a sibling script, found through BENCH)
    CALIB,
    EVAL,
    MODEL,
    RESULTS,
    ROOT,
    SETTLE_S,
    Entry,
    _fmt,
    _progress,
    ensure_model,
    machine_info,
    parameter_count,
)

LIBRARIES = ("onnxruntime", "ai-edge-litert", "tensorflow", "onnx2tf", "coremltools", "onnx")
NAME = "mobilenetv2"
ORT = "onnxruntime"
ORT_STAND_IN = "onnxruntime stand-in, not TensorRT"
LITERT = "LiteRT"
COREML_NOT_HERE = "not measurable here (CoreML runs on macOS only)"

Call = Callable[[], Any]


@dataclass
class Row(Entry):
    """One artifact: the source baseline or one bundle, its build outcome and its timings."""

    label: str = ""
    profile: str | None = None
    format: str = ""
    reason: str | None = None  # why a bundle is unverified
    runtime: str | None = None  # what times it here; None: not timed
    latency_note: str | None = None  # why it has no latency here
    input_layout: str | None = None
    notes: list[str] = field(default_factory=list)
    timings_s: dict[str, float] = field(default_factory=dict)
    sha256: str | None = None
    same_as: str | None = None  # an earlier row whose timed file is byte-identical
    sample_check: dict[str, Any] = field(default_factory=dict)  # its output vs the source's


# --------------------------------------------------------------------------- machine


def versions() -> dict[str, str | None]:
    return library_versions(LIBRARIES)


# --------------------------------------------------------------------------- build


class _Clock:
    """The build's progress messages, timestamped, to split its wall time by target.

    (The build's own ``timings_s`` per target is not relied on.) A target's time runs from
    each of its messages to the next message; the rest (loading, preparing the graph, running
    the source on the eval set) is shared. The onnx2tf SavedModel that the TFLite and CoreML
    targets share is made once, by the first of them, and counts as that target's time.
    """

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.events: list[tuple[float, str]] = []

    def __call__(self, message: str) -> None:
        self.events.append((time.perf_counter(), message))
        _progress(message)

    def split(self, labels: list[str], ended: float) -> tuple[float, dict[str, float]]:
        per = dict.fromkeys(labels, 0.0)
        shared = (self.events[0][0] if self.events else ended) - self.started
        for i, (at, message) in enumerate(self.events):
            until = self.events[i + 1][0] if i + 1 < len(self.events) else ended
            owner = next((label for label in labels if message.startswith(f"{label}:")), None)
            if owner is None:
                shared += until - at
            else:
                per[owner] += until - at
        return shared, per


def build_matrix(bundles: Path, targets: list[str]) -> tuple[list[Row], float, float]:
    """One build call for all targets, each at its default format and precision.

    Returns the rows, the build's wall time and the part of it shared by all targets.
    """
    from compiler.backends.tensorrt import ONNX_FILE
    from compiler.build import BuildRequest, build
    from edgec.manifest import TargetFormat, read_manifest, sha256_file

    print(
        f"edgec build {MODEL.name} --target {' --target '.join(targets)} "
        f"--calibration {CALIB.name} --eval {EVAL.name} --force",
        flush=True,
    )
    request = BuildRequest(
        model=MODEL,
        targets=targets,
        out=bundles,
        format=None,  # each profile's default format
        precision=None,  # each profile's default precision
        calibration=CALIB,
        eval=EVAL,
        name=NAME,
        force=True,
    )
    clock = _Clock()
    result = build(request, progress=clock)
    ended = time.perf_counter()
    wall_s = ended - clock.started
    labels = [f"{b.profile} {b.format.value} {b.precision.value}" for b in result.bundles]
    shared_s, per_target_s = clock.split(labels, ended)

    rows = []
    for bundle, label in zip(result.bundles, labels, strict=True):
        row = Row(
            bundle.precision.value,
            status=bundle.status.value,
            error=bundle.error,
            gate=bundle.gate,
            gate_failures=list(bundle.gate_failures),
            metrics=bundle.metrics.model_dump() if bundle.metrics else {},
            build_s=per_target_s[label],
            size_bytes=bundle.size_bytes,
            label=label,
            profile=bundle.profile,
            format=bundle.format.value,
            reason=bundle.reason,
            notes=list(bundle.notes),
            timings_s={k: round(v, 2) for k, v in bundle.timings_s.items()},
        )
        if bundle.path:
            path = Path(bundle.path)
            manifest = read_manifest(path)
            row.bundle = str(path)
            row.runtime_config = dict(manifest.runtime_config)
            row.input_layout = ",".join(s.layout.value for s in manifest.inputs)
            if bundle.format is TargetFormat.ONNX:
                row.artifact, row.runtime = path / manifest.model_file, ORT
            elif bundle.format is TargetFormat.TFLITE:
                row.artifact, row.runtime = path / manifest.model_file, LITERT
            elif bundle.format is TargetFormat.TENSORRT:
                row.artifact, row.runtime = path / manifest.model_file / ONNX_FILE, ORT_STAND_IN
            elif bundle.format is TargetFormat.COREML:
                row.latency_note = COREML_NOT_HERE
            else:
                row.latency_note = f"no runtime for {bundle.format.value} here"
            if row.artifact is not None:
                row.sha256 = sha256_file(row.artifact)
        else:
            row.latency_note = "no bundle (build failed)"
        rows.append(row)
    seen: dict[str, str] = {}
    for row in rows:
        if row.sha256:
            row.same_as = seen.setdefault(row.sha256, row.label)
            if row.same_as == row.label:
                row.same_as = None
    return rows, wall_s, shared_s


def source_row() -> Row:
    from edgec.manifest import sha256_file

    return Row(
        "fp32",
        status="source",
        artifact=MODEL,
        size_bytes=MODEL.stat().st_size,
        label="source fp32 (baseline)",
        format="onnx",
        runtime=ORT,
        input_layout="NCHW",
        sha256=sha256_file(MODEL),
    )


# --------------------------------------------------------------------------- runners


def _onnxruntime(row: Row, inputs: dict[str, np.ndarray], threads: int) -> tuple[Call, Call]:
    import onnxruntime as ort

    from bundle_runtime import session_options  # the agent's session settings

    options = session_options(row.runtime_config, threads=threads)
    session = ort.InferenceSession(str(row.artifact), options, providers=["CPUExecutionProvider"])
    feeds = {i.name: inputs[i.name] for i in session.get_inputs()}
    output = session.get_outputs()[0].name

    def call() -> Any:
        return session.run(None, feeds)

    def logits() -> np.ndarray:
        return np.asarray(session.run([output], feeds)[0], dtype=np.float32)

    return call, logits


def _litert(row: Row, inputs: dict[str, np.ndarray], threads: int) -> tuple[Call, Call]:
    from ai_edge_litert.interpreter import Interpreter

    from bundle_runtime import TensorPort
    from compiler._capture import captured_output
    from edgec.manifest import read_manifest

    manifest = read_manifest(Path(row.bundle or ""))
    with captured_output():  # LiteRT announces its XNNPACK delegate on the terminal
        interpreter = Interpreter(model_path=str(row.artifact), num_threads=threads)
        runner = interpreter.get_signature_runner()
    kwargs = {}
    for spec in manifest.inputs:  # the agent's conversion: channels-last, int8 scaling
        port = TensorPort.of(spec)
        kwargs[port.key] = np.ascontiguousarray(port.to_artifact(inputs[spec.name]))
    out = manifest.outputs[0]

    def call() -> Any:
        return runner(**kwargs)

    def logits() -> np.ndarray:
        value = runner(**kwargs)[out.runtime_name or out.name]
        if out.scale is not None and out.zero_point is not None:
            value = (value.astype(np.float32) - out.zero_point) * out.scale
        return np.asarray(value, dtype=np.float32)  # logits [1, classes]: no layout to undo

    return call, logits


def open_runners(rows: list[Row], inputs: dict[str, np.ndarray], threads: int) -> dict[str, Call]:
    """A call per timed row; checks each one's output on the sample against the source's."""
    from compiler.runtime import first_line

    calls: dict[str, Call] = {}
    reference: np.ndarray | None = None
    for row in rows:
        if row.runtime is None or row.artifact is None:
            continue
        opener = _litert if row.runtime == LITERT else _onnxruntime
        try:
            call, logits = opener(row, inputs, threads)
            result = logits().reshape(-1)
        except Exception as e:  # a runtime's own failure is reported, not fatal
            row.latency_note = f"{row.runtime} cannot run it: {first_line(e)}"
            row.runtime = None
            continue
        if reference is None:
            reference = result  # the source comes first
        cosine = float(result @ reference / (np.linalg.norm(result) * np.linalg.norm(reference) + 1e-12))
        row.sample_check = {
            "cosine_vs_source": cosine,
            "top1": int(result.argmax()),
            "source_top1": int(reference.argmax()),
        }
        calls[row.label] = call
    return calls


# --------------------------------------------------------------------------- timing


def time_rows(rows: list[Row], calls: dict[str, Call], *, warmup: int, repeats: int, runs: int) -> None:
    timed = [r for r in rows if r.label in calls]
    for row in timed:
        for _ in range(warmup):
            calls[row.label]()
    for round_index in range(repeats):
        shift = round_index % len(timed)
        for row in timed[shift:] + timed[:shift]:
            call = calls[row.label]
            # Let the previous artifact's thread-pool workers (onnxruntime's and XNNPACK's
            # spin) go idle before this one runs, else they compete for the same cores.
            time.sleep(SETTLE_S)
            call()
            times = []
            for _ in range(runs):
                started = time.perf_counter_ns()
                call()
                times.append((time.perf_counter_ns() - started) / 1e6)
            row.times_ms += times
            row.repeat_medians_ms.append(float(np.median(times)))


# --------------------------------------------------------------------------- report


def _status(row: Row) -> str:
    return {"ok": "ok", "unverified": "unverified", "source": "source"}.get(row.status, "FAILED")


def _percent(value: float | None) -> str:
    return _fmt(100 * value if value is not None else None, ".1f")


def render(rows: list[Row], source_size: int) -> str:
    headers = [
        "artifact",
        "status",
        "build s",
        "size MiB",
        "x src",
        "median ms",
        "p90 ms",
        "rounds ms",
        "timed with",
    ]
    headers += ["max err", "cosine", "top-1", "acc %", "src acc %", "in"]
    table = [headers]
    for r in rows:
        lat, m, size = r.latency() or {}, r.metrics, r.size_bytes
        rounds = r.repeat_medians_ms
        timed_with = r.runtime if r.times_ms else ("-" if r.status == "failed" else "not here")
        table.append(
            [
                r.label,
                _status(r),
                _fmt(r.build_s if r.profile else None, ".1f"),
                _fmt(size / 2**20 if size else None, ".2f"),
                _fmt(size / source_size if size else None, ".3f"),
                _fmt(lat.get("median"), ".2f"),
                _fmt(lat.get("p90"), ".2f"),
                f"{min(rounds):.1f}..{max(rounds):.1f}" if rounds else "-",
                timed_with or "-",
                _fmt(m.get("max_abs_err"), ".2e"),
                _fmt(m.get("cosine"), ".5f"),
                _fmt(m.get("top1_agreement"), ".3f"),
                _percent(m.get("accuracy")),
                _percent(m.get("source_accuracy")),
                r.input_layout or "-",
            ]
        )
    widths = [max(len(t[i]) for t in table) for i in range(len(headers))]
    table.insert(1, ["-" * w for w in widths])
    lines = [
        "  ".join(
            c.ljust(w) if headers[i] in ("artifact", "status", "timed with") else c.rjust(w)
            for i, (c, w) in enumerate(zip(t, widths, strict=True))
        )
        for t in table
    ]
    lines.append("")
    for r in rows:
        if r.status == "failed":
            lines.append(f"{r.label}: FAILED: {'; '.join(r.gate_failures) or r.error}")
        elif r.status == "unverified":
            lines.append(f"{r.label}: unverified: {r.reason}")
        if r.runtime == ORT_STAND_IN and r.times_ms:
            lines.append(
                f"{r.label}: latency is {ORT_STAND_IN}: its TensorRT-ready model.trt/model.onnx on "
                "onnxruntime's CPU provider (fp16 weights, float32 compute), not an engine on a GPU"
            )
        if r.latency_note and r.status != "failed":
            lines.append(f"{r.label}: latency {r.latency_note}")
        if r.same_as:
            lines.append(f"{r.label}: its timed file is byte-identical to {r.same_as}'s")
        check = r.sample_check
        if check and (check["top1"] != check["source_top1"] or check["cosine_vs_source"] < 0.9):
            lines.append(
                f"{r.label}: WARNING: on the timed sample its output differs from the source's "
                f"(cosine {check['cosine_vs_source']:.4f}, top-1 {check['top1']} vs {check['source_top1']})"
            )
    lines.append(
        "build s: the target's share of the one build call (the first TFLite/CoreML target's "
        "includes the shared onnx2tf conversion); max err .. src acc %: the build's verification "
        "against the source on eval.npz; in: input layout; rounds ms: lowest and highest "
        "per-round median (a wide span: a noisy machine)"
    )
    return "\n".join(lines)


_COLOURS = {ORT: "#4c72b0", ORT_STAND_IN: "#8c8c8c", LITERT: "#dd8452", "coreml": "#8172b3"}


def _colour(row: Row) -> str:
    if row.status == "source":
        return "#333333"
    return _COLOURS.get(row.runtime or row.format, _COLOURS.get(row.format, "#999999"))


def plot(rows: list[Row], machine: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [r for r in rows if r.status != "failed"]
    labels = [
        r.label + ("\n(onnxruntime stand-in, not TensorRT)" if r.runtime == ORT_STAND_IN else "")
        for r in shown
    ]
    y = np.arange(len(shown))
    fig, (ax_lat, ax_size) = plt.subplots(
        1, 2, figsize=(13, 0.55 * len(shown) + 2.2), sharey=True, gridspec_kw={"width_ratios": [3, 2]}
    )
    lats = [r.latency() for r in shown]
    medians = [lat["median"] if lat else 0.0 for lat in lats]
    upper = [lat["p90"] - lat["median"] if lat else 0.0 for lat in lats]
    bars = ax_lat.barh(
        y, medians, color=[_colour(r) for r in shown], xerr=[[0] * len(shown), upper], capsize=4
    )
    top = max((m + u for m, u in zip(medians, upper, strict=True)), default=1.0) or 1.0
    for bar, row, lat in zip(bars, shown, lats, strict=True):
        if row.runtime == ORT_STAND_IN:
            bar.set_hatch("//")
        mid = bar.get_y() + bar.get_height() / 2
        if lat:
            text = f" {lat['median']:.2f} ms (p90 {lat['p90']:.2f})"
            ax_lat.text(lat["p90"] + 0.01 * top, mid, text, va="center", fontsize=8)
        else:
            ax_lat.text(
                0.01 * top, mid, row.latency_note or "not timed", va="center", fontsize=8, color="grey"
            )
    ax_lat.set_yticks(y, labels, fontsize=8)
    ax_lat.invert_yaxis()
    ax_lat.set_xlim(0, top * 1.45)
    ax_lat.set_xlabel("ms per sample on this machine")
    ax_lat.set_title("single-sample latency (bar: median, whisker: p90)", fontsize=10)

    sizes = [(r.size_bytes or 0) / 2**20 for r in shown]
    bars = ax_size.barh(y, sizes, color=[_colour(r) for r in shown])
    for bar, size in zip(bars, sizes, strict=True):
        ax_size.text(size, bar.get_y() + bar.get_height() / 2, f" {size:.2f} MiB", va="center", fontsize=8)
    ax_size.set_xlim(0, max(sizes, default=1.0) * 1.3)
    ax_size.set_xlabel("artifact size, MiB")
    ax_size.set_title("artifact size", fontsize=10)

    failed = [r.label for r in rows if r.status == "failed"]
    lib = machine["versions"]
    fig.suptitle(
        "MobileNetV2-sized model, each profile's default format and precision; "
        f"{machine['threads']} threads, {machine['cpu']} ({machine['usable_cores']} cores)\n"
        f"onnxruntime {lib['onnxruntime']}, ai-edge-litert {lib['ai-edge-litert']}"
        + (f"\nFAILED, no bundle, not shown: {', '.join(failed)}" if failed else ""),
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _row_json(r: Row, source_size: int) -> dict[str, Any]:
    return {
        "label": r.label,
        "profile": r.profile,
        "format": r.format,
        "precision": r.precision,
        "status": r.status,
        "reason": r.reason,
        "error": r.error,
        "gate": r.gate,
        "gate_failures": r.gate_failures,
        "metrics": r.metrics,
        "bundle": r.bundle,
        "timed_file": str(r.artifact.relative_to(ROOT))
        if r.artifact and r.artifact.is_relative_to(ROOT)
        else None,
        "sha256": r.sha256,
        "same_file_as": r.same_as,
        "input_layout": r.input_layout,
        "runtime_config": r.runtime_config,
        "size_bytes": r.size_bytes,
        "size_ratio_vs_source": r.size_bytes / source_size if r.size_bytes else None,
        "latency_runtime": r.runtime if r.times_ms else None,
        "latency_ms": r.latency(),
        "latency_note": r.latency_note,
        "repeat_medians_ms": r.repeat_medians_ms,
        "sample_check": r.sample_check,
        "notes": r.notes,
        "build_s": round(r.build_s, 2) if r.profile else None,
        "build_timings_s": r.timings_s,  # the build's own per-step figures, where it reports them
    }


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    from device_profiles import bundled_profile_ids

    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="runtime threads (default 2)")
    parser.add_argument("--warmup", type=int, default=10, help="untimed runs per artifact first (default 10)")
    parser.add_argument("--repeats", type=int, default=7, help="interleaved rounds (default 7)")
    parser.add_argument("--runs", type=int, default=20, help="timed runs per artifact per round (default 20)")
    parser.add_argument(
        "--targets", nargs="+", default=None, help="profiles to build (default: every bundled profile)"
    )
    parser.add_argument(
        "--bundles", type=Path, default=ROOT / "build" / "bench" / "formats", help="bundle output folder"
    )
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder for the JSON and PNG")
    parser.add_argument("--regenerate", action="store_true", help="regenerate the model and data first")
    args = parser.parse_args(argv)

    warnings.filterwarnings("ignore", module="onnxconverter_common")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("root").setLevel(logging.ERROR)  # onnxruntime.quantization's chatter
    started = time.perf_counter()

    machine = machine_info()
    machine["threads"] = args.threads
    machine["versions"] = versions()
    print(f"machine: {machine['cpu']}, {machine['cores']} cores ({machine['usable_cores']} usable)")
    print(f"         ISA: {', '.join(machine['isa']) or '?'}; int8 VNNI: {machine['int8_dot_product_vnni']}")
    print("versions: " + ", ".join(f"{k} {v or 'not installed'}" for k, v in machine["versions"].items()))
    print(f"          python {machine['python']}, numpy {machine['numpy']}")

    ensure_model(args.regenerate)
    params = parameter_count(MODEL)
    source_size = MODEL.stat().st_size
    print(f"model: {params:,} parameters, {source_size / 2**20:.2f} MiB fp32 source\n")

    targets = args.targets or bundled_profile_ids()
    bundle_rows, build_wall_s, shared_s = build_matrix(args.bundles, targets)
    print(
        f"build: {build_wall_s:.1f} s wall for {len(bundle_rows)} targets in one call: "
        f"{shared_s:.1f} s shared (prepare, source on the eval set), "
        f"{build_wall_s - shared_s:.1f} s in the targets (convert, verify, bundle)",
        flush=True,
    )

    rows = [source_row(), *bundle_rows]
    with np.load(EVAL) as data:
        inputs = {k: np.ascontiguousarray(data[k][:1]) for k in data.files if k != "y"}
    calls = open_runners(rows, inputs, args.threads)
    shape = {k: list(v.shape) for k, v in inputs.items()}
    print(
        f"\ntiming {len(calls)} artifacts: {args.threads} threads, {args.warmup} warm-up runs, "
        f"{args.repeats} interleaved rounds x {args.runs} runs per artifact, input {shape}",
        flush=True,
    )
    time_rows(rows, calls, warmup=args.warmup, repeats=args.repeats, runs=args.runs)

    print()
    print(render(rows, source_size))
    print(f"\nbuild wall time: {build_wall_s:.1f} s ({len(bundle_rows)} targets, one build call)")

    args.results.mkdir(parents=True, exist_ok=True)
    report = {
        "benchmark": "formats",
        "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": machine,
        "model": {"path": str(MODEL.relative_to(ROOT)), "parameters": params, "size_bytes": source_size},
        "build": {
            "targets": targets,
            "format": "each profile's default",
            "precision": "each profile's default",
            "calibration": str(CALIB.relative_to(ROOT)),
            "eval": str(EVAL.relative_to(ROOT)),
            "bundles": str(args.bundles),
            "wall_s": round(build_wall_s, 2),
            "shared_s": round(shared_s, 2),
            "per_target_s": {r.label: round(r.build_s, 2) for r in bundle_rows},
        },
        "settings": {
            "threads": args.threads,
            "warmup_runs": args.warmup,
            "repeats": args.repeats,
            "runs_per_repeat": args.runs,
            "input_shape": shape,
            "interleaved": True,
        },
        "results": [_row_json(r, source_size) for r in rows],
        "checks": {
            "all_built": all(r.status != "failed" for r in bundle_rows),
            "failed": [r.label for r in bundle_rows if r.status == "failed"],
            "unverified": [r.label for r in bundle_rows if r.status == "unverified"],
        },
        "elapsed_s": round(time.perf_counter() - started, 1),
    }
    json_path = args.results / "formats.json"
    png_path = args.results / "formats.png"
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    plot(rows, machine, png_path)
    print(f"\nwrote {json_path}\nwrote {png_path}\n({report['elapsed_s']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
