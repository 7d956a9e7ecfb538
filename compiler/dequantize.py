"""Turn an already-quantized ONNX graph back into a float graph.

Published models are often shipped quantized: onnxruntime's ``quantize_dynamic`` output
(``DynamicQuantizeLinear`` feeding ``MatMulInteger``/``ConvInteger``, ``DynamicQuantizeLSTM``)
or a static Q/DQ graph. No converter takes those to fp16, to another int8 scheme or to
TFLite, so the graph is rewritten to the float graph it computes: integer weights become
float weights ``(w - zero_point) * scale`` (their 8-bit rounding stays: it is the model's
now), activations are no longer quantized. Each rewrite is local and exact up to that
rounding; the build verifies the result against the quantized source as it does any other.

Ops with no rewrite here (``QLinearConv`` and the other ``QLinear*`` kernels, quantized ops
inside subgraphs) leave the graph unchanged; the build then names them.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Mapping

import numpy as np
import onnx
from onnx import helper, numpy_helper

from compiler.freeze import fold_frozen, used_names
from compiler.verify import gate_failures
from device_profiles import DeviceProfile
from edgec.manifest import Metrics, OutputMetrics, Precision

__all__ = ["agreement_failures", "agreement_note", "dequantize", "described"]

logger = logging.getLogger(__name__)
_Rewrite = Callable[["_Graph", onnx.NodeProto], list[onnx.NodeProto] | None]


class _Graph:
    """The top-level graph's constants and producers, for local rewrites."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.graph = model.graph
        self.constants: dict[str, np.ndarray] = {
            t.name: numpy_helper.to_array(t) for t in self.graph.initializer
        }
        for node in self.graph.node:
            if node.op_type == "Constant" and len(node.attribute) == 1 and node.attribute[0].name == "value":
                self.constants[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
        self.producer = {out: node for node in self.graph.node for out in node.output}
        self.new_initializers: list[onnx.TensorProto] = []
        self._names = {t.name for t in self.graph.initializer} | set(self.producer)

    def constant(self, name: str) -> np.ndarray | None:
        return self.constants.get(name) if name else None

    def add_constant(self, hint: str, value: np.ndarray) -> str:
        name, n = f"{hint}_float", 0
        while name in self._names:
            n += 1
            name = f"{hint}_float{n}"
        self._names.add(name)
        self.new_initializers.append(numpy_helper.from_array(value, name))
        return name

    def dynamic_source(self, name: str) -> str | None:
        """The float tensor a ``DynamicQuantizeLinear`` output ``name`` quantized, else None."""
        node = self.producer.get(name)
        if node is None or node.op_type != "DynamicQuantizeLinear" or node.output[0] != name:
            return None
        return node.input[0]


def _arg(node: onnx.NodeProto, i: int) -> str:
    return node.input[i] if len(node.input) > i else ""


def _minus_zero_point(weight: np.ndarray, zero_point: np.ndarray | None, axis: int) -> np.ndarray:
    """``weight - zero_point`` in float32, a per-channel zero point broadcast along ``axis``."""
    w = weight.astype(np.float32)
    if zero_point is None or zero_point.size == 0:
        return w
    zp = zero_point.astype(np.float32)
    if zp.size > 1:
        shape = [1] * w.ndim
        shape[axis] = zp.size
        zp = zp.reshape(shape)
    return w - zp


def _integer_matmul(graph: _Graph, node: onnx.NodeProto) -> list[onnx.NodeProto] | None:
    """``MatMulInteger(q(x), W, zx, zw)`` -> ``MatMul(x, W - zw)``; the scale product that
    follows in the graph still multiplies (the activation's scale becomes 1)."""
    x = graph.dynamic_source(node.input[0])
    weight = graph.constant(node.input[1])
    if x is None or weight is None:
        return None
    w = _minus_zero_point(weight, graph.constant(_arg(node, 3)), axis=weight.ndim - 1)
    name = graph.add_constant(node.input[1], w)
    return [helper.make_node("MatMul", [x, name], list(node.output), name=node.name)]


def _integer_conv(graph: _Graph, node: onnx.NodeProto) -> list[onnx.NodeProto] | None:
    """``ConvInteger(q(x), W, zx, zw)`` -> ``Conv(x, W - zw)`` with the same attributes."""
    x = graph.dynamic_source(node.input[0])
    weight = graph.constant(node.input[1])
    if x is None or weight is None:
        return None
    w = _minus_zero_point(weight, graph.constant(_arg(node, 3)), axis=0)
    name = graph.add_constant(node.input[1], w)
    conv = helper.make_node("Conv", [x, name], list(node.output), name=node.name)
    conv.attribute.extend(node.attribute)
    return [conv]


def _lstm_weight(graph: _Graph, node: onnx.NodeProto, i: int) -> str | None:
    """A ``DynamicQuantizeLSTM`` weight ([dirs, in, 4h], scale and zero point per direction or
    per gate column) as an LSTM weight: ``(W - zp) * scale`` transposed to [dirs, 4h, in]."""
    at = 8 if i == 1 else 10  # inputs: X W R B lens h c P W_scale W_zp R_scale R_zp
    weight, scale = graph.constant(node.input[i]), graph.constant(_arg(node, at))
    zero_point = graph.constant(_arg(node, at + 1))
    if weight is None or scale is None:
        return None
    dirs = weight.shape[0]
    scale_b = scale.astype(np.float32).reshape(dirs, 1, -1)
    w = weight.astype(np.float32)
    if zero_point is not None:
        w = w - zero_point.astype(np.float32).reshape(dirs, 1, -1)
    w = w * scale_b
    return graph.add_constant(node.input[i], np.ascontiguousarray(w.transpose(0, 2, 1)))


def _quantized_lstm(graph: _Graph, node: onnx.NodeProto) -> list[onnx.NodeProto] | None:
    w, r = _lstm_weight(graph, node, 1), _lstm_weight(graph, node, 2)
    if w is None or r is None:
        return None
    inputs = [node.input[0], w, r, *node.input[3:8]]
    while inputs and not inputs[-1]:
        inputs.pop()
    lstm = helper.make_node("LSTM", inputs, list(node.output), name=node.name)
    lstm.attribute.extend(node.attribute)
    return [lstm]


def _dynamic_matmul(graph: _Graph, node: onnx.NodeProto) -> list[onnx.NodeProto] | None:
    """``DynamicQuantizeMatMul(x, W, scale, zp, bias)`` -> ``MatMul(x, (W - zp) * scale) [+ bias]``."""
    weight, scale = graph.constant(node.input[1]), graph.constant(node.input[2])
    if weight is None or scale is None:
        return None
    axis = weight.ndim - 1
    w = _minus_zero_point(weight, graph.constant(_arg(node, 3)), axis) * _minus_zero_point(scale, None, axis)
    name = graph.add_constant(node.input[1], w)
    bias = _arg(node, 4)
    if not bias:
        return [helper.make_node("MatMul", [node.input[0], name], list(node.output), name=node.name)]
    product = f"{node.output[0]}_matmul"
    return [
        helper.make_node("MatMul", [node.input[0], name], [product], name=node.name),
        helper.make_node("Add", [product, bias], list(node.output), name=f"{node.name}_bias"),
    ]


def _dequantize_constant(graph: _Graph, node: onnx.NodeProto) -> list[onnx.NodeProto] | None:
    """``DequantizeLinear`` of a constant -> the float constant."""
    value, scale = graph.constant(node.input[0]), graph.constant(_arg(node, 1))
    if value is None or scale is None:
        return _dequantize_activation(graph, node)
    axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
    axis = axis % value.ndim if value.ndim else 0
    zp = graph.constant(_arg(node, 2))
    w = _minus_zero_point(value, zp, axis)
    s = scale.astype(np.float32)
    if s.size > 1:
        shape = [1] * w.ndim
        shape[axis] = s.size
        s = s.reshape(shape)
    name = graph.add_constant(node.input[0], (w * s).astype(np.float32))
    return [helper.make_node("Identity", [name], list(node.output), name=node.name)]


def _dequantize_activation(graph: _Graph, node: onnx.NodeProto) -> list[onnx.NodeProto] | None:
    """``DequantizeLinear(QuantizeLinear(x))`` -> ``x``: the activation is no longer rounded."""
    quantize = graph.producer.get(node.input[0])
    if quantize is None or quantize.op_type != "QuantizeLinear":
        return None
    return [helper.make_node("Identity", [quantize.input[0]], list(node.output), name=node.name)]


_REWRITES: dict[str, _Rewrite] = {
    "MatMulInteger": _integer_matmul,
    "ConvInteger": _integer_conv,
    "DynamicQuantizeLSTM": _quantized_lstm,
    "DynamicQuantizeMatMul": _dynamic_matmul,
    "DequantizeLinear": _dequantize_constant,
}
# Producers of quantized tensors: dropped once every consumer was rewritten; a
# DynamicQuantizeLinear's scale output (still used by the scale products) becomes 1.
_QUANTIZERS = frozenset({"DynamicQuantizeLinear", "QuantizeLinear"})


_INTEGER_ACCUMULATORS = frozenset({"MatMulInteger", "ConvInteger"})
_SHAPE_ONLY = frozenset({"Reshape", "Unsqueeze", "Squeeze", "Transpose", "Identity", "Flatten"})


def _float_accumulators(nodes: list[onnx.NodeProto], accumulators: set[str]) -> list[onnx.NodeProto]:
    """The int32 accumulators of the rewritten integer ops are float now (in units of the
    weight's scale, the activation's scale being 1). What the quantizer added to them in
    int32 (a bias ``Cast<int32>(Floor(bias / scale))``, reshaped) is made float too, without
    the ``Floor``: the sum is then exact, not rounded to the accumulator's step."""
    producer = {out: node for node in nodes for out in node.output}
    consumers: dict[str, int] = Counter(name for node in nodes for name in node.input)
    dropped: set[int] = set()
    floats = set(accumulators)
    for node in nodes:  # topological: an accumulator's sums come after it
        if node.op_type not in ("Add", "Sub") or not floats.intersection(node.input):
            continue
        floats.update(node.output)
        for name in node.input:
            cast = producer.get(name)
            while cast is not None and cast.op_type in _SHAPE_ONLY:
                cast = producer.get(cast.input[0])
            if cast is None or cast.op_type != "Cast":
                continue
            for attribute in cast.attribute:
                if attribute.name == "to" and attribute.i == onnx.TensorProto.INT32:
                    attribute.i = onnx.TensorProto.FLOAT
            floor = producer.get(cast.input[0])
            if floor is not None and floor.op_type == "Floor" and consumers[floor.output[0]] == 1:
                cast.input[0] = floor.input[0]
                dropped.add(id(floor))
    return [node for node in nodes if id(node) not in dropped]


def _drop_quantizers(graph: _Graph, nodes: list[onnx.NodeProto]) -> list[onnx.NodeProto] | None:
    used = {name for node in nodes for name in node.input}
    kept: list[onnx.NodeProto] = []
    for node in nodes:
        if node.op_type not in _QUANTIZERS:
            kept.append(node)
            continue
        if node.output[0] in used:
            return None  # a consumer of the quantized tensor had no rewrite
        if node.op_type == "DynamicQuantizeLinear":  # its scale and zero point become constants
            for out, value in zip(node.output[1:], (np.float32(1.0), np.uint8(0)), strict=False):
                if out in used:
                    graph.new_initializers.append(numpy_helper.from_array(np.array(value), out))
    return kept


def dequantize(model: onnx.ModelProto) -> Counter[str] | None:
    """Rewrite ``model``'s quantized ops into float ops, in place. Returns the op types
    rewritten with their counts, or None (the model untouched) when some quantized op has
    no rewrite. A graph with no quantized op returns an empty count."""
    graph = _Graph(model)
    rewritten: Counter[str] = Counter()
    nodes: list[onnx.NodeProto] = []
    accumulators: set[str] = set()
    for node in graph.graph.node:
        rewrite = _REWRITES.get(node.op_type)
        if rewrite is None:
            nodes.append(node)
            continue
        replacement = rewrite(graph, node)
        if replacement is None:
            logger.info("no float rewrite for %s node %s", node.op_type, node.name)
            return None
        rewritten[node.op_type] += 1
        nodes.extend(replacement)
        if node.op_type in _INTEGER_ACCUMULATORS:
            accumulators.update(node.output)
    kept = _drop_quantizers(graph, nodes)
    if kept is None:
        return None
    kept = _float_accumulators(kept, accumulators)
    for node in graph.graph.node:
        if node.op_type in _QUANTIZERS:
            rewritten[node.op_type] += 1
    if not rewritten:
        return rewritten
    del graph.graph.node[:]
    graph.graph.node.extend(kept)
    graph.graph.initializer.extend(graph.new_initializers)
    # the scale products and quantized biases now hang off constants only: fold them, then
    # into the weights, so the graph is the plain Conv/MatMul (+ bias) it was made from
    fold_frozen(model, {t.name: numpy_helper.to_array(t) for t in graph.new_initializers})
    _fold_scales(model.graph, accumulators)
    _drop_unused_initializers(graph.graph)
    _drop_domain(model, "com.microsoft")
    return rewritten


def _channel_vector(value: np.ndarray, rank: int, axis: int, channels: int) -> np.ndarray | None:
    """``value`` as one number per channel on ``axis`` of a tensor of ``rank``, if it
    broadcasts that way (a scalar counts), else None."""
    if value.ndim > rank:
        return None
    shape = [1] * (rank - value.ndim) + list(value.shape)
    if any(d != 1 for i, d in enumerate(shape) if i != axis) or shape[axis] not in (1, channels):
        return None
    return np.broadcast_to(value.reshape(-1), (channels,)).astype(np.float32)


def _cast_to_float(node: onnx.NodeProto) -> bool:
    return node.op_type == "Cast" and any(
        a.name == "to" and a.i == onnx.TensorProto.FLOAT for a in node.attribute
    )


def _fold_scales(graph: onnx.GraphProto, accumulators: set[str]) -> None:
    """After each rewritten Conv (MatMul), fold ``Cast<float>``, ``* constant`` and ``+ constant``
    (``* constant``) per output channel into its weights and bias while it is the only reader."""
    constants = {t.name: t for t in graph.initializer}
    readers = Counter(name for node in graph.node for name in node.input)
    reader = {name: node for node in graph.node for name in node.input}
    dropped: set[int] = set()
    for node in graph.node:
        if node.op_type not in ("Conv", "MatMul") or node.output[0] not in accumulators:
            continue
        weight = numpy_helper.to_array(constants[node.input[1]]).astype(np.float32)
        conv = node.op_type == "Conv"
        channels = weight.shape[0] if conv else weight.shape[-1]
        bias = np.zeros(channels, np.float32)
        out = node.output[0]
        while readers[out] == 1 and (step := reader.get(out)) is not None:
            other = next((n for n in step.input if n != out), "")
            vector = None
            if other in constants and (step.op_type == "Mul" or (conv and step.op_type == "Add")):
                value = numpy_helper.to_array(constants[other])
                rank = weight.ndim if conv else max(value.ndim, 1)
                vector = _channel_vector(value, rank, 1 if conv else rank - 1, channels)
            if vector is not None and step.op_type == "Add":
                bias = bias + vector
            elif vector is not None:
                bias = bias * vector
                weight = weight * (vector.reshape(-1, *[1] * (weight.ndim - 1)) if conv else vector)
            elif not _cast_to_float(step):
                break
            dropped.add(id(step))
            out = step.output[0]
        if out == node.output[0]:
            continue
        constants[node.input[1]].CopyFrom(numpy_helper.from_array(weight, node.input[1]))
        node.output[0] = out
        if conv:
            name = f"{node.input[1]}_bias"
            while name in constants or name in readers:
                name += "_"
            constants[name] = numpy_helper.from_array(bias, name)
            graph.initializer.append(constants[name])
            node.input.append(name)
    kept = [node for node in graph.node if id(node) not in dropped]
    del graph.node[:]
    graph.node.extend(kept)


def _drop_unused_initializers(graph: onnx.GraphProto) -> None:
    used = used_names(graph)
    kept = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)


def _drop_domain(model: onnx.ModelProto, domain: str) -> None:
    if any(node.domain == domain for node in model.graph.node):
        return
    kept = [o for o in model.opset_import if o.domain != domain]
    del model.opset_import[:]
    model.opset_import.extend(kept)


def described(ops: Mapping[str, int]) -> str:
    """``21 ConvInteger, 1 DynamicQuantizeLSTM``: what ``dequantize`` rewrote."""
    return ", ".join(f"{count} {op}" for op, count in sorted(ops.items()))


def _figures(output: OutputMetrics) -> str:
    shown = [
        ("cos", output.cosine, ".4f"),
        ("top-1", output.top1_agreement, ".4f"),
        ("steps", output.sequence_agreement, ".4f"),
        ("anchors", output.anchor_agreement, ".4f"),
        ("err/scale", output.rel_err, ".3g"),
    ]
    return " ".join(f"{label} {value:{fmt}}" for label, value, fmt in shown if value is not None)


def agreement_note(ops: Mapping[str, int], metrics: Metrics) -> str:
    """The report's line for a build made from a quantized source's float equivalent."""
    figures = "; ".join(f"{o.name} [{o.kind.value}] {_figures(o)}" for o in metrics.outputs)
    return (
        f"the source is quantized ({described(ops)}): built from the float graph it computes "
        f"(its weights keep their 8-bit rounding) and verified against that graph, which agrees "
        f"with the source on {metrics.samples} samples: {figures}"
    )


def agreement_failures(profile: DeviceProfile, metrics: Metrics) -> list[str]:
    """Where the float equivalent misses the profile's gate for the source's own precision
    (dynamic int8, else int8) against the quantized source: then it is no equivalent."""
    gate = profile.gates.get(Precision.DYNAMIC) or profile.gates.get(Precision.INT8)
    return gate_failures(metrics, gate) if gate is not None else []
