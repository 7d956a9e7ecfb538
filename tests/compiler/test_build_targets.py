"""Several targets in one build; models with several, integer and scalar inputs; gates."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from tests.conftest import DIGITS, run_edgec

from .models import multi_input_data, multi_input_model

X86 = Path(__file__).resolve().parents[2] / "device_profiles" / "data" / "x86-64-cpu.toml"


@pytest.fixture(scope="module")
def multi(tmp_path_factory):
    folder = tmp_path_factory.mktemp("multi")
    return (
        multi_input_model(folder / "multi.onnx"),
        multi_input_data(folder / "calib.npz", 256, seed=1),
        multi_input_data(folder / "eval.npz", 64, seed=2),
    )


@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_several_integer_and_scalar_inputs(multi, tmp_path, precision):
    model, calib, evaluation = multi
    result = run_edgec(
        "build",
        model,
        "--target",
        "x86-64-cpu",
        "--format",
        "onnx",
        "--precision",
        precision,
        "--calibration",
        calib,
        "--eval",
        evaluation,
        "--json",
        "--out",
        tmp_path,
    )
    assert result.returncode == 0, result.stderr
    bundle = result.json()["bundles"][0]
    assert bundle["status"] == "ok", bundle["error"]
    manifest = json.loads((Path(bundle["path"]) / "manifest.json").read_text())
    specs = {t["name"]: (t["shape"], t["dtype"]) for t in manifest["inputs"]}
    assert specs == {"x": ([1, 4], "float32"), "ids": ([1, 3], "int64"), "scale": ([], "float32")}
    session = ort.InferenceSession(
        str(Path(bundle["path"]) / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    feeds = {
        "x": np.ones((1, 4), np.float32),
        "ids": np.array([[1, 2, 3]]),
        "scale": np.array(2.0, np.float32),
    }
    scores, total = session.run(["scores", "total"], feeds)
    assert scores.shape == (1, 6)
    assert total.tolist() == [6]


def test_one_target_missing_its_gate_does_not_stop_the_others(tmp_path):
    strict = tmp_path / "strict-box.toml"
    text = X86.read_text().replace('id = "x86-64-cpu"', 'id = "strict-box"')
    # mixed precision reaches that cosine with the convolutions in float: too big for this box
    text = text.replace("max_artifact_bytes = 2_147_483_648", "max_artifact_bytes = 100_000")
    strict.write_text(text.replace("min_cosine = 0.98", "min_cosine = 0.99999"))
    out = tmp_path / "out"
    args = (
        "build",
        DIGITS / "model.onnx",
        "--format",
        "onnx",
        "--precision",
        "int8",
        "--calibration",
        DIGITS / "calib.npz",
        "--eval",
        DIGITS / "eval.npz",
        "--out",
        out,
    )
    result = run_edgec(*args, "--target", strict, "--target", "x86-64-cpu", "--json")
    assert result.returncode == 3, result.stderr
    failed, ok = result.json()["bundles"]
    assert failed["profile"] == "strict-box"
    assert failed["status"] == "failed"
    assert "no configuration met the gate" in failed["error"]
    # the closest try misses on its cosine (int8) or its size (the convolutions in float)
    assert failed["gate_failures"]
    assert all(f.startswith(("cosine", "size")) for f in failed["gate_failures"])
    assert failed["path"] is None
    assert ok["status"] == "ok"
    assert Path(ok["path"]).is_dir()
    assert sorted(p.name for p in out.iterdir()) == ["model-1.0.0-x86-64-cpu"]

    waived = run_edgec(*args, "--target", strict, "--json", "--ignore-gates")
    assert waived.returncode == 0, waived.stderr
    bundle = waived.json()["bundles"][0]
    manifest = json.loads((Path(bundle["path"]) / "manifest.json").read_text())
    assert manifest["verification"]["gate_failures"]
    assert "--ignore-gates" in manifest["verification"]["reason"]


def test_profile_defaults_choose_precision(tmp_path):
    result = run_edgec(
        "build",
        DIGITS / "model.onnx",
        "--target",
        "jetson-orin-nano",
        "--target",
        "raspberry-pi-5",
        "--format",
        "onnx",
        "--calibration",
        DIGITS / "calib.npz",
        "--json",
        "--out",
        tmp_path,
    )
    assert result.returncode == 0, result.stderr
    precisions = {b["profile"]: b["precision"] for b in result.json()["bundles"]}
    assert precisions == {"jetson-orin-nano": "fp16", "raspberry-pi-5": "int8"}
    for b in result.json()["bundles"]:
        assert b["metrics"]["samples"] == 200  # no eval set: verified on the calibration set


def test_profile_default_formats(tmp_path):
    result = run_edgec(
        "build",
        DIGITS / "model.onnx",
        "--target",
        "raspberry-pi-4",
        "--target",
        "x86-64-cpu",
        "--calibration",
        DIGITS / "calib.npz",
        "--json",
        "--out",
        tmp_path,
    )
    assert result.returncode == 0, result.stderr
    formats = {b["profile"]: (b["format"], b["precision"]) for b in result.json()["bundles"]}
    assert formats == {"raspberry-pi-4": ("tflite", "int8"), "x86-64-cpu": ("onnx", "fp32")}


def test_format_all_builds_every_format_the_profile_runs(tmp_path):
    result = run_edgec(
        "build",
        DIGITS / "model.onnx",
        "--target",
        "raspberry-pi-5",
        "--format",
        "all",
        "--precision",
        "fp16",
        "--json",
        "--out",
        tmp_path,
    )
    assert result.returncode == 0, result.stderr
    built = {(b["format"], Path(b["path"]).name) for b in result.json()["bundles"]}
    assert built == {
        ("tflite", "model-1.0.0-raspberry-pi-5-tflite"),
        ("onnx", "model-1.0.0-raspberry-pi-5-onnx"),
    }
