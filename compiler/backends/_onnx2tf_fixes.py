"""Graph patches for onnx2tf's known failures on real exports, applied to the graph it gets
(after onnxsim). Each leaves what the graph computes unchanged."""

from __future__ import annotations

import logging

import numpy as np
import onnx
from onnx import numpy_helper

__all__ = ["constants_as_initializers", "explicit_rnn_states"]

logger = logging.getLogger(__name__)


def constants_as_initializers(graph: onnx.ModelProto) -> onnx.ModelProto:
    """Top-level ``Constant`` nodes (onnxsim leaves many) as initializers. onnx2tf transposes
    an initializer to the channels-last layout of the tensor it meets, but takes a Constant
    node's value as it is: YOLOv8's anchor points ([1,2,2100], a Constant) were subtracted
    from channels-last box distances, and every box came out wrong (scores right)."""
    kept: list[onnx.NodeProto] = []
    for node in graph.graph.node:
        value = node.attribute[0] if len(node.attribute) == 1 else None
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and value and value.name == "value":
            tensor = onnx.TensorProto()
            tensor.CopyFrom(value.t)
            tensor.name = node.output[0]
            graph.graph.initializer.append(tensor)
        else:
            kept.append(node)
    del graph.graph.node[:]
    graph.graph.node.extend(kept)
    return graph


_RNN_STATES = {"LSTM": (5, 6), "GRU": (5,), "RNN": (5,)}  # input positions of initial_h (, initial_c)


def explicit_rnn_states(graph: onnx.ModelProto) -> onnx.ModelProto:
    """Recurrent nodes with their initial states given as zeros where the graph leaves them
    out (which ONNX allows): onnx2tf's bidirectional LSTM reads ``initial_h[1]`` without
    checking it exists ("'NoneType' object is not subscriptable"). Needs the batch size,
    from the input's inferred shape; a node whose batch is not static stays as it is."""
    if not any(node.op_type in _RNN_STATES for node in graph.graph.node):
        return graph  # no shape inference for the graphs that have nothing to patch
    shapes = _shapes(graph)
    taken = {name for node in graph.graph.node for name in [*node.input, *node.output]}
    for node in graph.graph.node:
        states = _RNN_STATES.get(node.op_type) if node.domain in ("", "ai.onnx") else None
        x = shapes.get(node.input[0]) if states else None
        if not states or not x or len(x) != 3:
            continue
        attributes = {a.name: a for a in node.attribute}
        batch = x[0] if "layout" in attributes and attributes["layout"].i == 1 else x[1]
        hidden = attributes["hidden_size"].i if "hidden_size" in attributes else 0
        direction = attributes["direction"].s if "direction" in attributes else b"forward"
        if batch <= 0 or hidden <= 0:
            continue
        shape = (2 if direction == b"bidirectional" else 1, batch, hidden)
        if "layout" in attributes and attributes["layout"].i == 1:
            shape = (batch, shape[0], hidden)
        while len(node.input) <= max(states):
            node.input.append("")
        for position in states:
            if node.input[position]:
                continue
            name = f"{node.name or node.op_type}_zero_state_{position}"
            while name in taken:
                name += "_"
            taken.add(name)
            graph.graph.initializer.append(numpy_helper.from_array(np.zeros(shape, np.float32), name))
            node.input[position] = name
    return graph


def _shapes(graph: onnx.ModelProto) -> dict[str, list[int]]:
    inferred = onnx.shape_inference.infer_shapes(graph)
    shapes = {
        vi.name: [d.dim_value if d.HasField("dim_value") else 0 for d in vi.type.tensor_type.shape.dim]
        for vi in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]
    }
    shapes.update({t.name: list(t.dims) for t in graph.graph.initializer})
    return shapes
