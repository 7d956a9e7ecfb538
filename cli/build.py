"""``edgec build``: compile a model for device profiles and write verified bundles."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from edgec._table import render_table
from edgec.errors import EXIT_OK, EXIT_TARGET_FAILED
from edgec.manifest import Precision, TargetFormat

if TYPE_CHECKING:
    from compiler.report import BuildResult

__all__ = ["register"]

DEFAULT_MAX_SAMPLES = 4096  # compiler.limits.DEFAULT_MAX_SAMPLES, not imported: --help loads no numpy


def register(commands: Any) -> None:
    parser = commands.add_parser(
        "build",
        help="compile a model into verified bundles for device profiles",
        description="Convert and quantize MODEL for each --target profile, verify every "
        "artifact against MODEL, and write one bundle per target.",
    )
    parser.add_argument(
        "model",
        type=Path,
        help="the trained model: .onnx, .tflite, Keras .keras/.h5, a SavedModel folder, or a "
        "torch.export program .pt2",
    )
    parser.add_argument(
        "--target",
        "-t",
        action="append",
        required=True,
        metavar="PROFILE",
        help="a profile id or .toml file; repeat for several",
    )
    parser.add_argument(
        "--format",
        choices=[*(f.value for f in TargetFormat), "all"],
        help="artifact format (default: the profile's first; all: every format the profile runs)",
    )
    parser.add_argument(
        "--precision",
        choices=[*(p.value for p in Precision), "auto"],
        help="numeric precision (default: the profile's); dynamic: int8 weights, float "
        "activations; auto: the smallest artifact that meets the gate (int8, mixed, fp16, fp32)",
    )
    parser.add_argument(
        "--calibration",
        type=Path,
        metavar="FILE.npz|DIR",
        help="representative inputs for int8, keyed by input name",
    )
    parser.add_argument(
        "--eval",
        type=Path,
        metavar="FILE.npz",
        help="evaluation inputs (and labels under 'y') for verification",
    )
    parser.add_argument(
        "--input-shape",
        action="append",
        default=[],
        metavar="NAME=D0,D1,...",
        help="fix an input's dynamic dimensions; repeat per input",
    )
    parser.add_argument(
        "--freeze",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="replace input NAME by a constant (a number, or a comma list filling the input's "
        "shape, typed by its dtype, e.g. sr=16000) and fold what it decides: branches (If) on it "
        "are replaced by the branch taken. NAME is then no longer an input of the bundle; data "
        "files may still hold it: it is ignored with a warning. Repeat per input",
    )
    parser.add_argument(
        "--output-kind",
        action="append",
        default=[],
        metavar="NAME=KIND",
        help="how output NAME is judged against the source, where the kind found from its shape "
        "and values is wrong: classification (top-1), dense (cosine, PSNR, map IoU), sequence "
        "(per-step argmax), detection (cosine, confident anchors), regression (error over range). "
        "Repeat per output",
    )
    parser.add_argument(
        "--state",
        action="append",
        default=[],
        metavar="INPUT=OUTPUT",
        help="a stateful model's state: OUTPUT is fed back into INPUT at the next step. Found by "
        "name when not given (state/stateN, h0/hn, c0/cn, X_in/X_out, past_X/present_X); giving any "
        "replaces what names suggest. Data samples are then steps in order: int8 calibrates on the "
        "states the source carries and every artifact is verified carrying its own. Repeat per state",
    )
    parser.add_argument(
        "--sequence-length",
        type=int,
        metavar="N",
        help="stateful models: every N samples of a data file are one sequence, each starting from "
        "the state its first sample holds (zeros if the file has no state input) (default: the whole "
        "file is one sequence; 1: every sample alone, as a stateless model)",
    )
    parser.add_argument(
        "--max-samples",
        type=int,
        default=DEFAULT_MAX_SAMPLES,
        metavar="N",
        help=f"use at most the first N samples of --calibration and of --eval data (default: "
        f"{DEFAULT_MAX_SAMPLES}; a warning says when data is cut); without data, min(32, N) random "
        "inputs are generated",
    )
    parser.add_argument(
        "--memory-budget",
        metavar="SIZE",
        help="the most memory the build may take for model inputs, outputs and data, e.g. 8GiB "
        "(default: $EDGEC_MEMORY_BUDGET, else half the memory available); shapes and data files "
        "that would exceed it are refused before anything is loaded",
    )
    parser.add_argument("--name", help="bundle name (default: the model file's stem)")
    parser.add_argument("--version", default="1.0.0", help="bundle version (default: 1.0.0)")
    parser.add_argument("--out", type=Path, default=Path("build"), help="output folder (default: build)")
    parser.add_argument("--force", action="store_true", help="replace bundles that already exist")
    parser.add_argument(
        "--ignore-gates",
        action="store_true",
        help="write bundles that miss their verification gate (recorded in the manifest)",
    )
    parser.add_argument(
        "--no-cache", action="store_true", help="convert and verify again even if the build cache has it"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON document to stdout")
    parser.set_defaults(run=run)


class _Progress:
    def __init__(self) -> None:
        self._start = time.perf_counter()

    def __call__(self, message: str) -> None:
        print(f"[{time.perf_counter() - self._start:6.1f}s] {message}", file=sys.stderr, flush=True)


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def _trail_table(trail: list[dict[str, Any]]) -> str:
    rows = []
    for step in trail:
        m = step["metrics"] or {}
        acc = m.get("accuracy")
        rows.append(
            (
                "*" if step["chosen"] else "",
                step["configuration"],
                _size(step["size_bytes"]),
                _fmt(m.get("cosine"), ".5f"),
                _fmt(m.get("top1_agreement"), ".4f"),
                "-" if acc is None else f"{acc * 100:.2f}",
                "pass" if step["passed"] else "fail",
            )
        )
    headers = ("", "configuration", "size", "cosine", "top-1 agree", "acc %", "gate")
    return render_table(headers, rows, right=(2, 3, 4, 5))


def _judged_by_kind(outputs: list[Any]) -> bool:
    """More than the main table shows: several outputs, or one that is not a classifier's."""
    return len(outputs) > 1 or any(o.kind.value != "classification" for o in outputs)


# the figure each kind is judged on, after cosine: (attribute, label, format)
_KIND_FIGURE = {
    "classification": ("top1_agreement", "top-1", ".4f"),
    "dense": ("psnr_db", "PSNR dB", ".1f"),
    "sequence": ("sequence_agreement", "per-step", ".4f"),
    "detection": ("anchor_agreement", "anchors", ".4f"),
    "regression": ("rel_err", "err/range", ".2e"),
}


def _outputs_table(outputs: list[Any]) -> str:
    rows = []
    for o in outputs:
        attribute, label, spec = _KIND_FIGURE[o.kind.value]
        value = getattr(o, attribute)
        extra = f" IoU {o.map_iou:.4f}" if o.map_iou is not None else ""
        rows.append(
            (
                o.name,
                o.kind.value,
                _fmt(o.max_abs_err, ".2e"),
                _fmt(o.cosine, ".5f"),
                "-" if value is None else f"{label} {value:{spec}}{extra}",
            )
        )
    return render_table(("output", "kind", "max err", "cosine", "judged on"), rows, right=(2, 3))


def render(result: BuildResult) -> str:
    rows = []
    for b in result.bundles:
        m = b.metrics
        acc = "-"
        if m is not None and m.accuracy is not None and m.source_accuracy is not None:
            acc = f"{m.accuracy * 100:.2f} ({m.source_accuracy * 100:.2f})"
        rows.append(
            (
                b.profile,
                b.format.value,
                b.precision.value,
                b.status.value,
                _size(b.size_bytes),
                _size(b.memory.peak_bytes if b.memory else None),
                _fmt(m.max_abs_err if m else None, ".2e"),
                _fmt(m.cosine if m else None, ".5f"),
                _fmt(m.top1_agreement if m else None, ".4f"),
                acc,
            )
        )
    headers = (
        "profile",
        "format",
        "precision",
        "status",
        "size",
        "peak mem",
        "max err",
        "cosine",
        "top-1 agree",
        "acc % (source)",
    )
    lines = [render_table(headers, rows, right=(4, 5, 6, 7, 8, 9))]
    for b in result.bundles:
        if b.metrics is not None and _judged_by_kind(b.metrics.outputs):
            lines.append(f"\n{b.profile} {b.format.value} {b.precision.value}: outputs by kind")
            lines.append(_outputs_table(b.metrics.outputs))
    for b in result.bundles:
        if b.search:
            lines.append(f"\n{b.profile} {b.format.value}: configurations tried")
            lines.append(_trail_table(b.search))
    for b in result.bundles:
        if b.path:
            lines.append(f"{b.profile}: {b.path}")
        if b.path and b.memory_note:
            lines.append(f"{b.profile}: peak memory {b.memory_note}")
        if b.error or b.reason:
            lines.append(f"{b.profile}: {b.status.value}: {b.error or b.reason}")
    return "\n".join(lines)


def _format(value: str | None) -> TargetFormat | Literal["all"] | None:
    if value == "all":
        return "all"
    return TargetFormat(value) if value else None


def _precision(value: str | None) -> Precision | Literal["auto"] | None:
    if value == "auto":
        return "auto"
    return Precision(value) if value else None


def run(args: argparse.Namespace) -> int:
    from compiler.build import BuildRequest, build
    from compiler.freeze import parse_freeze
    from compiler.kinds import parse_output_kinds
    from compiler.limits import parse_size
    from compiler.prepare import parse_input_shapes
    from compiler.stateful import parse_states

    request = BuildRequest(
        model=args.model,
        targets=args.target,
        out=args.out,
        format=_format(args.format),
        precision=_precision(args.precision),
        calibration=args.calibration,
        eval=args.eval,
        input_shapes=parse_input_shapes(args.input_shape),
        freeze=parse_freeze(args.freeze),
        output_kinds=parse_output_kinds(args.output_kind),
        states=parse_states(args.state),
        sequence_length=args.sequence_length,
        name=args.name,
        version=args.version,
        force=args.force,
        ignore_gates=args.ignore_gates,
        memory_budget_bytes=parse_size(args.memory_budget) if args.memory_budget is not None else None,
        max_samples=args.max_samples,
        **({"cache": None} if args.no_cache else {}),
    )
    result = build(request, progress=None if args.json and not sys.stderr.isatty() else _Progress())
    if args.json:
        print(json.dumps(result.model_dump(mode="json"), indent=2))
    else:
        print(render(result))
    return EXIT_TARGET_FAILED if result.failed else EXIT_OK
