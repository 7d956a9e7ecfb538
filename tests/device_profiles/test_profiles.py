import re
from pathlib import Path

import pytest

from device_profiles import bundled_profile_ids, load_profile
from edgec.errors import ProfileError
from edgec.manifest import Precision, TargetFormat

REQUIRED = {
    "raspberry-pi-4",
    "raspberry-pi-5",
    "jetson-orin-nano",
    "jetson-agx-orin",
    "apple-silicon-mac",
    "iphone",
    "android-arm64",
    "x86-64-cpu",
}
DEFAULT_FORMATS = {
    "raspberry-pi-4": TargetFormat.TFLITE,
    "raspberry-pi-5": TargetFormat.TFLITE,
    "android-arm64": TargetFormat.TFLITE,
    "jetson-orin-nano": TargetFormat.TENSORRT,
    "jetson-agx-orin": TargetFormat.TENSORRT,
    "apple-silicon-mac": TargetFormat.COREML,
    "iphone": TargetFormat.COREML,
    "x86-64-cpu": TargetFormat.ONNX,
}

X86 = Path(__file__).resolve().parents[2] / "device_profiles" / "data" / "x86-64-cpu.toml"


def test_every_required_profile_is_bundled():
    assert set(bundled_profile_ids()) >= REQUIRED


@pytest.mark.parametrize("profile_id", sorted(REQUIRED))
def test_bundled_profile_is_complete(profile_id):
    profile = load_profile(profile_id)
    assert profile.id == profile_id
    assert profile.default_format is DEFAULT_FORMATS[profile_id]
    assert profile.default_precision in profile.precisions
    assert set(profile.precisions) <= set(profile.gates)
    assert profile.max_latency_ms > 0
    assert profile.max_artifact_bytes > 0


def test_unknown_profile_lists_the_known_ones():
    with pytest.raises(ProfileError) as err:
        load_profile("raspberry-pi-9")
    message = str(err.value)
    assert "raspberry-pi-9" in message
    for known in REQUIRED:
        assert known in message


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "mine.toml"
    path.write_text(text)
    return path


def test_user_profile_file_is_accepted(tmp_path):
    text = X86.read_text().replace('id = "x86-64-cpu"', 'id = "my-box"')
    profile = load_profile(_write(tmp_path, text))
    assert profile.id == "my-box"
    assert profile.sha256() != load_profile("x86-64-cpu").sha256()


def test_unknown_key_is_rejected(tmp_path):
    text = X86.read_text() + "\nmax_latency = 5\n"
    with pytest.raises(ProfileError, match="max_latency"):
        load_profile(_write(tmp_path, text))


def test_default_precision_must_be_allowed(tmp_path):
    text = re.sub(r"(?m)^precisions = .*$", 'precisions = ["fp32"]', X86.read_text())
    text = text.replace('default_precision = "fp32"', 'default_precision = "int8"')
    with pytest.raises(ProfileError, match="default_precision"):
        load_profile(_write(tmp_path, text))


def test_bad_toml_names_the_file(tmp_path):
    with pytest.raises(ProfileError, match="not valid TOML"):
        load_profile(_write(tmp_path, "id = \n"))


def test_missing_profile_file(tmp_path):
    with pytest.raises(ProfileError, match="does not exist"):
        load_profile(tmp_path / "nope.toml")


def test_gates_are_keyed_by_precision():
    gates = load_profile("raspberry-pi-4").gates
    assert gates[Precision.INT8].max_accuracy_drop_points == 1.0
    assert gates[Precision.FP16].min_top1_agreement >= 0.995


def test_cli_profiles_list_and_show(edgec_cli):
    listed = edgec_cli("profiles", "list")
    assert listed.returncode == 0
    for known in REQUIRED:
        assert known in listed.stdout
    shown = edgec_cli("profiles", "show", "jetson-orin-nano", "--json")
    assert shown.returncode == 0
    assert shown.json()["formats"][0] == "tensorrt"
    table = edgec_cli("profiles", "show", str(X86))
    assert table.returncode == 0
    int8 = next(line for line in table.stdout.splitlines() if line.strip().startswith("int8"))
    assert "anchors>= 0.9" in int8  # the detection table of the file
    assert "top1>= 0.97" in int8  # classification from the defaults


def test_cli_unknown_profile_exit_2(edgec_cli):
    result = edgec_cli("profiles", "show", "nope")
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert "known profiles" in result.stderr
