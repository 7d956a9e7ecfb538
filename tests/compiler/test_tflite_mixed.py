"""TFLite int8 that keeps the harmful nodes in float: the mixed-precision search reaches TFLite.

The model reproduces what the deep-sort re-identification network (a real MobileNetV2 with
folded BatchNorm) does to TFLite int8: a 1x1 convolution has a channel with weights of
+1000 and -1000 on two nearly equal input channels, which cancel, and a ReLU6 keeps its
output in [0, 6]; the int8 rounding of its input does not cancel, so that channel is noise.
No int8 configuration TFLite has (per-tensor weights, int16 activations) repairs it. The
search ranks the tensors on an ONNX Q/DQ stand-in, finds the convolution's TFLite op by
value (the converter fused it with its ReLU6 and named it after TensorFlow's functions) and
keeps it, and the projection that feeds it, in float; the rest of the model stays int8.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from ai_edge_litert.interpreter import Interpreter

from compiler.backends import CompileOptions, Int8Config, get_backend
from compiler.prepare import prepare
from compiler.runtime import OnnxRuntimeRunner
from compiler.tensors import SampleSet
from device_profiles import load_profile
from edgec.manifest import Precision, TargetFormat
from tests.conftest import run_edgec

from .models import cancelling_model

# TensorFlow's int8 calibrator and quantization debugger run models in its deprecated tf.lite
# interpreter (the CLI never shows the warning: converters run with their output captured)
pytestmark = pytest.mark.filterwarnings("ignore:.*tf.lite.Interpreter is deprecated:UserWarning")
CHANNELS = 8
FLOAT_NODES = {"project", "expand", "relu6", "head"}  # the ill-conditioned conv, what feeds and reads it
INT8_NODES = {"stem", "stem_relu", "tail"}


def _model(path: Path) -> Path:
    return cancelling_model(path, stem_and_tail=True)


def _data(path: Path, count: int, seed: int) -> Path:
    samples = np.random.default_rng(seed).normal(0, 1, (count, 1, 4, 8, 8)).astype(np.float32)
    np.savez(path, x=samples)
    return path


def _op_types(model: Path) -> list[tuple[str, str]]:
    """(op, the dtype it computes in) for every op of a TFLite model, read by LiteRT."""
    interpreter = Interpreter(model_path=str(model))
    details = interpreter.get_tensor_details()
    return [
        (op["op_name"], np.dtype(details[op["outputs"][0]]["dtype"]).name)
        for op in interpreter._get_ops_details()
    ]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tflite-mixed")
    result = run_edgec(
        "build",
        _model(folder / "model.onnx"),
        "--target",
        "raspberry-pi-4",
        "--format",
        "tflite",
        "--precision",
        "int8",
        "--calibration",
        _data(folder / "calib.npz", 64, 1),
        "--eval",
        _data(folder / "eval.npz", 32, 2),
        "--json",
        "--out",
        folder / "out",
    )
    assert result.returncode == 0, result.stderr
    (bundle,) = result.json()["bundles"]
    return bundle


def test_no_plain_tflite_int8_configuration_meets_the_gate(built):
    plain = [step for step in built["search"] if not step["float_nodes"]]
    assert [step["configuration"] for step in plain] == [
        "int8 (per-channel, minmax, asymmetric)",
        "int8 (per-tensor, minmax, asymmetric)",
        "int8 (per-channel, minmax, asymmetric, int16 activations)",
    ]
    assert all(not step["passed"] for step in plain)
    assert all(step["metrics"]["cosine"] < 0.98 for step in plain)


def test_mixed_search_passes_with_the_cancelling_conv_in_float(built):
    assert built["status"] == "ok", built["error"]
    (chosen,) = [step for step in built["search"] if step["chosen"]]
    assert chosen["passed"]
    assert chosen["metrics"]["cosine"] >= 0.98
    assert "expand" in chosen["float_nodes"]
    assert set(chosen["float_nodes"]) <= FLOAT_NODES  # the rest of the model was never asked to stay float
    kept = [note for note in built["notes"] if note.startswith("kept in float")]
    assert len(kept) == 1
    assert "expand" in kept[0]
    assert "found by value" in kept[0]


def test_the_chosen_bundle_is_int8_with_some_ops_in_float(built):
    bundle = Path(built["path"])
    manifest = json.loads((bundle / "manifest.json").read_text())
    ops = _op_types(bundle / manifest["model_file"])
    convs = [dtype for op, dtype in ops if op == "CONV_2D"]
    assert len(convs) == 5  # stem, project, expand (with its ReLU6), head (with its ReLU), tail
    assert "int8" in convs  # the stem and the tail: still an int8 model
    assert "float32" in convs  # the cancelling conv
    assert ("QUANTIZE", "int8") in ops


@pytest.fixture(scope="module")
def prepared_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tflite-mixed-compile")
    prepared = prepare(_model(folder / "model.onnx"), {}, folder)
    samples = np.random.default_rng(1).normal(0, 1, (16, 1, 4, 8, 8)).astype(np.float32)
    return prepared, SampleSet("calibration", {"x": samples})


def test_a_node_the_tflite_graph_lacks_is_noted_not_fatal(prepared_model, tmp_path):
    prepared, calibration = prepared_model
    backend = get_backend(TargetFormat.TFLITE)
    config = Int8Config(float_nodes=("expand", "no_such_node"))
    options = CompileOptions(precision=Precision.INT8, calibration=calibration, int8=config)
    artifact = backend.compile(prepared, load_profile("raspberry-pi-4"), options, tmp_path)
    kept = next(note for note in artifact.notes if note.startswith("kept in float"))
    assert "1 of 2 chosen ONNX node(s), 1 of them fused into the op after them" in kept
    assert "CONV_2D" in kept
    missing = next(note for note in artifact.notes if note.startswith("not kept in float"))
    assert missing.endswith("left int8: no_such_node")
    ops = _op_types(artifact.path)
    assert ops.count(("CONV_2D", "float32")) == 1  # only the conv that computes "expand"
    assert artifact.qdq_graph is None  # the ranking stand-in is made for the default configuration only


def test_the_default_configuration_brings_its_ranking_stand_in(prepared_model, tmp_path):
    prepared, calibration = prepared_model
    backend = get_backend(TargetFormat.TFLITE)
    options = CompileOptions(precision=Precision.INT8, calibration=calibration)
    artifact = backend.compile(prepared, load_profile("raspberry-pi-4"), options, tmp_path)
    assert artifact.qdq_graph is not None
    ops = {node.op_type for node in onnx.load(str(artifact.qdq_graph)).graph.node}
    assert "QuantizeLinear" in ops
    assert all(dtype != "float32" for op, dtype in _op_types(artifact.path) if op == "CONV_2D")


def test_int8_inputs_and_outputs_with_ops_in_float(prepared_model, tmp_path):
    """A profile that asks for int8 I/O gets it from the selective quantizer too, and the
    bundle still computes the model."""
    prepared, calibration = prepared_model
    backend = get_backend(TargetFormat.TFLITE)
    profile = load_profile("raspberry-pi-4").model_copy(update={"tflite_int8_io": True})
    config = Int8Config(float_nodes=("project", "expand", "relu6", "head"))
    options = CompileOptions(precision=Precision.INT8, calibration=calibration, int8=config)
    artifact = backend.compile(prepared, profile, options, tmp_path)
    assert [t.dtype for t in artifact.inputs] == ["int8"]
    assert [t.dtype for t in artifact.outputs] == ["int8"]
    assert ("CONV_2D", "float32") in _op_types(artifact.path)
    reference = OnnxRuntimeRunner(prepared.path, {})
    runner = backend.open(artifact)
    got = np.concatenate([runner.run(feed)["out"].ravel() for feed in calibration])
    want = np.concatenate([reference.run(feed)["out"].ravel() for feed in calibration])
    assert float(got @ want / np.linalg.norm(got) / np.linalg.norm(want)) > 0.99
