"""Bad input gets one clear line, exit code 2, and leaves no bundle folder behind."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.conftest import DIGITS, run_edgec

MODEL = DIGITS / "model.onnx"


def _bad(result, *phrases: str) -> None:
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("edgec: error: ")
    for phrase in phrases:
        assert phrase in lines[0]
    assert result.stdout == ""


def _no_bundles(out: Path) -> None:
    assert not out.exists() or list(out.iterdir()) == []


def _build(out: Path, *args: str | Path):
    return run_edgec("build", *args, "--out", out, "--json")


def test_truncated_onnx(tmp_path):
    broken = tmp_path / "model.onnx"
    broken.write_bytes(MODEL.read_bytes()[:4096])
    out = tmp_path / "out"
    _bad(_build(out, broken, "--target", "x86-64-cpu"), "not a valid ONNX model", "model.onnx")
    _no_bundles(out)


def test_missing_model_and_unknown_suffix(tmp_path):
    out = tmp_path / "out"
    _bad(_build(out, tmp_path / "absent.onnx", "--target", "x86-64-cpu"), "does not exist")
    weights = tmp_path / "weights.bin"
    weights.write_bytes(b"\0" * 16)
    _bad(_build(out, weights, "--target", "x86-64-cpu"), "cannot tell the format", ".onnx")
    _no_bundles(out)


def test_missing_model_is_named_before_missing_calibration(tmp_path):
    """raspberry-pi-4 builds int8 by default, which needs --calibration: a model that is not
    there is the first thing to fix, and the one the message names."""
    out = tmp_path / "out"
    result = _build(out, tmp_path / "absent.onnx", "--target", "raspberry-pi-4")
    _bad(result, "absent.onnx does not exist")
    assert "calibration" not in result.stderr
    _no_bundles(out)


def test_inspect_of_a_path_that_is_not_a_bundle(tmp_path):
    missing = run_edgec("inspect", tmp_path / "nowhere")
    _bad(missing, "nowhere does not exist")
    file = tmp_path / "model.onnx"
    file.write_bytes(b"\0")
    _bad(run_edgec("inspect", file), "model.onnx is a file; a bundle is a folder with manifest.json")
    _bad(run_edgec("inspect", tmp_path), "is not a bundle: it has no manifest.json")


def test_unknown_profile_lists_known_ones(tmp_path):
    out = tmp_path / "out"
    result = _build(out, MODEL, "--target", "x86-64-cpu", "--target", "raspbery-pi-4")
    _bad(result, "unknown profile 'raspbery-pi-4'", "raspberry-pi-4", "jetson-orin-nano")
    _no_bundles(out)


def test_calibration_with_wrong_input_name(tmp_path):
    calib = tmp_path / "calib.npz"
    np.savez(calib, image=np.load(DIGITS / "calib.npz")["x"])
    out = tmp_path / "out"
    result = _build(
        out,
        MODEL,
        "--target",
        "x86-64-cpu",
        "--format",
        "onnx",
        "--precision",
        "int8",
        "--calibration",
        calib,
    )
    _bad(result, "missing 'x'", "unknown 'image'")
    _no_bundles(out)


def test_calibration_with_wrong_shape(tmp_path):
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=np.zeros((10, 1, 28, 28), np.float32))
    out = tmp_path / "out"
    result = _build(
        out,
        MODEL,
        "--target",
        "x86-64-cpu",
        "--format",
        "onnx",
        "--precision",
        "int8",
        "--calibration",
        calib,
    )
    _bad(result, "[10, 1, 28, 28]", "[N, 1, 1, 8, 8] or [N, 1, 8, 8]")
    _no_bundles(out)


def test_eval_labels_of_the_wrong_length(tmp_path):
    data = np.load(DIGITS / "eval.npz")
    bad = tmp_path / "eval.npz"
    np.savez(bad, x=data["x"], y=data["y"][:-1])
    out = tmp_path / "out"
    _bad(_build(out, MODEL, "--target", "x86-64-cpu", "--eval", bad), "labels 'y'")
    _no_bundles(out)


def test_unwritable_out(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    out = blocker / "bundles"
    result = _build(out, MODEL, "--target", "x86-64-cpu")
    _bad(result, "cannot write to output folder", "--out")
    assert blocker.read_text() == "not a folder"


def test_int8_without_calibration_says_so(tmp_path):
    out = tmp_path / "out"
    result = _build(out, MODEL, "--target", "x86-64-cpu", "--format", "onnx", "--precision", "int8")
    _bad(result, "int8", "needs calibration data", "--calibration")
    _no_bundles(out)


def test_format_the_profile_does_not_run(tmp_path):
    out = tmp_path / "out"
    _bad(_build(out, MODEL, "--target", "iphone", "--format", "onnx"), "iphone does not run onnx", "coreml")
    _no_bundles(out)


def test_bad_input_shape_spec(tmp_path):
    out = tmp_path / "out"
    _bad(_build(out, MODEL, "--target", "x86-64-cpu", "--input-shape", "x=1,1,8"), "rank 3")
    _bad(_build(out, MODEL, "--target", "x86-64-cpu", "--input-shape", "x:1,1,8,8"), "NAME=D0,D1")
    _no_bundles(out)


def test_existing_bundle_is_not_overwritten_without_force(tmp_path):
    args = (MODEL, "--target", "x86-64-cpu", "--precision", "fp32")
    assert _build(tmp_path, *args).returncode == 0
    manifest = tmp_path / "model-1.0.0-x86-64-cpu" / "manifest.json"
    before = manifest.read_bytes()
    _bad(_build(tmp_path, *args), "already exists", "--force")
    assert manifest.read_bytes() == before
    assert _build(tmp_path, *args, "--force").returncode == 0
    assert [p.name for p in tmp_path.iterdir()] == ["model-1.0.0-x86-64-cpu"]


@pytest.mark.parametrize("verbose", [False, True])
def test_verbose_adds_the_traceback(tmp_path, verbose):
    flags = ["-v"] if verbose else []
    result = run_edgec(*flags, "build", tmp_path / "absent.onnx", "--target", "x86-64-cpu", "--out", tmp_path)
    assert result.returncode == 2
    assert ("Traceback" in result.stderr) is verbose
