"""Keras, SavedModel, TFLite and PyTorch sources: imported to ONNX, verified against the source."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import DIGITS, run_edgec

KERAS = DIGITS / "keras"


def _build(model: Path, out: Path, calib: Path, evaluation: Path, *targets: str, precision: str = "int8"):
    args = [a for t in targets for a in ("--target", t)]
    return run_edgec(
        "build",
        model,
        *args,
        "--precision",
        precision,
        "--calibration",
        calib,
        "--eval",
        evaluation,
        "--json",
        "--out",
        out,
    )


def _assert_within_gate(result) -> list[dict]:
    assert result.returncode == 0, result.stderr
    bundles = result.json()["bundles"]
    for b in bundles:
        assert b["status"] == "ok", b["error"]
        m = b["metrics"]
        assert m["source_accuracy"] >= 0.95
        assert (m["source_accuracy"] - m["accuracy"]) * 100 <= 1.0
    return bundles


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_keras_sample_to_onnx_and_tflite(tmp_path, precision):
    result = _build(
        KERAS / "model.keras",
        tmp_path,
        KERAS / "calib.npz",
        KERAS / "eval.npz",
        "x86-64-cpu",
        "raspberry-pi-4",
        precision=precision,
    )
    _, tflite_bundle = _assert_within_gate(result)
    manifest = json.loads((Path(tflite_bundle["path"]) / "manifest.json").read_text())
    assert manifest["source"]["format"] == "keras"
    assert manifest["inputs"][0]["shape"] == [1, 8, 8, 1]
    assert manifest["outputs"][0]["name"] == "logits"
    assert "source's own SavedModel" in " ".join(tflite_bundle["notes"])


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_pytorch_sample_to_onnx_and_tflite(tmp_path, precision):
    result = _build(
        DIGITS / "model.pt2",
        tmp_path,
        DIGITS / "calib.npz",
        DIGITS / "eval.npz",
        "x86-64-cpu",
        "raspberry-pi-4",
        precision=precision,
    )
    onnx_bundle, _ = _assert_within_gate(result)
    manifest = json.loads((Path(onnx_bundle["path"]) / "manifest.json").read_text())
    assert manifest["source"]["format"] == "pytorch"
    assert manifest["inputs"][0]["name"] == "x"


def test_saved_model_and_h5_sources(tmp_path):
    import keras

    model = keras.saving.load_model(str(KERAS / "model.keras"))
    model.export(str(tmp_path / "saved"), format="tf_saved_model")
    model.save(str(tmp_path / "digits.h5"))
    for source in (tmp_path / "saved", tmp_path / "digits.h5"):
        result = _build(
            source,
            tmp_path / f"out-{source.suffix or 'dir'}",
            KERAS / "calib.npz",
            KERAS / "eval.npz",
            "x86-64-cpu",
            precision="fp32",
        )
        (bundle,) = _assert_within_gate(result)
        assert bundle["metrics"]["max_abs_err"] < 1e-3


def test_tflite_source_keeps_nhwc(tmp_path):
    first = run_edgec(
        "build",
        DIGITS / "model.onnx",
        "--target",
        "raspberry-pi-4",
        "--format",
        "tflite",
        "--precision",
        "fp32",
        "--json",
        "--out",
        tmp_path / "first",
    )
    assert first.returncode == 0, first.stderr
    source = tmp_path / "digits.tflite"
    source.write_bytes((Path(first.json()["bundles"][0]["path"]) / "model.tflite").read_bytes())
    result = _build(
        source,
        tmp_path / "out",
        KERAS / "calib.npz",
        KERAS / "eval.npz",
        "x86-64-cpu",
        "raspberry-pi-4",
    )
    bundles = _assert_within_gate(result)
    manifest = json.loads((Path(bundles[1]["path"]) / "manifest.json").read_text())
    assert manifest["source"]["format"] == "tflite"
    assert (manifest["inputs"][0]["shape"], manifest["inputs"][0]["layout"]) == ([1, 8, 8, 1], "NHWC")


def test_bad_sources_exit_2(tmp_path):
    empty = tmp_path / "not-a-saved-model"
    empty.mkdir()
    result = run_edgec("build", empty, "--target", "x86-64-cpu", "--out", tmp_path / "out")
    assert result.returncode == 2
    assert "without saved_model.pb" in result.stderr
    broken = tmp_path / "broken.keras"
    broken.write_bytes(b"not a zip")
    result = run_edgec("build", broken, "--target", "x86-64-cpu", "--out", tmp_path / "out")
    assert result.returncode == 2
    assert "Keras cannot load" in result.stderr
    assert not (tmp_path / "out").exists()


def test_data_for_an_nhwc_source_must_be_nhwc(tmp_path):
    result = _build(
        KERAS / "model.keras",
        tmp_path / "out",
        DIGITS / "calib.npz",
        KERAS / "eval.npz",
        "x86-64-cpu",
    )
    assert result.returncode == 2
    assert "[N, 1, 8, 8, 1] or [N, 8, 8, 1]" in result.stderr
    assert np.load(KERAS / "calib.npz")["x"].shape[1:] == (8, 8, 1)
