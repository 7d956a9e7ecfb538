"""``edgec inspect BUNDLE``: what a bundle holds, and whether its files are intact."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from edgec._table import render_table
from edgec.errors import EXIT_OK, EXIT_TARGET_FAILED
from edgec.manifest import Manifest, check_files, read_manifest

__all__ = ["register"]


def register(commands: Any) -> None:
    parser = commands.add_parser("inspect", help="print a bundle's manifest and check its files")
    parser.add_argument("bundle", type=Path, help="a bundle folder")
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.set_defaults(run=run)


def _figure(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def render(manifest: Manifest, problems: dict[str, str | None]) -> str:
    m = manifest
    lines = [
        f"{m.name} {m.version} for {m.profile.id} ({m.format.value}, {m.precision.value})",
        f"  source    {m.source.filename} ({m.source.format}, sha256 {m.source.sha256[:12]})",
        f"  created   {m.created_at}   latency budget {m.max_latency_ms:g} ms",
        "  tools     " + ", ".join(f"{k} {v}" for k, v in sorted(m.tool_versions.items())),
        "",
    ]
    rows = [("input", t.name, str(t.shape), t.dtype, t.layout.value) for t in m.inputs]
    rows += [("output", t.name, str(t.shape), t.dtype, t.layout.value) for t in m.outputs]
    lines += [render_table(("", "tensor", "shape", "dtype", "layout"), rows), ""]
    v = m.verification
    lines.append(f"verification: {v.status.value} on {v.data} data" + (f" ({v.reason})" if v.reason else ""))
    if v.metrics is not None:
        x = v.metrics
        rows2 = [
            ("samples", str(x.samples)),
            ("max abs err", _figure(x.max_abs_err, ".3e")),
            ("mean abs err", _figure(x.mean_abs_err, ".3e")),
            ("cosine", _figure(x.cosine, ".6f")),
            ("top-1 agreement", _figure(x.top1_agreement, ".4f")),
            ("accuracy", _figure(x.accuracy, ".4f")),
            ("source accuracy", _figure(x.source_accuracy, ".4f")),
        ]
        lines += [render_table(("figure", "value"), rows2, right=(1,)), ""]
    file_rows = [(f.path, f"{f.length:,}", f.sha256[:16], problems.get(f.path) or "ok") for f in m.files]
    lines.append(render_table(("file", "bytes", "sha256", "check"), file_rows, right=(1,)))
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    manifest = read_manifest(args.bundle)
    problems = check_files(args.bundle, manifest)
    intact = not any(problems.values())
    if args.json:
        document = {
            "manifest": manifest.model_dump(mode="json"),
            "files_ok": intact,
            "file_problems": {k: v for k, v in problems.items() if v},
        }
        print(json.dumps(document, indent=2))
    else:
        print(render(manifest, problems))
    return EXIT_OK if intact else EXIT_TARGET_FAILED
