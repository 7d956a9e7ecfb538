"""Real bundles of the digits sample, built once per session with the real command line.

- ``digits_bundles``: {"x86-64-cpu": onnx fp32 bundle, "raspberry-pi-4": tflite int8 bundle
  with float I/O}, version 1.0.0;
- ``digits_int8_io_bundle``: a tflite int8 bundle whose tensors are int8 (quantized I/O),
  for a profile like the Raspberry Pi 4's that asks for it;
- ``digits_doubled_bundle``: version 2.0.0 for x86-64-cpu, the same network with its logits
  doubled, so an answer shows which model gave it.

The first three come out of one build call (they share the graph preparation and the TFLite
conversion). Treat the bundles as read-only: copy one (``copy_bundle``) before damaging it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import onnx
import pytest

from localfleet import releases
from tests.conftest import DIGITS, ROOT, run_edgec

INT8_IO_PROFILE = "raspberry-pi-4-int8-io"


def build_digits(
    model: Path, version: str, out: Path, targets: list[str | Path], cache: Path
) -> dict[str, Path]:
    """``edgec build`` of a digits model; returns {profile id: bundle folder}."""
    target_args: list[str | Path] = []
    for target in targets:
        target_args += ["--target", target]
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("EDGEC_CACHE_DIR", str(cache))  # never the user's cache
        result = run_edgec(
            "build", model, "--name", "digits", "--version", version, *target_args,
            "--calibration", DIGITS / "calib.npz", "--eval", DIGITS / "eval.npz",
            "--out", out, "--no-cache", "--json",
        )  # fmt: skip
    assert result.returncode == 0, result.stderr
    bundles = result.json()["bundles"]
    return {b["profile"]: Path(b["path"]) for b in bundles}


def doubled_logits(source: Path, dest: Path) -> Path:
    """The digits network with one more node: its logits times two."""
    model = releases.doubled_logits(onnx.load(str(source)))
    onnx.checker.check_model(model)
    onnx.save(model, str(dest))
    return dest


def copy_bundle(bundle: Path, dest: Path) -> Path:
    """A private copy of a session bundle, safe to damage."""
    return Path(shutil.copytree(bundle, dest / bundle.name))


@pytest.fixture(scope="session")
def _digits_builds(tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("digits-bundles")
    pi4 = (ROOT / "device_profiles" / "data" / "raspberry-pi-4.toml").read_text(encoding="utf-8")
    profile = out / f"{INT8_IO_PROFILE}.toml"
    profile.write_text(
        pi4.replace('id = "raspberry-pi-4"', f'id = "{INT8_IO_PROFILE}"\ntflite_int8_io = true', 1),
        encoding="utf-8",
    )
    return build_digits(
        DIGITS / "model.onnx",
        "1.0.0",
        out / "bundles",
        ["x86-64-cpu", "raspberry-pi-4", profile],
        tmp_path_factory.mktemp("edgec-cache"),
    )


@pytest.fixture(scope="session")
def digits_bundles(_digits_builds) -> dict[str, Path]:
    """{"x86-64-cpu": onnx fp32, "raspberry-pi-4": tflite int8 (float I/O)}, digits 1.0.0."""
    return {profile: _digits_builds[profile] for profile in ("x86-64-cpu", "raspberry-pi-4")}


@pytest.fixture(scope="session")
def digits_int8_io_bundle(_digits_builds) -> Path:
    """A tflite int8 bundle that takes and gives int8 tensors (scale and zero point in the manifest)."""
    bundle = _digits_builds[INT8_IO_PROFILE]
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["inputs"][0]["dtype"] == "int8", "the int8-I/O profile no longer gives int8 tensors"
    return bundle


@pytest.fixture(scope="session")
def digits_doubled_bundle(tmp_path_factory) -> Path:
    """digits 2.0.0 for x86-64-cpu: the same network, logits doubled."""
    out = tmp_path_factory.mktemp("digits-doubled")
    model = doubled_logits(DIGITS / "model.onnx", out / "model.onnx")
    return build_digits(model, "2.0.0", out / "bundles", ["x86-64-cpu"], out / "cache")["x86-64-cpu"]
