"""CoreML bundles: an mlpackage coremltools loads; verified only where prediction runs."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests.conftest import DIGITS, run_edgec


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    out = tmp_path_factory.mktemp("coreml")
    result = run_edgec(
        "build",
        DIGITS / "model.onnx",
        "--target",
        "apple-silicon-mac",
        "--target",
        "iphone",
        "--calibration",
        DIGITS / "calib.npz",
        "--eval",
        DIGITS / "eval.npz",
        "--precision",
        "int8",
        "--json",
        "--out",
        out,
    )
    assert result.returncode == 0, result.stderr
    return result.json()["bundles"]


def test_mlpackage_loads_with_matching_io(bundles):
    import coremltools as ct

    for bundle in bundles:
        assert bundle["format"] == "coreml"
        package = Path(bundle["path"]) / "model.mlpackage"
        spec = ct.models.MLModel(str(package), skip_model_load=True).get_spec()
        assert [i.name for i in spec.description.input] == ["x"]
        assert list(spec.description.input[0].type.multiArrayType.shape) == [1, 8, 8, 1]
        manifest = json.loads((Path(bundle["path"]) / "manifest.json").read_text())
        assert manifest["inputs"][0]["layout"] == "NHWC"
        assert manifest["outputs"][0]["runtime_name"]
        assert any(f["path"].startswith("model.mlpackage/") for f in manifest["files"])


@pytest.mark.skipif(sys.platform == "darwin", reason="on macOS the bundle is verified numerically")
def test_unverified_off_macos_with_the_reason(bundles):
    for bundle in bundles:
        assert bundle["status"] == "unverified"
        assert "needs macOS" in bundle["reason"]
        assert bundle["metrics"] is None


def test_profiles_choose_the_int8_weight_compression(bundles):
    notes = {b["profile"]: " ".join(b["notes"]) for b in bundles}
    assert "linear" in notes["apple-silicon-mac"]
    assert "palettize" in notes["iphone"]
    mac, iphone = (Path(b["path"]) / "model.mlpackage" for b in bundles)
    source = (DIGITS / "model.onnx").stat().st_size
    for package in (mac, iphone):
        weights = sum(p.stat().st_size for p in package.rglob("*") if p.is_file())
        assert weights < 0.5 * source  # int8 weights, not fp32


@pytest.mark.skipif(sys.platform != "darwin", reason="MLModel.predict runs only on macOS")
def test_verified_on_macos(bundles):
    for bundle in bundles:
        assert bundle["status"] == "ok"
