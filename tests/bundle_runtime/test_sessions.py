"""The one onnxruntime session factory, the runtimes behind one interface, and the package's reach."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnxruntime as ort
import pytest

from bundle_runtime import (
    ArtifactLoadError,
    ArtifactRunner,
    OrtSession,
    UnsupportedFormatError,
    open_artifact,
    session_options,
)
from edgec.manifest import TargetFormat, TensorSpec
from tests.conftest import DIGITS, ROOT

X = TensorSpec(name="x", shape=[1, 1, 8, 8], dtype="float32")
LOGITS = TensorSpec(name="logits", shape=[1, 10], dtype="float32")


def test_session_options_carry_the_manifest_runtime_config():
    options = session_options({"session.x64quantprecision": "1"}, threads=3)
    assert options.get_session_config_entry("session.x64quantprecision") == "1"
    assert options.intra_op_num_threads == 3
    assert options.inter_op_num_threads == 1
    assert options.execution_mode == ort.ExecutionMode.ORT_SEQUENTIAL


def test_session_options_refuse_zero_threads():
    with pytest.raises(ValueError, match="threads must be >= 1"):
        session_options({}, threads=0)


def test_an_onnx_artifact_answers_as_onnxruntime_does():
    runner = open_artifact(DIGITS / "model.onnx", TargetFormat.ONNX, [X], [LOGITS])
    assert isinstance(runner, ArtifactRunner)
    x = np.random.default_rng(0).standard_normal((1, 1, 8, 8)).astype(np.float32)
    plain = ort.InferenceSession(str(DIGITS / "model.onnx"), providers=["CPUExecutionProvider"])
    np.testing.assert_array_equal(runner.run({"x": x})["logits"], plain.run(None, {"x": x})[0])


def test_specs_that_name_other_tensors_are_refused():
    other = X.model_copy(update={"runtime_name": "serving_x"})
    with pytest.raises(ArtifactLoadError, match=r"model\.onnx's inputs \['x'\] do not match .*'serving_x'"):
        open_artifact(DIGITS / "model.onnx", TargetFormat.ONNX, [other], [LOGITS])


@pytest.mark.parametrize("fmt", [TargetFormat.ONNX, TargetFormat.TFLITE])
def test_a_file_the_runtime_cannot_read_is_an_artifact_load_error(tmp_path, fmt):
    path = tmp_path / f"model.{fmt.value}"
    path.write_bytes(b"not a model at all" * 100)
    with pytest.raises(ArtifactLoadError, match=f"cannot load {path.name}: "):
        open_artifact(path, fmt, [X], [LOGITS])


@pytest.mark.parametrize("fmt", [TargetFormat.COREML, TargetFormat.TENSORRT])
def test_formats_without_a_runtime_here_are_unsupported(tmp_path, fmt):
    with pytest.raises(UnsupportedFormatError, match=f"{fmt.value} artifacts have no runtime here"):
        open_artifact(tmp_path / "model", fmt, [X], [LOGITS])


def test_ort_session_keys_outputs_by_the_model_names():
    session = OrtSession(DIGITS / "model.onnx", {})
    assert session.input_names == ["x"]
    assert list(session.run({"x": np.zeros((1, 1, 8, 8), np.float32)})) == ["logits"]


def test_importing_the_bundle_runtime_loads_no_framework_and_no_side():
    """What a device imports to serve: no TensorFlow, torch, onnx, compiler or agent (lint-imports
    checks the source; this checks what actually loads, runtimes included)."""
    code = (
        "import sys, bundle_runtime; "
        "print(' '.join(sorted(m for m in sys.modules if m.split('.')[0] in "
        "{'tensorflow', 'torch', 'onnx', 'onnx2tf', 'coremltools', 'compiler', 'agent', 'ota_server',"
        " 'onnxruntime', 'ai_edge_litert'})))"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    ).stdout.split()
    assert loaded == []  # the runtimes themselves load only when an artifact is opened
