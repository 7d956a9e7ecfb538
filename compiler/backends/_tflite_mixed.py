"""TFLite int8 with chosen ONNX nodes kept in float: TensorFlow's selective quantization.

The mixed-precision search (``compiler.search``) names nodes of the prepared ONNX graph.
The TFLite graph does not carry those names: onnx2tf names its TensorFlow ops after
TensorFlow's functions (``model/tf.nn.convolution_3/convolution``), and the converter fuses
a Conv, its bias and its ReLU6 into one CONV_2D named after all three. So each node's op is
found by value: one calibration sample runs through the prepared ONNX graph, the chosen
nodes' outputs exposed, and through the converter's calibrated float model, every tensor
kept; a node's op is the TFLite op whose output holds the node's output values, as laid out
or channels-last. A node whose output the converter fused away (a Conv before its
activation) is found at the first tensor after it on its own path, the fused op. The ops
found go to TensorFlow's quantization debugger as denylisted nodes: it quantizes the rest
to int8 and keeps those in float, with quantize/dequantize ops at their edges. A node that
is not found stays int8, and the artifact's notes say so.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from compiler._capture import captured_output
from compiler.prepare import PreparedModel
from compiler.runtime import OnnxRuntimeRunner, first_line
from edgec.errors import ConversionError

__all__ = ["FloatOps", "find_float_ops", "quantize_keeping_float"]

logger = logging.getLogger(__name__)
FUSED_STEPS = 3  # how many nodes past a chosen node its fused TFLite op is looked for
TOLERANCE = 1e-3  # two float runs of one tensor agree within this share of its largest value
_PROBE = "float-nodes-probe.onnx"


@dataclass
class FloatOps:
    """Where the chosen ONNX nodes are in the TFLite graph."""

    found: dict[str, list[str]] = field(default_factory=dict)  # node -> TFLite ops' output tensors
    fused: set[str] = field(default_factory=set)  # nodes found at an op after them (fused into it)
    missing: list[str] = field(default_factory=list)  # nodes with no TFLite op holding their output
    ops: dict[str, str] = field(default_factory=dict)  # TFLite output tensor -> its op type
    still_int8: list[str] = field(default_factory=list)  # denylisted, but quantized all the same

    @property
    def names(self) -> list[str]:
        """The TFLite ops to keep in float, by output tensor name (what the debugger takes)."""
        return list(dict.fromkeys(name for names in self.found.values() for name in names))

    def notes(self, prepared: PreparedModel) -> list[str]:
        total = len(self.found) + len(self.missing)
        notes = []
        if self.found:
            computes: dict[str, list[str]] = {}  # TFLite op -> the chosen nodes it computes
            for node, names in self.found.items():
                for name in names:
                    computes.setdefault(name, []).append(prepared.node_label(node))
            kept = "; ".join(
                f"{self.ops[name]} {_short(name)} ({', '.join(nodes)})" for name, nodes in computes.items()
            )
            fused = f", {len(self.fused)} of them fused into the op after them" if self.fused else ""
            notes.append(
                f"kept in float (TFLite selective quantization): {len(self.found)} of {total} chosen ONNX "
                f"node(s){fused}, as {len(computes)} TFLite op(s) found by value: {kept}"
            )
        if self.missing:
            notes.append(
                f"not kept in float: {len(self.missing)} chosen ONNX node(s) hold no output the TFLite "
                f"graph has (computed or fused differently there), left int8: "
                + ", ".join(prepared.node_label(n) for n in self.missing)
            )
        if self.still_int8:
            notes.append(
                "the TFLite quantizer kept these ops in int8 although asked to keep them in float: "
                + ", ".join(_short(n) for n in self.still_int8)
            )
        return notes


def _short(name: str) -> str:
    """A fused op's tensor is named after every op in it (``a/Relu6;a/Add;a/convolution;Const``):
    the first names it."""
    return repr(name.split(";", maxsplit=1)[0])


def _paths(model: onnx.ModelProto, nodes: Sequence[str]) -> dict[str, list[list[str]]]:
    """For each chosen node, the tensors to look for, nearest first: its outputs, then the
    outputs of the next node on its own path (its only consumer), up to ``FUSED_STEPS``."""
    by_name = {node.name: node for node in model.graph.node}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in dict.fromkeys(node.input):
            consumers.setdefault(name, []).append(node)
    paths: dict[str, list[list[str]]] = {}
    for name in nodes:
        node = by_name.get(name)
        steps: list[list[str]] = []
        while node is not None and len(steps) <= FUSED_STEPS:
            steps.append([o for o in node.output if o])
            after = [c for o in node.output for c in consumers.get(o, [])]
            node = after[0] if len(after) == 1 else None
        paths[name] = steps
    return paths


def _onnx_values(
    prepared: PreparedModel, tensors: set[str], feed: Mapping[str, np.ndarray], workdir: Path
) -> dict[str, np.ndarray]:
    """The prepared graph's values of ``tensors`` for one sample (onnxruntime)."""
    model = onnx.ModelProto()
    model.CopyFrom(prepared.model)
    outputs = {o.name for o in model.graph.output}
    for name in sorted(tensors - outputs):  # no declared shape: a stale one would not be trusted
        model.graph.output.append(onnx.ValueInfoProto(name=name))
    probe = workdir / _PROBE
    onnx.save(model, str(probe))
    values = OnnxRuntimeRunner(probe, {}).run(dict(feed))
    return {name: value for name, value in values.items() if name in tensors}


def _interpreter(model: bytes, keep_tensors: bool = False) -> Any:
    """LiteRT on ``model`` with no delegate (XNNPACK would hide the ops behind one)."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    with captured_output():
        return Interpreter(
            model_content=model,
            experimental_preserve_all_tensors=keep_tensors,
            experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES,
        )


def _tflite_values(
    calibrated: bytes, feed: Mapping[str, np.ndarray]
) -> tuple[dict[str, Any], dict[str, str]]:
    """Every float op output of the calibrated (still float) TFLite model for one sample, by
    tensor name, and each one's op type."""
    interpreter = _interpreter(calibrated, keep_tensors=True)
    with captured_output():
        interpreter.get_signature_runner()(**feed)
    details = interpreter.get_tensor_details()
    values: dict[str, Any] = {}
    ops: dict[str, str] = {}
    for op in interpreter._get_ops_details():  # the debugger itself reads ops this way
        for index in op["outputs"]:
            value = interpreter.get_tensor(index)
            if value.dtype.kind == "f":
                values[details[index]["name"]] = value
                ops[details[index]["name"]] = op["op_name"]
    return values, ops


def same_values(onnx_value: np.ndarray, tflite_value: np.ndarray) -> bool:
    """Whether a TFLite tensor holds an ONNX tensor's values, as laid out or channels-last
    (onnx2tf's layout). A constant tensor matches nothing: it cannot tell two ops apart."""
    a = np.asarray(onnx_value, np.float64)
    b = np.asarray(tflite_value, np.float64).ravel()
    if a.size != b.size or a.size < 2 or not np.isfinite(a).all() or np.ptp(a) == 0:
        return False
    tolerance = TOLERANCE * float(np.max(np.abs(a)))
    layouts = [a, np.moveaxis(a, 1, -1)] if a.ndim >= 3 else [a]
    return any(float(np.max(np.abs(layout.ravel() - b))) <= tolerance for layout in layouts)


def find_float_ops(
    prepared: PreparedModel,
    nodes: Sequence[str],
    calibrated: bytes,
    *,
    onnx_feed: Mapping[str, np.ndarray],
    tflite_feed: Mapping[str, np.ndarray],
    workdir: Path,
) -> FloatOps:
    """The TFLite ops of the calibrated model that compute ``nodes`` (names in the prepared
    graph), matched by value on one sample (``onnx_feed``, and the same sample as the TFLite
    model takes it, ``tflite_feed``)."""
    paths = _paths(prepared.model, nodes)
    wanted = {t for steps in paths.values() for step in steps for t in step}
    onnx_values = _onnx_values(prepared, wanted, onnx_feed, workdir)
    tflite_values, ops = _tflite_values(calibrated, tflite_feed)
    found = FloatOps(ops=ops)
    for node in nodes:
        for distance, step in enumerate(paths[node]):
            names = [
                name
                for tensor in step
                if tensor in onnx_values
                for name, value in tflite_values.items()
                if same_values(onnx_values[tensor], value)
            ]
            if names:
                found.found[node] = list(dict.fromkeys(names))
                if distance:
                    found.fused.add(node)
                break
        else:
            found.missing.append(node)
    logger.info("float nodes: %d found in the TFLite graph, %d not", len(found.found), len(found.missing))
    return found


def _float_outputs(model: bytes) -> set[str]:
    """The output tensors of the ops that compute in float in a quantized TFLite model."""
    interpreter = _interpreter(model)
    details = interpreter.get_tensor_details()
    return {
        details[index]["name"]
        for op in interpreter._get_ops_details()
        for index in op["outputs"]
        if np.dtype(details[index]["dtype"]).kind == "f"
    }


def quantize_keeping_float(
    converter: Any, find: Callable[[bytes], FloatOps], int8_io: bool
) -> tuple[bytes, FloatOps]:
    """Full-integer int8 from ``converter`` (set up for it, with its representative data),
    with the ops ``find`` picks from the calibrated float model kept in float.
    ``int8_io``: int8 inputs and outputs."""
    import tensorflow as tf

    debugger = tf.lite.experimental.QuantizationDebugger(converter=converter)  # calibrates once
    kept = find(debugger.calibrated_model)
    try:
        debugger.options = tf.lite.experimental.QuantizationDebugOptions(
            denylisted_nodes=kept.names, fully_quantize=int8_io
        )
    except ValueError as e:  # the debugger's check of its instrumented model
        raise ConversionError(
            f"TFLite selective quantization failed with {len(kept.names)} op(s) kept in float "
            f"({first_line(e)}); TensorFlow's quantization debugger says this when no op is left in int8"
        ) from e
    model: bytes = debugger.get_nondebug_quantized_model()
    floats = _float_outputs(model)
    kept.still_int8 = [name for name in kept.names if name not in floats]
    return model, kept
