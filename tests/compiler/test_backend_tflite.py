"""TFLite artifacts from ONNX: built offline, verified in LiteRT, layouts recorded."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from ai_edge_litert.interpreter import Interpreter

from tests.conftest import DIGITS, UNSHARE, run_edgec

from .models import (
    awkward_names_model,
    dft_model,
    lstm_model,
    multi_input_data,
    multi_input_model,
    rgb_model,
    yolov8_head_model,
)

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


def test_names_onnx2tf_rejects_still_convert(tmp_path):
    """Tensors that collide once onnx2tf rewrites ``:`` and ``/``, an input named ``0`` and an
    output named ``out put``: renamed for the converter, the source's names in the bundle."""
    model = awkward_names_model(tmp_path / "awkward.onnx")
    rng = np.random.default_rng(3)
    np.savez(tmp_path / "calib.npz", **{"0": rng.random((16, 3, 16, 16), dtype=np.float32)})
    np.savez(tmp_path / "eval.npz", **{"0": rng.random((8, 3, 16, 16), dtype=np.float32)})
    result = run_edgec(
        "build",
        model,
        "--target",
        "raspberry-pi-4",
        "--format",
        "tflite",
        "--precision",
        "fp32",
        "--calibration",
        tmp_path / "calib.npz",
        "--eval",
        tmp_path / "eval.npz",
        "--json",
        "--out",
        tmp_path / "out",
    )
    assert result.returncode == 0, result.stderr
    (bundle,) = result.json()["bundles"]
    assert bundle["status"] == "ok", bundle["error"]
    # both outputs judged (by their kinds) under the source's names, and fp32-close
    assert [o["name"] for o in bundle["metrics"]["outputs"]] == ["out put", "387"]
    assert bundle["metrics"]["max_abs_err"] < 1e-4
    manifest = json.loads((Path(bundle["path"]) / "manifest.json").read_text())
    assert [t["name"] for t in manifest["inputs"]] == ["0"]
    assert [t["name"] for t in manifest["outputs"]] == ["out put", "387"]
    assert manifest["inputs"][0]["runtime_name"] == "io_0"


def test_op_onnx2tf_cannot_convert_is_named_with_what_to_try(tmp_path):
    """DFT (audio front ends): onnx2tf has no converter for it. The error says so, names the
    node as prepare and the source name it, says what to try, and the report keeps the log."""
    model = dft_model(tmp_path / "dft.onnx")
    result = run_edgec(
        "build",
        model,
        "--target",
        "raspberry-pi-4",
        "--target",
        "x86-64-cpu",
        "--format",
        "tflite",
        "--precision",
        "fp32",
        "--json",
        "--out",
        tmp_path / "out",
    )
    assert result.returncode == 3, result.stderr
    bundles = result.json()["bundles"]
    assert len(bundles) == 2
    for bundle in bundles:  # the second target reuses the first one's failure, log included
        assert bundle["status"] == "failed"
        error = bundle["error"]
        assert error.startswith("onnx2tf "), error
        assert "audio_stft_dft_0 (source: audio/stft/dft:0) (op DFT)" in error
        assert "try --format onnx" in error
        assert "cuInit" not in error
        assert "DFT OP is not yet implemented" in bundle["converter_log"]


def _pi_tflite_ok(model: Path, out: Path, precision: str, *args: str | Path) -> dict:
    """The one bundle of a Raspberry Pi 4 TFLite build of ``model``, which must be ok."""
    result = run_edgec(
        "build", model, "--target", "raspberry-pi-4", "--format", "tflite", "--precision", precision,
        *args, "--json", "--out", out,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    (bundle,) = result.json()["bundles"]
    assert bundle["status"] == "ok", bundle.get("error")
    return bundle


def test_a_yolov8_head_with_a_constant_node_of_anchors_converts(tmp_path):
    """onnx2tf took the anchor points (a Constant node) as they were beside channels-last box
    distances and failed at the last Concat ("Dimension 0 in both shapes must be equal", as
    on nudenet's YOLOv8n); as an initializer they are transposed with the rest."""
    head = yolov8_head_model(tmp_path / "head.onnx")
    bundle = _pi_tflite_ok(head, tmp_path / "out", "fp32", "--output-kind", "y=detection")
    (figures,) = bundle["metrics"]["outputs"]
    assert figures["cosine"] > 0.9999
    assert figures["max_abs_err"] < 0.01  # boxes in pixels up to 320


def test_int8_of_an_lstm_builds_unrolled(tmp_path):
    """TensorFlow 2.21's int8 calibrator dies with a segmentation fault (the whole build, no
    error) on the LSTM layer onnx2tf makes; unrolled into plain ops it calibrates and passes."""
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "calib.npz", x=rng.standard_normal((8, 1, 8, 12)).astype(np.float32))
    crnn = lstm_model(tmp_path / "crnn.onnx")
    bundle = _pi_tflite_ok(
        crnn, tmp_path / "out", "int8", "--input-shape", "x=1,8,12", "--calibration", tmp_path / "calib.npz"
    )
    assert bundle["precision"] == "int8"
    assert bundle["metrics"]["cosine"] > 0.99


def test_a_bidirectional_lstm_with_its_states_left_out_converts(tmp_path):
    """A CRNN encoder as torch exports it: onnxsim folds its zero initial states away, and
    onnx2tf's bidirectional LSTM then reads ``initial_h[1]`` of None ("'NoneType' object is
    not subscriptable", as on ddddocr's OCR model). The states are given as zeros first."""
    crnn = lstm_model(tmp_path / "crnn.onnx")
    bundle = _pi_tflite_ok(crnn, tmp_path / "out", "fp32", "--input-shape", "x=1,8,12")
    assert bundle["metrics"]["cosine"] > 0.9999
