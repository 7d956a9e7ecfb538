"""Control flow decided by static shapes is inlined in the prepared graph (silero-vad's
decoder checks its state's batch size); control flow decided by data stays."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from compiler.freeze import fold_shape_decided_ifs


def _branch(name: str, factor: float) -> onnx.GraphProto:
    scale = numpy_helper.from_array(np.array(factor, np.float32), f"{name}_factor")
    return helper.make_graph(
        [helper.make_node("Mul", ["x", f"{name}_factor"], [f"{name}_y"])],
        name,
        [],
        [helper.make_tensor_value_info(f"{name}_y", TensorProto.FLOAT, [1, 6])],
        [scale],
    )


def _if_model(condition_nodes: list[onnx.NodeProto]) -> onnx.ModelProto:
    """y = x * 2 if ``cond`` else x * 3, ``cond`` computed by ``condition_nodes`` from x."""
    constants = [
        numpy_helper.from_array(np.array([0], np.int64), "zero"),
        numpy_helper.from_array(np.array([1], np.int64), "one"),
        numpy_helper.from_array(np.array([2], np.int64), "two"),
    ]
    nodes = [
        *condition_nodes,
        helper.make_node("Squeeze", ["cond_1d"], ["cond"]),
        helper.make_node(
            "If", ["cond"], ["y"], then_branch=_branch("then", 2.0), else_branch=_branch("else", 3.0)
        ),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 6])],
        constants,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def test_an_if_decided_by_a_static_shape_is_inlined():
    """cond = (shape(x)[0] == 1): with x's shape fixed, always true."""
    model = _if_model(
        [
            helper.make_node("Shape", ["x"], ["shape"]),
            helper.make_node("Gather", ["shape", "zero"], ["batch"], axis=0),
            helper.make_node("Equal", ["batch", "one"], ["cond_1d"]),
        ]
    )
    x = np.arange(6, dtype=np.float32).reshape(1, 6)
    before = _run(model, x)
    assert fold_shape_decided_ifs(model) > 0
    assert {n.op_type for n in model.graph.node} == {"Mul"}
    np.testing.assert_array_equal(_run(model, x), before)
    np.testing.assert_array_equal(before, x * 2)


def test_an_if_decided_by_data_stays():
    """cond = (count of non-zero values of x > 2): Shape of NonZero depends on the values, so
    the probes see it change and nothing is folded."""
    model = _if_model(
        [
            helper.make_node("NonZero", ["x"], ["where"]),
            helper.make_node("Shape", ["where"], ["shape"]),
            helper.make_node("Gather", ["shape", "one"], ["count"], axis=0),
            helper.make_node("Greater", ["count", "two"], ["cond_1d"]),
        ]
    )
    before = model.SerializeToString()
    assert fold_shape_decided_ifs(model) == 0
    assert model.SerializeToString() == before
    assert _run(model, np.zeros((1, 6), np.float32)).tolist() == [[0.0] * 6]
    few = np.array([[1, 0, 0, 0, 0, 1]], np.float32)
    np.testing.assert_array_equal(_run(model, few), few * 3)
