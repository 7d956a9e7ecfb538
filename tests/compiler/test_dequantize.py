"""Already-quantized sources (what onnxruntime's ``quantize_dynamic`` and ``quantize_static``
write, as published models ship) are rewritten to the float graph they compute, so they can
be built at fp16, requantized or converted; ops with no rewrite leave the graph as it was."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from compiler.backends._quantize import quantized_ops
from compiler.build import BuildRequest, build
from compiler.dequantize import dequantize
from compiler.runtime import OnnxRuntimeRunner
from edgec.manifest import TargetFormat

quantization = pytest.importorskip("onnxruntime.quantization")


def _float_model(path: Path) -> Path:
    """x [1,3,12,16] -> Conv(+bias) -> Relu -> Transpose/Reshape to [T=16, 1, 36] -> a
    bidirectional LSTM -> Reshape [16, 64] -> MatMul -> + bias -> y [16, 10]."""
    rng = np.random.default_rng(3)

    def weight(name: str, *shape: int, scale: float = 0.3) -> onnx.TensorProto:
        return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name)

    hidden = 32
    initializers = [
        weight("conv_w", 3, 3, 3, 3),
        weight("conv_b", 3, scale=0.1),
        weight("W", 2, 4 * hidden, 36),
        weight("R", 2, 4 * hidden, hidden),
        weight("B", 2, 8 * hidden, scale=0.1),
        weight("fc_w", 2 * hidden, 10),
        weight("fc_b", 10, scale=0.1),
        numpy_helper.from_array(np.array([16, 1, 36], np.int64), "seq_shape"),
        numpy_helper.from_array(np.array([16, 2 * hidden], np.int64), "flat_shape"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "conv_w", "conv_b"], ["c"], pads=[1, 1, 1, 1], name="conv"),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("Transpose", ["r"], ["t"], perm=[3, 0, 1, 2], name="to_steps"),
        helper.make_node("Reshape", ["t", "seq_shape"], ["seq"], name="steps"),
        helper.make_node(
            "LSTM", ["seq", "W", "R", "B"], ["h"], hidden_size=hidden, direction="bidirectional"
        ),
        helper.make_node("Reshape", ["h", "flat_shape"], ["flat"], name="flat"),
        helper.make_node("MatMul", ["flat", "fc_w"], ["logits"], name="fc"),
        helper.make_node("Add", ["logits", "fc_b"], ["y"], name="fc_bias"),
    ]
    graph = helper.make_graph(
        nodes,
        "crnn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 12, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [16, 10])],
        initializer=initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def _inputs(count: int, seed: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.random((1, 3, 12, 16), dtype=np.float32)} for _ in range(count)]


def _outputs(path: Path, feeds: list[dict[str, np.ndarray]]) -> np.ndarray:
    runner = OnnxRuntimeRunner(path)
    return np.stack([runner.run(f)["y"] for f in feeds])


class _Reader:
    """onnxruntime.quantization's calibration reader over ``feeds``."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]) -> None:
        self._feeds = iter(feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._feeds, None)


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a.ravel() @ b.ravel() / np.linalg.norm(a) / np.linalg.norm(b))


@pytest.fixture
def dynamic_source(tmp_path: Path) -> tuple[Path, Path]:
    float_path = _float_model(tmp_path / "float.onnx")
    quantized = tmp_path / "quantized.onnx"
    quantization.quantize_dynamic(str(float_path), str(quantized), weight_type=quantization.QuantType.QUInt8)
    ops = quantized_ops(onnx.load(str(quantized)))
    assert {"ConvInteger", "DynamicQuantizeLSTM", "MatMulInteger"} <= set(ops), ops
    return float_path, quantized


def test_a_dynamically_quantized_graph_becomes_the_float_graph_it_computes(dynamic_source, tmp_path):
    float_path, quantized = dynamic_source
    model = onnx.load(str(quantized))
    rewritten = dequantize(model)
    assert rewritten is not None
    assert {"ConvInteger": 1, "DynamicQuantizeLSTM": 1, "MatMulInteger": 1}.items() <= rewritten.items()
    assert quantized_ops(model) == []
    ops = Counter(n.op_type for n in model.graph.node)
    # the scale products and the int32 bias are folded into the weights: Conv, LSTM, MatMul again
    assert (ops["Conv"], ops["LSTM"], ops["MatMul"]) == (1, 1, 1)
    assert not {"Cast", "Floor", "Div", "DynamicQuantizeLinear"} & set(ops)
    assert all(o.domain != "com.microsoft" for o in model.opset_import)
    onnx.checker.check_model(model)
    rebuilt = tmp_path / "rebuilt.onnx"
    onnx.save(model, str(rebuilt))

    feeds = _inputs(8, seed=1)
    original, source, made = (_outputs(p, feeds) for p in (float_path, quantized, rebuilt))
    # only the weights' 8-bit rounding is left: closer to the original float model than the
    # quantized source is, and still near the quantized source
    assert _cosine(original, made) > 0.999
    assert np.abs(original - made).max() < np.abs(original - source).max()
    assert _cosine(source, made) > 0.99


def test_a_static_qdq_graph_loses_its_quantize_pairs(tmp_path):
    float_path = _float_model(tmp_path / "float.onnx")
    qdq = tmp_path / "qdq.onnx"

    quantization.quantize_static(
        str(float_path),
        str(qdq),
        _Reader(_inputs(8, seed=2)),
        quant_format=quantization.QuantFormat.QDQ,
        op_types_to_quantize=["Conv", "MatMul"],
    )
    model = onnx.load(str(qdq))
    assert "DequantizeLinear" in quantized_ops(model)
    assert dequantize(model) is not None
    assert quantized_ops(model) == []
    rebuilt = tmp_path / "rebuilt.onnx"
    onnx.save(model, str(rebuilt))
    feeds = _inputs(4, seed=3)
    assert _cosine(_outputs(float_path, feeds), _outputs(rebuilt, feeds)) > 0.999


def test_a_quantized_op_with_no_rewrite_leaves_the_graph_as_it_was(tmp_path):
    """QLinearConv (the QOperator format) has no rewrite: nothing changes, the build names it."""
    float_path = _float_model(tmp_path / "float.onnx")
    qop = tmp_path / "qop.onnx"

    quantization.quantize_static(
        str(float_path),
        str(qop),
        _Reader(_inputs(4, seed=4)),
        quant_format=quantization.QuantFormat.QOperator,
        op_types_to_quantize=["Conv"],
    )
    model = onnx.load(str(qop))
    assert "QLinearConv" in quantized_ops(model)
    before = model.SerializeToString()
    assert dequantize(model) is None
    assert model.SerializeToString() == before


@pytest.mark.slow
def test_a_quantized_source_builds_at_fp16_and_int8_and_says_so(dynamic_source, tmp_path):
    _, quantized = dynamic_source
    data = tmp_path / "data.npz"
    np.savez(data, x=np.concatenate([f["x"] for f in _inputs(24, seed=5)]))
    result = build(
        BuildRequest(
            model=quantized,
            targets=["x86-64-cpu"],
            out=tmp_path / "out",
            format=TargetFormat.ONNX,
            precision="auto",
            calibration=data,
            cache=None,
        )
    )
    target = result.bundles[0]
    assert target.error is None, target.error
    assert target.precision.value in ("fp16", "int8")
    note = next(n for n in target.notes if n.startswith("the source is quantized"))
    assert "ConvInteger" in note
    assert "agrees with the source on" in note
