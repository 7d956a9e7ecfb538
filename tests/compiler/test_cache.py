"""The build cache: a repeated build, or a second profile with the same settings, reuses work."""

from __future__ import annotations

import json
from pathlib import Path

from tests.conftest import DIGITS, run_edgec


def _build(out: Path, *args: str | Path):
    return run_edgec(
        "build",
        DIGITS / "model.onnx",
        "--calibration",
        DIGITS / "calib.npz",
        "--eval",
        DIGITS / "eval.npz",
        "--precision",
        "int8",
        "--json",
        "--out",
        out,
        "--force",
        *args,
    )


def test_repeated_build_is_served_from_the_cache(tmp_path):
    first = _build(tmp_path / "a", "--target", "raspberry-pi-4")
    assert first.returncode == 0, first.stderr
    second = _build(tmp_path / "b", "--target", "raspberry-pi-4")
    assert second.returncode == 0, second.stderr
    a, b = first.json()["bundles"][0], second.json()["bundles"][0]
    assert a["cached"] is False
    assert b["cached"] is True
    assert a["metrics"] == b["metrics"]
    assert a["size_bytes"] == b["size_bytes"]
    model_a = (Path(a["path"]) / "model.tflite").read_bytes()
    assert model_a == (Path(b["path"]) / "model.tflite").read_bytes()
    manifest = json.loads((Path(b["path"]) / "manifest.json").read_text())
    assert manifest["verification"]["status"] == "ok"


def test_second_profile_with_the_same_settings_reuses_the_artifact(tmp_path):
    result = _build(tmp_path, "--target", "raspberry-pi-4", "--target", "raspberry-pi-5")
    assert result.returncode == 0, result.stderr
    pi4, pi5 = result.json()["bundles"]
    assert pi4["cached"] is False
    assert pi5["cached"] is True
    assert pi5["status"] == "ok"
    assert pi5["gate"]["max_artifact_bytes"] != pi4["gate"]["max_artifact_bytes"]  # gates are its own


def test_no_cache_converts_again(tmp_path):
    assert _build(tmp_path / "a", "--target", "x86-64-cpu").returncode == 0
    again = _build(tmp_path / "b", "--target", "x86-64-cpu", "--no-cache")
    assert again.returncode == 0, again.stderr
    assert again.json()["bundles"][0]["cached"] is False


def test_a_corrupt_cache_entry_is_rebuilt_not_trusted(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("EDGEC_CACHE_DIR", str(cache))
    assert _build(tmp_path / "a", "--target", "x86-64-cpu").returncode == 0
    (entry,) = [p for p in cache.iterdir() if not p.name.startswith(".")]
    (entry / "record.json").write_text("{ truncated")
    again = _build(tmp_path / "b", "--target", "x86-64-cpu")
    assert again.returncode == 0, again.stderr
    assert again.json()["bundles"][0]["cached"] is False
    assert again.json()["bundles"][0]["status"] == "ok"
