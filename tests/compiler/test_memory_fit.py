"""Memory fit at build time: the peak memory each artifact takes in its runtime is measured,
recorded in the manifest and the report, and held against the profile's model budget."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from bundle_runtime.peak import MemoryNotMeasuredError, measure_peak
from device_profiles import load_profile_file
from edgec.errors import ProfileError
from edgec.manifest import TargetFormat, parse_manifest, read_manifest
from tests.conftest import DIGITS, run_edgec

PROFILES = Path(__file__).resolve().parents[2] / "device_profiles" / "data"


def _profile(tmp_path: Path, budget: int) -> Path:
    """The x86-64 profile as ``tiny-memory``, with ``budget`` bytes for one model."""
    lines = (PROFILES / "x86-64-cpu.toml").read_text().splitlines()
    assert any(line.startswith("model_memory_budget_bytes = ") for line in lines)
    edited = [
        f"model_memory_budget_bytes = {budget}"
        if line.startswith("model_memory_budget_bytes = ")
        else 'id = "tiny-memory"'
        if line.startswith("id = ")
        else line
        for line in lines
    ]
    path = tmp_path / "tiny-memory.toml"
    path.write_text("\n".join(edited) + "\n")
    return path


def _build(out: Path, target: str | Path, *extra: str):
    return run_edgec(
        "build", DIGITS / "model.onnx", "--target", target, "--format", "onnx", "--precision", "fp32",
        "--eval", DIGITS / "eval.npz", "--json", "--no-cache", "--out", out, *extra,
    )  # fmt: skip


def test_manifest_and_report_carry_the_measured_peak(tmp_path):
    result = _build(tmp_path / "out", "x86-64-cpu")
    assert result.returncode == 0, result.stderr
    (bundle,) = result.json()["bundles"]
    manifest = read_manifest(Path(bundle["path"]))
    peak = manifest.memory
    assert peak is not None
    # loading the model holds at least its weights: the figure is the runtime's, not a guess
    assert peak.peak_bytes >= (DIGITS / "model.onnx").stat().st_size
    assert peak.peak_bytes < 1 << 30
    assert peak.baseline_bytes > peak.peak_bytes  # the runtime itself is not counted in
    assert peak.method == ("VmHWM" if sys.platform == "linux" else "ru_maxrss")
    assert peak.batch == 1
    assert bundle["memory"] == peak.model_dump()
    report = json.loads((Path(bundle["path"]) / "report.json").read_text())
    assert report["memory"] == peak.model_dump()
    assert bundle["gate"]["model_memory_budget_bytes"] == 4 * 2**30


def test_a_peak_over_the_profile_budget_fails_the_target_with_the_figures(tmp_path):
    out = tmp_path / "out"
    result = _build(out, _profile(tmp_path, 1_048_576))
    assert result.returncode == 3, result.stderr
    (target,) = result.json()["bundles"]
    assert target["status"] == "failed"
    peak = target["memory"]["peak_bytes"]
    assert peak > 1_048_576
    error = target["error"]
    assert error.startswith("tiny-memory onnx fp32: peak memory ")
    assert "over the profile's model budget of 1.0 MiB" in error
    assert f"({peak} > 1048576 bytes)" in error
    assert "model_memory_budget_bytes" in error  # how to fix it
    assert "\n" not in error
    assert any(f.startswith("peak memory ") for f in target["gate_failures"])
    assert list(out.iterdir()) == []  # no bundle, not even a half-written one

    table = run_edgec(
        "build", DIGITS / "model.onnx", "--target", _profile(tmp_path, 1_048_576), "--format", "onnx",
        "--precision", "fp32", "--eval", DIGITS / "eval.npz", "--no-cache", "--out", out,
    )  # fmt: skip
    assert table.returncode == 3
    assert "tiny-memory onnx fp32: measuring peak memory" in table.stderr  # the build's progress
    assert "peak mem" in table.stdout
    assert "over the profile's model budget of 1.0 MiB" in table.stdout


def test_ignore_gates_writes_the_bundle_and_records_the_miss(tmp_path):
    result = _build(tmp_path / "out", _profile(tmp_path, 1_048_576), "--ignore-gates")
    assert result.returncode == 0, result.stderr
    (target,) = result.json()["bundles"]
    manifest = read_manifest(Path(target["path"]))
    assert manifest.memory is not None
    assert manifest.memory.peak_bytes > 1_048_576
    assert any(f.startswith("peak memory ") for f in manifest.verification.gate_failures)


def test_a_budget_within_the_peak_passes(tmp_path):
    result = _build(tmp_path / "out", _profile(tmp_path, 1 << 30))
    assert result.returncode == 0, result.stderr
    assert result.json()["bundles"][0]["status"] == "ok"


def test_formats_with_no_runtime_here_are_not_measured():
    with pytest.raises(MemoryNotMeasuredError, match="not measured here: coreml"):
        measure_peak(DIGITS / "model.onnx", TargetFormat.COREML, [], [], {})


def test_a_child_that_fails_gives_a_reason_never_a_figure(tmp_path):
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not a model")
    with pytest.raises(MemoryNotMeasuredError, match=r"^not measured: "):
        measure_peak(broken, TargetFormat.ONNX, [], [], {})


def test_manifests_without_a_peak_still_read(tmp_path):
    result = _build(tmp_path / "out", "x86-64-cpu")
    assert result.returncode == 0, result.stderr
    path = Path(result.json()["bundles"][0]["path"]) / "manifest.json"
    raw = json.loads(path.read_text())
    del raw["memory"]  # as an older compiler wrote it
    assert parse_manifest(json.dumps(raw)).memory is None


def test_a_budget_over_the_device_memory_is_refused(tmp_path):
    path = _profile(tmp_path, 64 * 2**30)
    with pytest.raises(ProfileError, match="model_memory_budget_bytes is more than ram_bytes"):
        load_profile_file(path)
