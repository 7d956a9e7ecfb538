"""``edgec profiles list|show``."""

from __future__ import annotations

import argparse
import json
from typing import Any

from edgec._table import render_table
from edgec.manifest import OutputKind

__all__ = ["register"]


def register(commands: Any) -> None:
    parser = commands.add_parser("profiles", help="list and show device profiles")
    sub = parser.add_subparsers(dest="profiles_command", metavar="ACTION", required=True)
    ls = sub.add_parser("list", help="the bundled device profiles")
    ls.add_argument("--json", action="store_true", help="print JSON")
    ls.set_defaults(run=run_list)
    show = sub.add_parser("show", help="one profile in full")
    show.add_argument("profile", help="a profile id or the path of a .toml profile")
    show.add_argument("--json", action="store_true", help="print JSON")
    show.set_defaults(run=run_show)


_THRESHOLD_LABELS = {
    "min_cosine": "cos>=",
    "min_psnr_db": "PSNR>=",
    "min_top1_agreement": "top1>=",
    "min_map_iou": "IoU>=",
    "min_sequence_agreement": "steps>=",
    "min_anchor_agreement": "anchors>=",
    "max_rel_err": "err/range<=",
}


def _thresholds(found: dict[str, float]) -> str:
    return "  ".join(f"{_THRESHOLD_LABELS[name]} {value:g}" for name, value in found.items())


def _gib(n: int) -> str:
    return f"{n / 2**30:.0f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def run_list(args: argparse.Namespace) -> int:
    from device_profiles import bundled_profile_ids, load_profile

    profiles = [load_profile(pid) for pid in bundled_profile_ids()]
    if args.json:
        print(json.dumps([p.model_dump(mode="json") for p in profiles], indent=2))
        return 0
    rows = [
        (
            p.id,
            f"{p.cpu_arch.value} x{p.cpu_cores}",
            _gib(p.ram_bytes),
            ", ".join(a.kind for a in p.accelerators) or "-",
            " > ".join(f.value for f in p.formats),
            p.default_precision.value,
            f"{p.max_latency_ms:g}",
        )
        for p in profiles
    ]
    headers = ("profile", "cpu", "ram", "accelerators", "formats", "default", "budget ms")
    print(render_table(headers, rows, right=(6,)))
    return 0


def run_show(args: argparse.Namespace) -> int:
    from device_profiles import load_profile

    profile = load_profile(args.profile)
    data = profile.model_dump(mode="json")
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    print(f"{profile.id}: {profile.display_name}  (sha256 {profile.sha256()[:12]})")
    print(f"  cpu            {profile.cpu_arch.value}, {profile.cpu_cores} cores, {profile.cpu_model}")
    print(f"  memory         {_gib(profile.ram_bytes)}")
    for acc in profile.accelerators:
        peak = f", {acc.peak_tops_int8:g} TOPS int8" if acc.peak_tops_int8 else ""
        print(f"  accelerator    {acc.kind}: {acc.name}{peak}")
    print(f"  formats        {' > '.join(f.value for f in profile.formats)} (first is the default)")
    print(f"  onnxruntime    {', '.join(r.value for r in profile.onnxruntime_providers)}")
    precisions = ", ".join(p.value for p in profile.precisions)
    print(f"  precisions     {precisions} (default {profile.default_precision.value})")
    print(f"  latency budget {profile.max_latency_ms:g} ms")
    print(f"  max artifact   {_gib(profile.max_artifact_bytes)}")
    if profile.model_memory_budget_bytes is not None:
        print(f"  model memory   {_gib(profile.model_memory_budget_bytes)} (peak, load + inference)")
    rows = [
        (
            p.value,
            f"{g.max_accuracy_drop_points:g}",
            *(_thresholds(g.for_kind(kind)) for kind in OutputKind),
        )
        for p, g in profile.gates.items()
    ]
    print("  gates (per output kind; acc drop in points where labels are given):")
    table = render_table(("precision", "acc drop", *(k.value for k in OutputKind)), rows, right=(1,))
    print("\n".join("    " + line for line in table.splitlines()))
    return 0
