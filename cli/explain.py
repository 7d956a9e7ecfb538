"""``edgec explain BUNDLE``: where a quantized bundle lost its accuracy, layer by layer."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from edgec._table import render_table
from edgec.errors import BundleError
from edgec.manifest import read_manifest

__all__ = ["register"]

REPORT = "report.json"


def register(commands: Any) -> None:
    parser = commands.add_parser(
        "explain", help="per-layer quantization error of an int8 bundle, and the configurations tried"
    )
    parser.add_argument("bundle", type=Path, help="a bundle folder")
    parser.add_argument("--top", type=int, default=10, help="how many layers to show (default 10)")
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.set_defaults(run=run)


def _db(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def run(args: argparse.Namespace) -> int:
    manifest = read_manifest(args.bundle)
    try:
        report = json.loads((args.bundle / REPORT).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise BundleError(f"cannot read {args.bundle / REPORT}: {e}") from e
    layers = report.get("layer_errors") or []
    if args.json:
        print(json.dumps({"layers": layers[: args.top], "search": report.get("search", [])}, indent=2))
        return 0
    print(
        f"{manifest.name} {manifest.version} for {manifest.profile.id} ({manifest.format.value}, "
        f"{manifest.precision.value})"
    )
    for note in report.get("notes", []):
        print(f"  {note}")
    if not layers:
        print("no per-layer figures: they are measured for int8 ONNX Runtime and TensorRT bundles")
        return 0
    rows = [
        (
            i + 1,
            e["tensor"],
            e["op"],
            e["producer"] or "-",
            _db(e.get("drop_db")),
            _db(e["qdq_sqnr_db"]),
            _db(e["model_sqnr_db"]),
        )
        for i, e in enumerate(layers[: args.top])
    ]
    print(
        "\nquantized tensors, most harmful first (dB; 'lost' is the model SQNR lost on the way to "
        "the tensor,\nthe others SQNR per channel, lower is worse):"
    )
    headers = ("#", "tensor", "op", "produced by", "lost", "at its Q/DQ", "vs float model")
    print(render_table(headers, rows, right=(0, 4, 5, 6)))
    search = report.get("search") or []
    if search:
        chosen = next((s for s in search if s["chosen"]), None)
        print(
            f"\n{len(search)} configurations tried; chosen: {chosen['configuration'] if chosen else 'none'}"
        )
        if chosen and chosen["float_nodes"]:
            print("kept in float: " + ", ".join(chosen["float_nodes"]))
    return 0
