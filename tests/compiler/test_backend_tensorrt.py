"""TensorRT-ready bundles: Q/DQ int8 graph, build plan, operator preflight, honest status."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from compiler.backends.tensorrt import SUPPORTED_OPS, preflight
from tests.conftest import DIGITS, run_edgec

from .models import unsupported_op_model

try:
    import tensorrt  # noqa: F401

    HAVE_TENSORRT = True
except ImportError:
    HAVE_TENSORRT = False


@pytest.fixture(scope="module")
def int8_bundle(tmp_path_factory):
    out = tmp_path_factory.mktemp("trt")
    result = run_edgec(
        "build",
        DIGITS / "model.onnx",
        "--target",
        "jetson-orin-nano",
        "--format",
        "tensorrt",
        "--precision",
        "int8",
        "--calibration",
        DIGITS / "calib.npz",
        "--eval",
        DIGITS / "eval.npz",
        "--json",
        "--out",
        out,
    )
    assert result.returncode == 0, result.stderr
    (bundle,) = result.json()["bundles"]
    return bundle


@pytest.mark.skipif(HAVE_TENSORRT, reason="tensorrt is installed: the engine path is tested instead")
def test_int8_bundle_is_unverified_here_with_the_reason(int8_bundle):
    assert int8_bundle["status"] == "unverified"
    assert "TensorRT is not installed" in int8_bundle["reason"]
    manifest = json.loads((Path(int8_bundle["path"]) / "manifest.json").read_text())
    assert manifest["verification"]["status"] == "unverified"
    # the stand-in figures (onnxruntime on the TensorRT-ready graph) still pass the gate
    assert (int8_bundle["metrics"]["source_accuracy"] - int8_bundle["metrics"]["accuracy"]) * 100 <= 1.0


def test_int8_graph_is_symmetric_qdq_and_passes_preflight(int8_bundle):
    folder = Path(int8_bundle["path"]) / "model.trt"
    model = onnx.load(str(folder / "model.onnx"))
    ops = [n.op_type for n in model.graph.node]
    assert "QuantizeLinear" in ops
    assert "DequantizeLinear" in ops
    zero_points = [
        onnx.numpy_helper.to_array(i) for i in model.graph.initializer if i.name.endswith("zero_point")
    ]
    assert zero_points
    assert all(not np.any(z) for z in zero_points)
    assert preflight(model) == []


def test_build_plan(int8_bundle):
    folder = Path(int8_bundle["path"]) / "model.trt"
    plan = json.loads((folder / "build_plan.json").read_text())
    assert plan["precision"] == "int8"
    assert plan["strongly_typed"] is True
    assert plan["inputs"] == [{"name": "x", "min": [1, 1, 8, 8], "opt": [1, 1, 8, 8], "max": [1, 1, 8, 8]}]
    assert plan["target_compute_capability"] == "8.7"
    assert plan["workspace_bytes"] == 1 << 30
    manifest = json.loads((Path(int8_bundle["path"]) / "manifest.json").read_text())
    listed = {f["path"] for f in manifest["files"]}
    assert {"model.trt/model.onnx", "model.trt/build_plan.json"} <= listed
    assert "model.trt/model.plan" not in listed  # no engine claimed where none was built


def test_preflight_names_unsupported_and_custom_nodes(tmp_path):
    model = onnx.load(str(unsupported_op_model(tmp_path / "m.onnx")))
    custom = onnx.helper.make_node("FusedGemm", ["x"], ["y"], name="fused", domain="com.microsoft")
    model.graph.node.append(custom)
    problems = preflight(model)
    assert problems[0].startswith("head/hardmax:0 (Hardmax): not in")
    assert problems[1] == "fused (FusedGemm): custom domain 'com.microsoft'"
    assert "Hardmax" not in SUPPORTED_OPS


def test_unsupported_operator_fails_that_target_only(tmp_path):
    model = unsupported_op_model(tmp_path / "hardmax.onnx")
    result = run_edgec(
        "build",
        model,
        "--target",
        "x86-64-cpu",
        "--target",
        "jetson-orin-nano",
        "--precision",
        "fp32",
        "--json",
        "--out",
        tmp_path / "out",
    )
    assert result.returncode == 3, result.stderr
    x86, jetson = result.json()["bundles"]
    assert x86["status"] == "ok"
    assert jetson["status"] == "failed"
    assert "head_hardmax_0 (Hardmax)" in jetson["error"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["hardmax-1.0.0-x86-64-cpu"]


@pytest.mark.skipif(not HAVE_TENSORRT, reason="tensorrt cannot be installed from this machine's registries")
def test_engine_is_built_and_verified_where_tensorrt_runs(int8_bundle):
    assert int8_bundle["status"] == "ok"
    assert (Path(int8_bundle["path"]) / "model.trt" / "model.plan").is_file()
