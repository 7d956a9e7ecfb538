"""Graph patches for onnx2tf's known failures on real exports, applied to the graph it gets
(after onnxsim). Each leaves what the graph computes unchanged."""

from __future__ import annotations

import logging

import numpy as np
import onnx
from onnx import numpy_helper

__all__ = ["explicit_rnn_states", "fold_shape_decided_ifs"]

logger = logging.getLogger(__name__)


_RNN_STATES = {"LSTM": (5, 6), "GRU": (5,), "RNN": (5,)}  # input positions of initial_h (, initial_c)


def explicit_rnn_states(graph: onnx.ModelProto) -> onnx.ModelProto:
    """Recurrent nodes with their initial states given as zeros where the graph leaves them
    out (which ONNX allows): onnx2tf's bidirectional LSTM reads ``initial_h[1]`` without
    checking it exists ("'NoneType' object is not subscriptable"). Needs the batch size,
    from the input's inferred shape; a node whose batch is not static stays as it is."""
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


def _probe_shapes(graph: onnx.ModelProto, names: list[str]) -> dict[str, np.ndarray]:
    """The values of the ``Shape`` outputs ``names`` when the graph runs on inputs of its
    static shapes, once on random values and once on zeros; only those that come out the same
    both times (a Shape of ``NonZero``'s result, say, depends on the values: it stays)."""
    import onnxruntime as ort

    probe = onnx.ModelProto()
    probe.CopyFrom(graph)
    del probe.graph.output[:]
    probe.graph.output.extend(
        onnx.helper.make_tensor_value_info(n, onnx.TensorProto.INT64, None) for n in names
    )
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    runs = []
    for random in (True, False):
        feeds = {i.name: _probe(i.shape, i.type, rng, random) for i in session.get_inputs()}
        runs.append(dict(zip(names, session.run(names, feeds), strict=True)))
    return {n: runs[0][n] for n in names if all(np.array_equal(r[n], runs[0][n]) for r in runs)}


def _probe(shape: list[int], ort_type: str, rng: np.random.Generator, random: bool) -> np.ndarray:
    """An input of its type: floats random and spread, or zeros; integers 1, booleans True."""
    name = ort_type.removeprefix("tensor(").removesuffix(")")
    dtype = np.dtype({"float": "float32", "double": "float64"}.get(name, name))
    if dtype.kind == "f":
        return (rng.standard_normal(shape) * 4).astype(dtype) if random else np.zeros(shape, dtype)
    return np.ones(shape, dtype)


def fold_shape_decided_ifs(graph: onnx.ModelProto) -> int:
    """Control flow decided by tensor shapes, inlined: in a graph whose inputs have static
    shapes, every ``Shape`` is a constant (found by running the graph), and an ``If`` whose
    condition is computed from shapes alone (silero-vad's decoder checks its state's batch
    size) takes one branch, always. onnx2tf cannot convert ``If`` with tensors in its
    branches; onnxsim folds Shape only where shape inference sees through every op. Returns
    the number of nodes folded or inlined (0: nothing to do, the graph untouched)."""
    from compiler.freeze import fold_frozen

    if not any(n.op_type == "If" for n in graph.graph.node):
        return 0
    shapes = [n.output[0] for n in graph.graph.node if n.op_type == "Shape"]
    try:
        values = _probe_shapes(graph, shapes) if shapes else {}
    except Exception as e:  # onnxruntime's own errors: leave the graph to onnx2tf as it is
        logger.info("shapes not probed: %s", e)
        return 0
    if not values:
        return 0
    kept = [n for n in graph.graph.node if not (n.op_type == "Shape" and n.output[0] in values)]
    del graph.graph.node[:]
    graph.graph.node.extend(kept)
    graph.graph.initializer.extend(numpy_helper.from_array(v, n) for n, v in values.items())
    return fold_frozen(graph, values)
