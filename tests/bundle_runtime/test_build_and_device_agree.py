"""Verified at build means the device's own code produced the figures.

A bundle built by the compiler is served by the agent's runtime on the build's own
verification samples (the digits eval set); the figures the agent's outputs give against
the source model's are the ones the build wrote into the manifest. A device that converted
tensors another way (layout, int8 rounding) or opened its session with other settings
would give other figures.
"""

from __future__ import annotations

import numpy as np
import pytest

from agent.runtime import load_bundle
from compiler.runtime import OnnxRuntimeRunner
from compiler.verify import compare
from edgec.manifest import read_manifest
from tests.conftest import DIGITS


def _served(bundle, xs):
    model = load_bundle(bundle, threads=2)
    try:
        return [model.infer({"x": x}) for x in xs]
    finally:
        model.close()


@pytest.mark.parametrize("which", ["onnx-fp32", "tflite-int8", "tflite-int8-io"])
def test_the_agent_reproduces_the_build_verification_figures(digits_bundles, digits_int8_io_bundle, which):
    bundle = {
        "onnx-fp32": digits_bundles["x86-64-cpu"],
        "tflite-int8": digits_bundles["raspberry-pi-4"],
        "tflite-int8-io": digits_int8_io_bundle,
    }[which]
    manifest = read_manifest(bundle)
    built = manifest.verification.metrics
    assert built is not None
    assert manifest.verification.data == "eval"
    with np.load(DIGITS / "eval.npz") as npz:
        xs, labels = npz["x"][:, None], npz["y"]  # one sample of [1, 1, 8, 8] at a time
    assert built.samples == len(xs)
    source = OnnxRuntimeRunner(DIGITS / "model.onnx")
    reference = [source.run({"x": x}) for x in xs]
    kinds = {o.name: o.kind for o in manifest.outputs if o.kind is not None}
    served = compare(reference, _served(bundle, xs), labels, kinds)
    for figure in ("max_abs_err", "mean_abs_err", "cosine", "top1_agreement", "accuracy"):
        assert getattr(served, figure) == pytest.approx(getattr(built, figure), rel=1e-6, abs=1e-9), figure


def test_golden_outputs_are_the_source_model_and_the_agent_stays_within_the_build_error(digits_bundles):
    bundle = digits_bundles["raspberry-pi-4"]
    built = read_manifest(bundle).verification.metrics
    assert built is not None
    assert built.max_abs_err is not None
    with np.load(bundle / "golden.npz") as npz:
        xs, want = npz["inputs/x"], npz["outputs/logits"]
    got = np.stack([out["logits"] for out in _served(bundle, xs)])
    assert got.shape == want.shape
    assert float(np.abs(got - want).max()) <= built.max_abs_err  # a subset of the verified samples
    assert float(np.abs(got - want).max()) > 0  # int8: not the source's own numbers
