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


def minus_one_dims_model(path: Path) -> Path:
    """``seq`` float [-1, -1, 8] -> MatMul -> Relu -> ``out`` [-1, -1, 4]: dynamic axes written
    as ``dim_value: -1``, as paddle2onnx and some older exporters do (onnxruntime runs it)."""
    rng = np.random.default_rng(11)
    w = numpy_helper.from_array(rng.standard_normal((8, 4)).astype(np.float32), "W")
    nodes = [
        helper.make_node("MatMul", ["seq", "W"], ["h"], name="fc"),
        helper.make_node("Relu", ["h"], ["out"], name="act"),
    ]
    graph = helper.make_graph(
        nodes,
        "paddle_style",
        [helper.make_tensor_value_info("seq", TensorProto.FLOAT, [-1, -1, 8])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [-1, -1, 4])],
        initializer=[w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


LONG_NAME = "backbone/" + "stage/" * 60 + "conv:0"


def awkward_names_model(path: Path) -> Path:
    """An RGB conv net whose names trip converters, as real exports' do: tensors ``a:0`` and
    ``a__0`` (one name once onnx2tf rewrites ``:``), ``/stem/conv`` and ``wa/stem/conv`` (one
    once it rewrites a leading ``/``), ``387`` (a leading digit), a 370-character name, a
    non-ASCII one; an input named ``0`` (onnx2tf serves it as ``arg_0``) and an output named
    ``out put`` (not a valid TensorFlow scope). ``image`` [N,3,16,16] -> ``0`` ... ->
    ``out put`` [N,4] and ``387`` [N,4]."""
    rng = np.random.default_rng(13)

    def weight(name: str, *shape: int) -> onnx.TensorProto:
        return numpy_helper.from_array((rng.standard_normal(shape) * 0.3).astype(np.float32), name)

    nodes = [
        helper.make_node("Conv", ["0", "w:0"], ["a:0"], pads=[1, 1, 1, 1], name="stem/conv:0"),
        helper.make_node("Relu", ["a:0"], ["a__0"], name="stem/relu"),
        helper.make_node("Conv", ["a__0", "w2"], ["/stem/conv"], pads=[1, 1, 1, 1], name="/stem/conv"),
        helper.make_node("Sigmoid", ["/stem/conv"], ["wa/stem/conv"], name="wa/stem/conv"),
        helper.make_node("Add", ["/stem/conv", "wa/stem/conv"], [LONG_NAME], name=LONG_NAME),
        helper.make_node("GlobalAveragePool", [LONG_NAME], ["pooled ä"], name="pool ä"),
        helper.make_node("Flatten", ["pooled ä"], ["feat"], name="1flatten"),
        helper.make_node("Gemm", ["feat", "head/w"], ["out put"], name=""),
        helper.make_node("Gemm", ["feat", "head/w2"], ["387"], name=""),
    ]
    graph = helper.make_graph(
        nodes,
        "awkward",
        [helper.make_tensor_value_info("0", TensorProto.FLOAT, ["N", 3, 16, 16])],
        [
            helper.make_tensor_value_info("out put", TensorProto.FLOAT, ["N", 4]),
            helper.make_tensor_value_info("387", TensorProto.FLOAT, ["N", 4]),
        ],
        initializer=[
            weight("w:0", 6, 3, 3, 3),
            weight("w2", 6, 6, 3, 3),
            weight("head/w", 6, 4),
            weight("head/w2", 6, 4),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def dft_model(path: Path) -> Path:
    """``signal`` float [N,16] -> a real-input DFT -> ``spectrum`` [N,16,2]: onnxruntime runs it,
    onnx2tf has no converter for DFT (a real failure, as on audio front ends)."""
    axes = numpy_helper.from_array(np.array([-1], dtype=np.int64), "axes")
    nodes = [
        helper.make_node("Unsqueeze", ["signal", "axes"], ["as_real"], name="audio/unsqueeze"),
        helper.make_node("DFT", ["as_real"], ["spectrum"], onesided=0, name="audio/stft/dft:0"),
    ]
    graph = helper.make_graph(
        nodes,
        "dft",
        [helper.make_tensor_value_info("signal", TensorProto.FLOAT, ["N", 16])],
        [helper.make_tensor_value_info("spectrum", TensorProto.FLOAT, ["N", 16, 2])],
        initializer=[axes],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def lstm_model(path: Path) -> Path:
    """The encoder of a CRNN text recogniser as torch exports it (opset 12): features
    ``x`` [N,8,12] -> Transpose -> Reshape to [T, N, 8] by a shape computed from ``Shape``, a
    bidirectional LSTM whose zero initial states come from ``ConstantOfShape`` of a computed
    shape -> ``y`` [T,2,N,16]. onnxruntime runs it; onnx2tf 1.28 fails on the LSTM node
    ("Can't convert Python sequence with mixed types to Tensor"), as on ddddocr's OCR model."""
    rng = np.random.default_rng(17)
    hidden, features = 16, 8

    def const(name: str, value: object, dtype: type = np.int64) -> onnx.TensorProto:
        return numpy_helper.from_array(np.array(value, dtype=dtype), name)

    initializers = [
        numpy_helper.from_array(
            (rng.standard_normal((2, 4 * hidden, features)) * 0.3).astype(np.float32), "W"
        ),
        numpy_helper.from_array((rng.standard_normal((2, 4 * hidden, hidden)) * 0.3).astype(np.float32), "R"),
        numpy_helper.from_array(np.zeros((2, 8 * hidden), np.float32), "B"),
        const("zero", 0),
        const("one", 1),
        const("minus_one", [-1]),
        const("features", [features]),
        const("directions", [2]),
        const("hidden", [hidden]),
    ]
    nodes = [
        helper.make_node("Transpose", ["x"], ["x_t"], perm=[2, 0, 1], name="encoder/transpose"),
        helper.make_node("Shape", ["x_t"], ["x_shape"], name="encoder/shape"),
        helper.make_node("Gather", ["x_shape", "zero"], ["steps"], axis=0, name="encoder/gather"),
        helper.make_node("Unsqueeze", ["steps"], ["steps_1d"], axes=[0], name="encoder/unsqueeze"),
        helper.make_node(
            "Concat", ["steps_1d", "minus_one", "features"], ["seq_shape"], axis=0, name="encoder/concat"
        ),
        helper.make_node("Reshape", ["x_t", "seq_shape"], ["seq"], name="encoder/reshape"),
        helper.make_node("Shape", ["seq"], ["seq_dims"], name="rnn/shape"),
        helper.make_node("Gather", ["seq_dims", "one"], ["batch"], axis=0, name="rnn/gather"),
        helper.make_node("Unsqueeze", ["batch"], ["batch_1d"], axes=[0], name="rnn/unsqueeze"),
        helper.make_node(
            "Concat", ["directions", "batch_1d", "hidden"], ["state_shape"], axis=0, name="rnn/concat"
        ),
        helper.make_node("ConstantOfShape", ["state_shape"], ["h0"], name="rnn/h0"),
        helper.make_node("ConstantOfShape", ["state_shape"], ["c0"], name="rnn/c0"),
        helper.make_node(
            "LSTM",
            ["seq", "W", "R", "B", "", "h0", "c0"],
            ["y", "y_h", "y_c"],
            hidden_size=hidden,
            direction="bidirectional",
            name="rnn/lstm",
        ),
    ]
    graph = helper.make_graph(
        nodes,
        "crnn_encoder",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", features, 12])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["T", 2, "N", hidden])],
        initializer=initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 12)])
    model.ir_version = 7
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


_CANCEL_CHANNELS = 8


def cancelling_model(path: Path, *, stem_and_tail: bool = True) -> Path:
    """A folded-BatchNorm channel that int8 cannot hold: [stem (1x1 conv, ReLU) ->] project ->
    expand (+-1000 on two nearly equal channels of ``y``, and a bias: they cancel in float,
    not after rounding) -> ReLU6 (``z``) -> head [(ReLU) -> tail]. Input ``x`` [1, 4, 8, 8].
    The deep-sort re-identification MobileNetV2 has such a channel (weights ~127, bias ~1974)."""
    rng = np.random.default_rng(7)
    stem = rng.normal(0, 0.5, (4, 4, 1, 1)).astype(np.float32)
    project = rng.normal(0, 0.5, (_CANCEL_CHANNELS, 4, 1, 1)).astype(np.float32)
    project[1] = project[0] + rng.normal(0, 1e-3, (4, 1, 1))  # two channels nearly equal
    expand = rng.normal(0, 0.5, (_CANCEL_CHANNELS, _CANCEL_CHANNELS, 1, 1)).astype(np.float32)
    bias = np.zeros(_CANCEL_CHANNELS, np.float32)
    expand[0] = 0.0
    expand[0, 0], expand[0, 1] = 1000.0, -1000.0  # cancels in float, not after rounding
    bias[0] = 3.0
    head = rng.normal(0, 0.5, (4, _CANCEL_CHANNELS, 1, 1)).astype(np.float32)
    tail = rng.normal(0, 0.5, (4, 4, 1, 1)).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["s_relu", "w_project"], ["y"], name="project"),
        helper.make_node("Conv", ["y", "w_expand", "b_expand"], ["pre"], name="expand"),
        helper.make_node("Clip", ["pre", "low", "high"], ["z"], name="relu6"),
        helper.make_node("Conv", ["z", "w_head"], ["h"], name="head"),
    ]
    weights = [project, expand, bias, head]
    names = ["w_project", "w_expand", "b_expand", "w_head"]
    if stem_and_tail:
        nodes[:0] = [
            helper.make_node("Conv", ["x", "w_stem"], ["s"], name="stem"),
            helper.make_node("Relu", ["s"], ["s_relu"], name="stem_relu"),
        ]
        nodes += [
            helper.make_node("Relu", ["h"], ["h_relu"], name="head_relu"),
            helper.make_node("Conv", ["h_relu", "w_tail"], ["out"], name="tail"),
        ]
        weights, names = [stem, *weights, tail], ["w_stem", *names, "w_tail"]
    else:
        nodes[0].input[0] = "x"
        nodes[-1].output[0] = "out"
    graph = helper.make_graph(
        nodes,
        "ill-conditioned",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 4, 8, 8])],
        [
            *(numpy_helper.from_array(w, n) for w, n in zip(weights, names, strict=True)),
            numpy_helper.from_array(np.array(0.0, np.float32), "low"),
            numpy_helper.from_array(np.array(6.0, np.float32), "high"),
        ],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def yolov8_head_model(path: Path, classes: int = 6) -> Path:
    """The decoding head of a YOLOv8 detector as ultralytics exports it and onnxsim leaves it
    (nudenet's 320n), on three feature maps p3 [1,C,8,8], p4 [1,C,4,4], p5 [1,C,2,2] with
    C = 64 + classes: each Reshape [1,C,HW] -> Concat (84 anchors) -> Split -> scores =
    Sigmoid; boxes = DFL (Reshape [1,4,16,A], Transpose, Softmax, a 1x1 Conv with weights
    0..15, Reshape [1,4,A]) -> Slice into lt / rb -> anchor points (a ``Constant`` node) -/+
    -> centre and size -> Concat -> * strides -> Concat with the scores -> y [1,4+classes,A].
    onnx2tf 1.28 takes the Constant's value as it is beside channels-last tensors."""
    channels = 64 + classes
    sides = (8, 4, 2)
    anchors = sum(side * side for side in sides)
    grids = [np.stack(np.meshgrid(np.arange(s) + 0.5, np.arange(s) + 0.5)).reshape(2, -1) for s in sides]
    points = np.concatenate(grids, axis=1)[None].astype(np.float32)
    strides = np.concatenate([np.full(s * s, 320 / s, np.float32) for s in sides])[None]

    def i64(name: str, value: list[int]) -> onnx.TensorProto:
        return numpy_helper.from_array(np.array(value, np.int64), name)

    initializers = [
        *(i64(f"flat{s}", [1, channels, s * s]) for s in sides),
        i64("split", [64, classes]),
        i64("dfl_shape", [1, 4, 16, anchors]),
        i64("box_shape", [1, 4, anchors]),
        i64("zero", [0]),
        i64("two", [2]),
        i64("four", [4]),
        i64("axis1", [1]),
        numpy_helper.from_array(np.arange(16, dtype=np.float32).reshape(1, 16, 1, 1), "dfl_w"),
        numpy_helper.from_array(np.array(2.0, np.float32), "half"),
        numpy_helper.from_array(strides, "strides"),
    ]
    nodes = [
        *(helper.make_node("Reshape", [f"p{i + 3}", f"flat{s}"], [f"f{i + 3}"]) for i, s in enumerate(sides)),
        helper.make_node("Concat", ["f3", "f4", "f5"], ["x"], axis=2, name="concat_levels"),
        helper.make_node(
            "Constant", [], ["anchor_points"], value=numpy_helper.from_array(points), name="anchors"
        ),
        helper.make_node("Split", ["x", "split"], ["box", "cls"], axis=1, name="split"),
        helper.make_node("Sigmoid", ["cls"], ["scores"], name="scores"),
        helper.make_node("Reshape", ["box", "dfl_shape"], ["dfl"], name="dfl/reshape"),
        helper.make_node("Transpose", ["dfl"], ["dfl_t"], perm=[0, 2, 1, 3], name="dfl/transpose"),
        helper.make_node("Softmax", ["dfl_t"], ["dfl_p"], axis=1, name="dfl/softmax"),
        helper.make_node("Conv", ["dfl_p", "dfl_w"], ["dist4"], name="dfl/conv"),
        helper.make_node("Reshape", ["dist4", "box_shape"], ["dist"], name="dfl/reshape_1"),
        helper.make_node("Slice", ["dist", "zero", "two", "axis1"], ["lt"], name="slice_lt"),
        helper.make_node("Slice", ["dist", "two", "four", "axis1"], ["rb"], name="slice_rb"),
        helper.make_node("Sub", ["anchor_points", "lt"], ["x1y1"], name="sub"),
        helper.make_node("Add", ["anchor_points", "rb"], ["x2y2"], name="add"),
        helper.make_node("Add", ["x1y1", "x2y2"], ["sum"], name="add_1"),
        helper.make_node("Sub", ["x2y2", "x1y1"], ["wh"], name="sub_1"),
        helper.make_node("Div", ["sum", "half"], ["centre"], name="div"),
        helper.make_node("Concat", ["centre", "wh"], ["xywh"], axis=1, name="concat_box"),
        helper.make_node("Mul", ["xywh", "strides"], ["boxes"], name="mul_strides"),
        helper.make_node("Concat", ["boxes", "scores"], ["y"], axis=1, name="concat_out"),
    ]
    graph = helper.make_graph(
        nodes,
        "yolov8_head",
        [
            helper.make_tensor_value_info(f"p{i + 3}", TensorProto.FLOAT, [1, channels, s, s])
            for i, s in enumerate(sides)
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4 + classes, anchors])],
        initializer=initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path
