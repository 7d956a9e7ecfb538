"""A converter's failure is explained by the converter, the node(s), the op(s) and what to try,
never by the start-up noise third parties print (CUDA probes, oneDNN notes, warnings)."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper

from compiler._capture import is_noise, meaningful_lines
from compiler.backends._onnx2tf_log import explain
from compiler.prepare import prepare
from edgec.errors import ConversionError, UnsupportedOperatorError

# onnx2tf 1.28.8's failure block as captured from a real run (a node whose input tensor it had
# lost), inside the noise a build host prints: a machine with CUDA libraries and no GPU
# probes cuInit (E0000 lines) before and after, as on the host where issue 13 was seen.
NOISY_LOG = (Path(__file__).parent / "data" / "onnx2tf_node_failure.log").read_text()
NOISE = ("cuInit", "oneDNN", "absl", "UserWarning", "colored module", "NonMaxSuppression", "Read this")


def _prepared(tmp_path: Path):
    """Nodes as a real export names them: ``block/conv:0`` and ``block/relu:0`` (prepare
    renames them ``block_conv_0`` and ``block_relu_0``), and two DFT nodes."""
    nodes = [
        helper.make_node("Relu", ["x"], ["c"], name="block/conv:0"),
        helper.make_node("Relu", ["c"], ["r"], name="block/relu:0"),
        helper.make_node("Unsqueeze", ["r", "axes"], ["u"], name="u"),
        helper.make_node("DFT", ["u"], ["d1"], name="spec/dft:0", onesided=0),
        helper.make_node("DFT", ["d1"], ["y"], name="spec/dft:1", onesided=0),
    ]
    axes = helper.make_tensor("axes", TensorProto.INT64, [1], [-1])
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 2])],
        initializer=[axes],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(tmp_path / "m.onnx"))
    return prepare(tmp_path / "m.onnx", {}, tmp_path)


def test_noise_lines_are_recognised():
    lines = NOISY_LOG.splitlines()
    assert is_noise(next(line for line in lines if "cuda_platform.cc:52] failed call to cuInit" in line))
    assert is_noise(next(line for line in lines if "oneDNN custom operations" in line))
    assert not is_noise("KeyError: 'tf_node'")
    assert not is_noise("\x1b[31mERROR:\x1b[0m DFT OP is not yet implemented.")
    assert all(not any(word in line for word in NOISE[:5]) for line in meaningful_lines(NOISY_LOG))


@pytest.mark.parametrize("failure", [KeyError("tf_node"), None, SystemExit(1)])
def test_onnx2tf_node_failure_names_node_op_cause_and_what_to_try(tmp_path, failure):
    """The failure raised (or, where onnx2tf exits, the traceback in its log) is the cause."""
    error = explain(failure, NOISY_LOG, _prepared(tmp_path))
    message = str(error)
    assert isinstance(error, UnsupportedOperatorError)
    assert error.nodes == ["block_relu_0"]
    assert message.startswith("onnx2tf ")
    assert "node(s) block_relu_0 (source: block/relu:0) (op Relu)" in message
    assert "KeyError: 'tf_node'" in message
    assert "try " in message
    assert "--format onnx" in message
    assert "static shapes" in message
    assert not any(word in message for word in NOISE[:5])
    assert "\x1b[" not in message
    assert "failed call to cuInit" in error.log  # the whole log is kept, for the report
    assert "\x1b[" not in error.log


def test_missing_op_converter_names_every_node_of_that_op(tmp_path):
    log = (
        NOISY_LOG.split("\x1b[31mERROR:\x1b[0m The trace log")[0]
        + "\x1b[31mERROR:\x1b[0m DFT OP is not yet implemented.\n"
    )
    error = explain(
        ModuleNotFoundError("No module named 'onnx2tf.ops.DFT'", name="onnx2tf.ops.DFT"),
        log,
        _prepared(tmp_path),
    )
    assert isinstance(error, UnsupportedOperatorError)
    assert error.nodes == ["spec_dft_0", "spec_dft_1"]
    assert "spec_dft_0 (source: spec/dft:0), spec_dft_1 (source: spec/dft:1) (op DFT)" in str(error)
    assert "no converter for DFT" in str(error)
    assert "try --format onnx" in str(error)


def test_a_log_of_noise_only_is_never_the_message(tmp_path):
    noise_only = "\n".join(line for line in NOISY_LOG.splitlines() if is_noise(line))
    error = explain(None, noise_only, _prepared(tmp_path))
    assert type(error) is ConversionError
    assert str(error).startswith("onnx2tf ")
    assert "it wrote no SavedModel" in str(error)
    assert not any(word in str(error) for word in NOISE)
