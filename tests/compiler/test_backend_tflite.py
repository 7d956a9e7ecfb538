"""TFLite artifacts from ONNX: built offline, verified in LiteRT, layouts recorded."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from ai_edge_litert.interpreter import Interpreter

from tests.conftest import DIGITS, UNSHARE, run_edgec

from .models import multi_input_data, multi_input_model, rgb_model

PI4 = Path(__file__).resolve().parents[2] / "device_profiles" / "data" / "raspberry-pi-4.toml"


def _build(out: Path, *args: str | Path, offline: bool = False):
    return run_edgec(
        "build",
        DIGITS / "model.onnx",
        "--format",
        "tflite",
        "--calibration",
        DIGITS / "calib.npz",
        "--eval",
        DIGITS / "eval.npz",
        "--json",
        "--out",
        out,
        *args,
        offline=offline,
    )


def _litert_accuracy(bundle: Path) -> float:
    """Run the bundle's .tflite as the agent would: by the manifest's tensor specs."""
    manifest = json.loads((bundle / "manifest.json").read_text())
    (x_spec,) = manifest["inputs"]
    (out_spec,) = manifest["outputs"]
    runner = Interpreter(model_path=str(bundle / manifest["model_file"])).get_signature_runner()
    data = np.load(DIGITS / "eval.npz")
    hits = 0
    for x, label in zip(data["x"], data["y"], strict=True):
        assert x_spec["layout"] == "NHWC"
        value = x.transpose(1, 2, 0)[None]  # NCHW sample -> NHWC, as the manifest says
        if x_spec["scale"] is not None:
            value = np.round(value / x_spec["scale"] + x_spec["zero_point"]).clip(-128, 127)
        result = runner(**{x_spec["runtime_name"] or x_spec["name"]: value.astype(x_spec["dtype"])})
        logits = result[out_spec["runtime_name"] or out_spec["name"]]
        hits += int(np.argmax(logits) == label)
    return hits / len(data["y"])


@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8", "dynamic"])
def test_digits_tflite_keeps_accuracy(tmp_path, precision):
    result = _build(tmp_path, "--target", "raspberry-pi-4", "--precision", precision)
    assert result.returncode == 0, result.stderr
    (bundle,) = result.json()["bundles"]
    assert bundle["status"] == "ok", bundle["error"]
    m = bundle["metrics"]
    assert (m["source_accuracy"] - m["accuracy"]) * 100 <= 1.0
    path = Path(bundle["path"])
    assert (path / "model.tflite").is_file()
    assert _litert_accuracy(path) == pytest.approx(m["accuracy"])


def test_int8_io_when_the_profile_asks(tmp_path):
    profile = tmp_path / "mcu.toml"
    text = PI4.read_text().replace('id = "raspberry-pi-4"', 'id = "int8-io-box"')
    profile.write_text(text.replace("\nprecisions", "\ntflite_int8_io = true\nprecisions"))
    result = _build(tmp_path / "out", "--target", profile, "--precision", "int8")
    assert result.returncode == 0, result.stderr
    (bundle,) = result.json()["bundles"]
    manifest = json.loads((Path(bundle["path"]) / "manifest.json").read_text())
    (x,) = manifest["inputs"]
    assert x["dtype"] == "int8"
    assert x["scale"] > 0
    assert manifest["outputs"][0]["dtype"] == "int8"
    assert _litert_accuracy(Path(bundle["path"])) == pytest.approx(bundle["metrics"]["accuracy"])


@pytest.mark.skipif(UNSHARE is None, reason="unshare is not available to cut the network")
def test_build_needs_no_network(tmp_path):
    """The whole build in a network namespace with no interfaces up: nothing can be fetched."""
    result = _build(tmp_path, "--target", "raspberry-pi-4", "--precision", "int8", offline=True)
    assert result.returncode == 0, result.stderr
    assert result.json()["bundles"][0]["status"] == "ok"


@pytest.mark.skipif(UNSHARE is None, reason="unshare is not available to cut the network")
def test_rgb_image_model_needs_no_network(tmp_path):
    """onnx2tf fetches sample images for 3-channel models unless handed local ones."""
    model = rgb_model(tmp_path / "rgb.onnx")
    calib = tmp_path / "calib.npz"
    np.savez(calib, image=np.random.default_rng(1).random((24, 3, 16, 16), dtype=np.float32))
    for data in ([], ["--calibration", calib]):
        result = run_edgec(
            "build",
            model,
            "--target",
            "raspberry-pi-4",
            "--format",
            "tflite",
            "--precision",
            "fp32",
            *data,
            "--json",
            "--out",
            tmp_path / f"out{len(data)}",
            offline=True,
        )
        assert result.returncode == 0, result.stderr
        (bundle,) = result.json()["bundles"]
        assert bundle["status"] == "ok", bundle["error"]
        manifest = json.loads((Path(bundle["path"]) / "manifest.json").read_text())
        assert manifest["inputs"][0]["layout"] == "NHWC"


def test_several_integer_and_scalar_inputs(tmp_path):
    model = multi_input_model(tmp_path / "multi.onnx")
    calib = multi_input_data(tmp_path / "calib.npz", 256, seed=1)
    evaluation = multi_input_data(tmp_path / "eval.npz", 64, seed=2)
    for precision in ("fp32", "int8"):
        result = run_edgec(
            "build",
            model,
            "--target",
            "raspberry-pi-4",
            "--format",
            "tflite",
            "--precision",
            precision,
            "--calibration",
            calib,
            "--eval",
            evaluation,
            "--json",
            "--out",
            tmp_path / precision,
        )
        assert result.returncode == 0, result.stderr
        (bundle,) = result.json()["bundles"]
        assert bundle["status"] == "ok", bundle["error"]
        manifest = json.loads((Path(bundle["path"]) / "manifest.json").read_text())
        dtypes = {t["name"]: t["dtype"] for t in manifest["inputs"]}
        assert dtypes == {"x": "float32", "ids": "int64", "scale": "float32"}
