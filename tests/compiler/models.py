"""Small ONNX models built in code, for shapes the digits sample does not cover."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def multi_input_model(path: Path) -> Path:
    """Inputs: ``x`` float [N,4], ``ids`` int64 [N,3], ``scale`` float scalar.

    Outputs: ``scores`` float [N,6] = (x @ W + float(ids) @ V) * scale, and
    ``total`` int64 [N] = sum(ids) (an integer output).
    """
    rng = np.random.default_rng(7)
    # a clear winner per sample (see multi_input_data), so top-1 is not decided by noise
    weights = np.eye(4, 6, dtype=np.float32) * 4 + rng.standard_normal((4, 6)).astype(np.float32) * 0.2
    w = numpy_helper.from_array(weights, "W")
    v = numpy_helper.from_array(rng.standard_normal((3, 6)).astype(np.float32) * 0.05, "V")
    axes = numpy_helper.from_array(np.array([1], dtype=np.int64), "axes")
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["xw"], name="model/dense:0"),
        helper.make_node("Cast", ["ids"], ["idf"], to=TensorProto.FLOAT, name="model/cast"),
        helper.make_node("MatMul", ["idf", "V"], ["iw"], name="model/embed"),
        helper.make_node("Add", ["xw", "iw"], ["s"], name="model/add"),
        helper.make_node("Mul", ["s", "scale"], ["scores"], name=""),
        helper.make_node("ReduceSum", ["ids", "axes"], ["total"], keepdims=0, name="model/sum"),
    ]
    graph = helper.make_graph(
        nodes,
        "multi",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4]),
            helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", 3]),
            helper.make_tensor_value_info("scale", TensorProto.FLOAT, []),
        ],
        [
            helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["N", 6]),
            helper.make_tensor_value_info("total", TensorProto.INT64, ["N"]),
        ],
        initializer=[w, v, axes],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def multi_input_data(path: Path, count: int, seed: int) -> Path:
    """Data in every accepted layout: ``x`` without its batch axis, ``ids`` with it, scalar ``scale``."""
    rng = np.random.default_rng(seed)
    classes = np.eye(4, dtype=np.float32)[rng.integers(0, 4, size=count)]
    np.savez(
        path,
        x=(classes * 3 + rng.standard_normal((count, 4)) * 0.3).astype(np.float32),
        ids=rng.integers(0, 5, size=(count, 1, 3)).astype(np.int64),
        scale=rng.uniform(0.5, 2.0, size=(count,)).astype(np.float32),
    )
    return path


def dynamic_model(path: Path) -> Path:
    """``seq`` float [N, T, 8] with a dynamic time axis T; output ``out`` [N, T, 8]."""
    nodes = [helper.make_node("Relu", ["seq"], ["out"])]
    graph = helper.make_graph(
        nodes,
        "dyn",
        [helper.make_tensor_value_info("seq", TensorProto.FLOAT, ["N", "T", 8])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", "T", 8])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def unsupported_op_model(path: Path) -> Path:
    """``x`` float [N,8] -> MatMul -> Hardmax: onnxruntime runs it, TensorRT's parser does not.

    The node is named with characters converters dislike, to check the name reported is the
    sanitized one the user can find in the prepared graph.
    """
    rng = np.random.default_rng(3)
    w = numpy_helper.from_array(rng.standard_normal((8, 5)).astype(np.float32), "W")
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["z"], name="head/dense"),
        helper.make_node("Hardmax", ["z"], ["onehot"], axis=-1, name="head/hardmax:0"),
    ]
    graph = helper.make_graph(
        nodes,
        "hardmax",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
        [helper.make_tensor_value_info("onehot", TensorProto.FLOAT, ["N", 5])],
        initializer=[w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def rgb_model(path: Path) -> Path:
    """``image`` float [N,3,16,16] -> Conv -> Relu -> GlobalAveragePool -> Flatten: an RGB
    image model, the kind onnx2tf would fetch sample images for unless handed ours."""
    rng = np.random.default_rng(5)
    w = numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32) * 0.3, "W")
    nodes = [
        helper.make_node("Conv", ["image", "W"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("GlobalAveragePool", ["r"], ["g"]),
        helper.make_node("Flatten", ["g"], ["features"]),
    ]
    graph = helper.make_graph(
        nodes,
        "rgb",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, 16, 16])],
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", 8])],
        initializer=[w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path
