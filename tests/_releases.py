"""The digits sample built as several releases, once per session, for the agent's tests.

``releases`` builds the digits sample as several releases once per session:

- 1.0.0  the sample;
- 2.0.0  the same network with its logits doubled (so a response shows which model answered);
- 3.0.0  2.0.0 with golden outputs that do not match it (a bundle that fails its self-test);
- 4.0.0  the sample with a heavy side branch that leaves the outputs alone but takes far longer
         than the profile's latency budget (it passes self-test and fails probation);
- 5.0.0  the sample padded with a 6 MB constant the graph reads (a download worth interrupting);
- 6.0.0  the sample with class 0's logit lowered by 100: it never answers 0, so it disagrees
         with 1.0.0 on the inputs 1.0.0 calls 0 (about 10 % of the digits), and agrees on the rest.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from edgec.manifest import file_entry
from localfleet.releases import build_digits, doubled_logits
from tests._cli import DIGITS

PROFILE = "x86-64-cpu"


# -------------------------------------------------------------------------------
def _with_side_branch(
    model: onnx.ModelProto, branch: list[onnx.NodeProto], constants: dict[str, np.ndarray]
) -> onnx.ModelProto:
    """Add ``branch`` (which ends in a scalar ``side``) as ``logits + 0 * side``."""
    graph = model.graph
    out = graph.output[0].name
    graph.node[-1].output[0] = "logits_main"
    for name, value in {**constants, "zero": np.array(0.0, dtype=np.float32)}.items():
        graph.initializer.append(numpy_helper.from_array(value, name))
    graph.node.extend(branch)
    graph.node.append(helper.make_node("Mul", ["side", "zero"], ["side_zero"]))
    graph.node.append(helper.make_node("Add", ["logits_main", "side_zero"], [out]))
    return model


def _slow(model: onnx.ModelProto) -> onnx.ModelProto:
    """Two 1024x1024 matrix products per request, seeded from the input: ~4 GFLOP."""
    rng = np.random.default_rng(0)
    x = model.graph.input[0].name
    branch = [
        helper.make_node("ReduceMean", [x], ["x_mean"], keepdims=0),
        helper.make_node("Expand", ["x_mean", "big_shape"], ["big"]),
        helper.make_node("MatMul", ["big", "w1"], ["h1"]),
        helper.make_node("MatMul", ["h1", "w2"], ["h2"]),
        helper.make_node("ReduceSum", ["h2"], ["side"], keepdims=0),
    ]
    constants = {
        "big_shape": np.array([1024, 1024], dtype=np.int64),
        "w1": rng.standard_normal((1024, 1024)).astype(np.float32),
        "w2": rng.standard_normal((1024, 1024)).astype(np.float32),
    }
    return _with_side_branch(model, branch, constants)


def _class_zero_never_wins(model: onnx.ModelProto) -> onnx.ModelProto:
    """The logits plus a constant that takes 100 off class 0's."""
    graph = model.graph
    out = graph.output[0].name
    for node in graph.node:
        node.output[:] = ["logits_before" if name == out else name for name in node.output]
    shift = np.zeros(10, dtype=np.float32)
    shift[0] = -100.0
    graph.initializer.append(numpy_helper.from_array(shift, "class_zero_shift"))
    graph.node.append(helper.make_node("Add", ["logits_before", "class_zero_shift"], [out], name="shift"))
    return model


def _padded(model: onnx.ModelProto) -> onnx.ModelProto:
    """A 6 MB constant the graph reads one element of (so no optimizer drops it)."""
    x = model.graph.input[0].name
    branch = [
        helper.make_node("ReduceMax", [x], ["x_max"], keepdims=0),
        helper.make_node("Mul", ["x_max", "zero_f"], ["x_zero"]),
        helper.make_node("Cast", ["x_zero"], ["index"], to=onnx.TensorProto.INT64),
        helper.make_node("Gather", ["pad", "index"], ["side"]),
    ]
    constants = {
        "pad": np.random.default_rng(1).standard_normal(1_500_000).astype(np.float32),
        "zero_f": np.array(0.0, dtype=np.float32),
    }
    return _with_side_branch(model, branch, constants)


def _build(source: Path, version: str, out: Path, eval_set: Path) -> Path:
    return build_digits(source, version, out, eval_set, profile=PROFILE)


def rewrite_bundle(bundle: Path, dest: Path, version: str, edit_golden=None) -> Path:
    """A copy of ``bundle`` as another version, optionally with its golden file edited; the
    manifest's file list is rehashed so the bundle is well formed (and publishable)."""
    shutil.copytree(bundle, dest)
    if edit_golden is not None:
        with np.load(dest / "golden.npz") as golden:
            arrays = {k: golden[k] for k in golden.files}
        edit_golden(arrays)
        np.savez_compressed(dest / "golden.npz", **arrays)
    manifest = json.loads((dest / "manifest.json").read_text())
    manifest["version"] = version
    manifest["files"] = [file_entry(dest, dest / f["path"]).model_dump() for f in manifest["files"]]
    (dest / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return dest


@pytest.fixture(scope="session")
def releases(tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("releases")
    sample = onnx.load(DIGITS / "model.onnx")
    with np.load(DIGITS / "eval.npz") as data:
        np.savez(out / "eval-small.npz", x=data["x"][:24], y=data["y"][:24])  # the slow build stays quick
    small = out / "eval-small.npz"
    sources = {"2.0.0": doubled_logits, "4.0.0": _slow, "5.0.0": _padded, "6.0.0": _class_zero_never_wins}
    bundles = {"1.0.0": _build(DIGITS / "model.onnx", "1.0.0", out, small)}
    for version, make in sources.items():
        path = out / f"digits-{version}.onnx"
        onnx.save(make(onnx.load(DIGITS / "model.onnx")), path)
        bundles[version] = _build(path, version, out, small)
    del sample

    def wrong(arrays: dict[str, np.ndarray]) -> None:
        arrays["outputs/logits"] = arrays["outputs/logits"][::-1] + 3.0

    bundles["3.0.0"] = rewrite_bundle(bundles["2.0.0"], out / f"digits-3.0.0-{PROFILE}", "3.0.0", wrong)
    return bundles
