"""The digits sample through ``edgec build`` as a user runs it, per precision."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from tests.conftest import DIGITS, run_edgec


def _build(out: Path, precision: str, *extra: str):
    return run_edgec(
        "build",
        DIGITS / "model.onnx",
        "--target",
        "x86-64-cpu",
        "--format",
        "onnx",
        "--precision",
        precision,
        "--eval",
        DIGITS / "eval.npz",
        "--json",
        "--out",
        out,
        *extra,
    )


@pytest.fixture(scope="module")
def int8(tmp_path_factory):
    out = tmp_path_factory.mktemp("int8")
    result = _build(out, "int8", "--calibration", DIGITS / "calib.npz")
    assert result.returncode == 0, result.stderr
    return result.json()["bundles"][0]


def _session(bundle: Path) -> ort.InferenceSession:
    """Open the bundle's model as a device would: with the manifest's runtime settings."""
    manifest = json.loads((bundle / "manifest.json").read_text())
    options = ort.SessionOptions()
    for key, value in manifest["runtime_config"].items():
        options.add_session_config_entry(key, value)
    return ort.InferenceSession(
        str(bundle / manifest["model_file"]), options, providers=["CPUExecutionProvider"]
    )


def _accuracy_in_onnxruntime(bundle: Path) -> float:
    data = np.load(DIGITS / "eval.npz")
    session = _session(bundle)
    predictions = [session.run(None, {"x": x[None]})[0].argmax() for x in data["x"]]
    return float(np.mean(np.array(predictions) == data["y"]))


def test_int8_bundle_keeps_accuracy_within_one_point(int8):
    assert int8["status"] == "ok"
    assert int8["error"] is None
    m = int8["metrics"]
    assert m["samples"] == 540
    assert m["source_accuracy"] >= 0.95
    assert (m["source_accuracy"] - m["accuracy"]) * 100 <= 1.0
    # the figure is what the artifact really does in onnxruntime, not a copy of the source's
    assert _accuracy_in_onnxruntime(Path(int8["path"])) == pytest.approx(m["accuracy"])


def test_int8_bundle_is_quantized_and_smaller(int8):
    bundle = Path(int8["path"])
    source_size = (DIGITS / "model.onnx").stat().st_size
    assert int8["size_bytes"] == (bundle / "model.onnx").stat().st_size
    assert int8["size_bytes"] < 0.4 * source_size
    import onnx

    ops = {n.op_type for n in onnx.load(str(bundle / "model.onnx")).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops


def test_manifest_hashes_match_every_file(int8):
    bundle = Path(int8["path"])
    manifest = json.loads((bundle / "manifest.json").read_text())
    listed = {f["path"] for f in manifest["files"]}
    on_disk = {p.name for p in bundle.iterdir()} - {"manifest.json"}
    assert listed == on_disk == {"model.onnx", "golden.npz", "report.json"}
    for entry in manifest["files"]:
        data = (bundle / entry["path"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == entry["sha256"]
        assert len(data) == entry["length"]


def test_manifest_records_contract_fields(int8):
    manifest = json.loads((Path(int8["path"]) / "manifest.json").read_text())
    assert manifest["schema_version"] == 1
    assert manifest["profile"]["id"] == "x86-64-cpu"
    assert len(manifest["profile"]["sha256"]) == 64
    assert (manifest["format"], manifest["precision"]) == ("onnx", "int8")
    (x,) = manifest["inputs"]
    assert (x["name"], x["shape"], x["dtype"], x["layout"]) == ("x", [1, 1, 8, 8], "float32", "NCHW")
    assert manifest["outputs"][0]["shape"] == [1, 10]
    source = (DIGITS / "model.onnx").read_bytes()
    assert manifest["source"]["sha256"] == hashlib.sha256(source).hexdigest()
    assert {"onnxruntime", "onnx", "edgec", "numpy"} <= set(manifest["tool_versions"])
    stats = {s["name"]: s for s in manifest["reference_stats"]}
    assert set(stats) == {"x", "logits"}
    assert sum(stats["x"]["bin_fractions"]) == pytest.approx(1.0)
    assert stats["x"]["min"] == 0.0
    assert stats["x"]["max"] == 1.0
    assert manifest["runtime_config"] == {}  # 7-bit GEMM weights: x86's fast kernels are exact
    assert manifest["verification"]["data"] == "eval"
    assert manifest["verification"]["gate"]["max_accuracy_drop_points"] == 1.0


def test_golden_vectors_reproduce_in_the_bundle_model(int8):
    bundle = Path(int8["path"])
    golden = np.load(bundle / "golden.npz")
    session = _session(bundle)
    inputs, expected = golden["inputs/x"], golden["outputs/logits"]
    assert inputs.shape == (8, 1, 1, 8, 8)
    assert expected.shape == (8, 1, 10)
    got = np.stack([session.run(None, {"x": x})[0] for x in inputs])
    # golden outputs are the source model's: the int8 artifact agrees on the class
    assert (got.argmax(-1) == expected.argmax(-1)).mean() >= 0.875


def test_fp16_top1_agreement(tmp_path):
    result = _build(tmp_path, "fp16")
    assert result.returncode == 0, result.stderr
    bundle = result.json()["bundles"][0]
    assert bundle["status"] == "ok"
    assert bundle["metrics"]["top1_agreement"] >= 0.995
    assert (bundle["metrics"]["source_accuracy"] - bundle["metrics"]["accuracy"]) * 100 <= 1.0
    import onnx

    model = onnx.load(str(Path(bundle["path"]) / "model.onnx"))
    fp16_weights = [i for i in model.graph.initializer if i.data_type == onnx.TensorProto.FLOAT16]
    assert fp16_weights, "fp16 bundle holds no fp16 weights"
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT  # float32 I/O kept


def test_fp32_is_exact_enough_and_inspect_reads_it(tmp_path):
    result = _build(tmp_path, "fp32")
    assert result.returncode == 0, result.stderr
    bundle = result.json()["bundles"][0]
    assert bundle["metrics"]["max_abs_err"] < 1e-4
    assert bundle["metrics"]["accuracy"] == bundle["metrics"]["source_accuracy"]
    shown = run_edgec("inspect", bundle["path"])
    assert shown.returncode == 0, shown.stderr
    assert "x86-64-cpu" in shown.stdout
    assert "sha256 mismatch" not in shown.stdout


def test_inspect_finds_a_tampered_file(int8, tmp_path):
    copy = tmp_path / "bundle"
    shutil.copytree(int8["path"], copy)
    model = copy / "model.onnx"
    data = bytearray(model.read_bytes())
    data[-10] ^= 0xFF
    model.write_bytes(bytes(data))
    result = run_edgec("inspect", copy, "--json")
    assert result.returncode == 3
    assert result.json()["file_problems"] == {"model.onnx": "sha256 mismatch"}


def test_table_output_and_progress(tmp_path):
    result = run_edgec(
        "build",
        DIGITS / "model.onnx",
        "--target",
        "raspberry-pi-4",
        "--format",
        "onnx",
        "--precision",
        "fp32",
        "--out",
        tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert "raspberry-pi-4" in result.stdout
    assert "cosine" in result.stdout
    assert "verifying on 32 generated samples" in result.stderr


def test_dynamic_quantization_needs_no_calibration(tmp_path):
    result = _build(tmp_path, "dynamic")
    assert result.returncode == 0, result.stderr
    (bundle,) = result.json()["bundles"]
    assert bundle["status"] == "ok"
    assert (bundle["metrics"]["source_accuracy"] - bundle["metrics"]["accuracy"]) * 100 <= 1.0
    assert bundle["size_bytes"] < 0.4 * (DIGITS / "model.onnx").stat().st_size
    refused = run_edgec(
        "build",
        DIGITS / "model.onnx",
        "--target",
        "apple-silicon-mac",
        "--precision",
        "dynamic",
        "--out",
        tmp_path / "apple",
    )
    assert refused.returncode == 2
    assert "does not allow dynamic" in refused.stderr
