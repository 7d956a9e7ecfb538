"""Patches made to the graph onnx2tf gets: recurrent nodes given their zero initial states."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from compiler.backends._onnx2tf_fixes import explicit_rnn_states


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def test_an_lstm_without_initial_states_gets_zeros_of_its_shape():
    hidden, batch = 5, 2
    rng = np.random.default_rng(0)
    weights = [
        numpy_helper.from_array(rng.standard_normal((2, 4 * hidden, 3)).astype(np.float32), "W"),
        numpy_helper.from_array(rng.standard_normal((2, 4 * hidden, hidden)).astype(np.float32), "R"),
    ]
    lstm = helper.make_node("LSTM", ["x", "W", "R"], ["y"], hidden_size=hidden, direction="bidirectional")
    graph = helper.make_graph(
        [lstm],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [7, batch, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        weights,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)])
    model.ir_version = 8
    x = rng.standard_normal((7, batch, 3)).astype(np.float32)
    before = _run(model, x)
    explicit_rnn_states(model)
    node = model.graph.node[0]
    states = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    assert node.input[4] == ""  # sequence_lens stays absent
    for position in (5, 6):
        assert states[node.input[position]].shape == (2, batch, hidden)
        assert not states[node.input[position]].any()
    np.testing.assert_allclose(_run(model, x), before, rtol=1e-6)
