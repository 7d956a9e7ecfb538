"""Releases of the digits sample for a local fleet: built with ``edgec build``, and a variant
whose answers show which release gave them (its logits doubled), for hot-swap checks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from localfleet.commands import ROOT, run_edgec
from localfleet.processes import HarnessError

__all__ = ["DIGITS", "build_digits", "doubled_logits"]

DIGITS = ROOT / "samples" / "digits"


def build_digits(
    source: Path,
    version: str,
    out: Path,
    eval_set: Path,
    *,
    profile: str = "x86-64-cpu",
    precision: str = "fp32",
) -> Path:
    """``edgec build`` of a digits model as ``digits:VERSION`` for ``profile``; the bundle."""
    result = run_edgec(
        "build", source, "--name", "digits", "--version", version, "--target", profile,
        "--precision", precision, "--calibration", DIGITS / "calib.npz", "--eval", eval_set,
        "--out", out, "--no-cache",
    )  # fmt: skip
    if result.returncode != 0:
        raise HarnessError(f"edgec build of digits:{version} failed:\n{result.stderr}{result.stdout}")
    return out / f"digits-{version}-{profile}"


def doubled_logits(model: Any) -> Any:
    """The digits ONNX model (an ``onnx.ModelProto``, changed in place) with its logits times 2:
    the same predictions, and an answer shows which release gave it."""
    import numpy as np
    from onnx import helper, numpy_helper

    graph = model.graph
    out = graph.output[0].name
    for node in graph.node:  # whichever node makes the logits now makes them single
        node.output[:] = ["logits_single" if name == out else name for name in node.output]
    graph.initializer.append(numpy_helper.from_array(np.array(2.0, dtype=np.float32), "two"))
    graph.node.append(helper.make_node("Mul", ["logits_single", "two"], [out], name="double"))
    return model
