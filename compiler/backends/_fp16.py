"""float16 ONNX: conversion with chosen nodes kept in float32, the graph verification runs,
and the error each node adds in float16.

Conversion is onnxconverter-common's, with two repairs for its block list. A tensor between
two kept nodes stays in float32: the converter casts it to float16 and back when it has
several consumers, which brings back the overflow the nodes were kept to avoid. A weight that
a kept node and a converted node share is given to the converted one as a float16 copy (the
converter leaves it float32 for both, and onnxruntime then refuses the graph).

onnxruntime's CPU provider has almost no float16 kernels: it casts an fp16 graph's weights
to float32 and computes it in float32, so a tensor that overflows float16 (over 65504 after
an ``Exp``, a ``Pow``, a large ``ReduceSum``) never shows on the build host, while a device
that computes in float16 (a GPU, TensorRT, an ARMv8.2 CPU) returns inf or NaN. Verification
therefore runs ``storage_twin``: the artifact with float32 arithmetic and every tensor the
artifact holds in float16 rounded to float16, as a device stores it. ``node_errors`` runs
the same twin of the whole-fp16 graph beside the float32 graph and ranks each tensor by the
error its producer adds, those whose float32 values leave float16's range first.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from bundle_runtime import session_options
from compiler._capture import captured_output
from compiler.backends._quantize import refuse_quantized
from compiler.runtime import OnnxRuntimeRunner, Runner, first_line
from compiler.tensors import SampleSet
from edgec.errors import ConversionError, OptionError
from edgec.manifest import Precision

if TYPE_CHECKING:
    import onnxruntime as ort

__all__ = [
    "FP16_MAX",
    "NodeError",
    "StorageTwinRunner",
    "fp16_runner",
    "node_errors",
    "storage_twin",
    "to_fp16",
]

logger = logging.getLogger(__name__)
FP16_MAX = 65504.0  # the largest finite float16
SAMPLES = 8  # samples the per-node error is measured on
SQNR_CEILING_DB = 80.0  # float16 rounds to ~66 dB; past this a tensor is as good as exact
SQNR_FLOOR_DB = -100.0  # a tensor that became inf or NaN where float32 is finite
SHOWN = 8  # kept node names listed in a note
_TWIN_SUFFIX = "__edgec_f32"  # a float16 tensor's value before the twin rounds it


def to_fp16(source: Path, target: Path, fp32_nodes: Iterable[str] = ()) -> list[str]:
    """Convert to float16 with float32 inputs and outputs; the nodes named in ``fp32_nodes``
    (and Constant nodes that feed only them) stay in float32 with their weights, and the
    tensors between them never pass through float16. Returns notes for the report."""
    from onnxconverter_common import float16

    model = onnx.load(str(source))
    refuse_quantized(model, Precision.FP16)
    kept = _kept_nodes(model, tuple(fp32_nodes))
    original = {n.name for n in model.graph.node}
    float_outputs = {o.name for o in model.graph.output if o.type.tensor_type.elem_type == TensorProto.FLOAT}
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            converted = float16.convert_float_to_float16(
                model, keep_io_types=True, max_finite_val=FP16_MAX, node_block_list=sorted(kept)
            )
    except Exception as e:
        raise ConversionError(f"fp16 conversion failed: {first_line(e)}") from e
    if kept:
        _skip_float16_round_trips(converted.graph, original)
        _float32_outputs(converted.graph, float_outputs, original)
        _split_shared_weights(converted.graph, kept, set(float16.DEFAULT_OP_BLOCK_LIST))
    _retarget_float_casts(converted)
    onnx.save(converted, str(target))
    notes = []
    truncated = sum("truncated" in str(w.message) for w in caught)
    if truncated:
        notes.append(f"{truncated} weight value(s) outside float16's range were clamped")
    chosen = [n for n in fp32_nodes if n in kept]
    if chosen:
        more = f" and {len(chosen) - SHOWN} more" if len(chosen) > SHOWN else ""
        notes.append(f"{len(chosen)} node(s) kept in float32: {', '.join(chosen[:SHOWN])}{more}")
    return notes


def _kept_nodes(model: onnx.ModelProto, fp32_nodes: tuple[str, ...]) -> set[str]:
    """``fp32_nodes`` and the Constant nodes whose every consumer is among them."""
    names = {n.name for n in model.graph.node}
    unknown = [n for n in fp32_nodes if n not in names]
    if unknown:
        raise OptionError(f"fp16: no node named {', '.join(map(repr, unknown[:5]))} in the graph")
    kept = set(fp32_nodes)
    consumers: dict[str, set[str]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, set()).add(node.name)
    for node in model.graph.node:
        users = consumers.get(node.output[0], set()) if node.output else set()
        if node.op_type == "Constant" and users and users <= kept:
            kept.add(node.name)
    return kept


def _cast_to(node: onnx.NodeProto) -> int | None:
    return next((a.i for a in node.attribute if a.name == "to"), None) if node.op_type == "Cast" else None


def _skip_float16_round_trips(graph: onnx.GraphProto, original: set[str]) -> None:
    """Wire each consumer of a converter-made ``Cast(float16) -> Cast(float)`` pair to the
    float32 tensor before it, and drop the casts nobody reads any more. A pair that makes a
    graph output keeps its second Cast, fed the float32 tensor (a copy)."""
    producers = {out: node for node in graph.node for out in node.output}
    outputs = {o.name for o in graph.output}
    shortcut: dict[str, str] = {}
    for node in graph.node:
        if node.name in original or _cast_to(node) != TensorProto.FLOAT:
            continue
        first = producers.get(node.input[0])
        if first is None or first.name in original or _cast_to(first) != TensorProto.FLOAT16:
            continue
        if node.output[0] in outputs:
            node.input[0] = first.input[0]
        else:
            shortcut[node.output[0]] = first.input[0]
    for node in graph.node:
        node.input[:] = [shortcut.get(name, name) for name in node.input]
    while True:  # casts left without a reader, the second of each pair first
        read = {name for node in graph.node for name in node.input} | outputs
        dead = [
            n
            for n in graph.node
            if n.name not in original and n.op_type == "Cast" and n.output[0] not in read
        ]
        if not dead:
            return
        for node in dead:
            graph.node.remove(node)


def _float32_outputs(graph: onnx.GraphProto, float_outputs: set[str], original: set[str]) -> None:
    """Keep float32 outputs float32: with a kept node last, onnxconverter-common drops the
    output's Cast back to float and declares the output float16."""
    producers = {out: node for node in graph.node for out in node.output}
    for output in graph.output:
        if output.name not in float_outputs or output.type.tensor_type.elem_type != TensorProto.FLOAT16:
            continue
        output.type.tensor_type.elem_type = TensorProto.FLOAT
        producer = producers.get(output.name)
        if producer is not None and producer.name not in original and _cast_to(producer) is not None:
            del producer.attribute[:]  # its input is float32: the Cast becomes a copy
            producer.attribute.append(helper.make_attribute("to", TensorProto.FLOAT))
            continue
        half = f"{output.name}_fp16"
        for node in graph.node:
            node.output[:] = [half if name == output.name else name for name in node.output]
            node.input[:] = [half if name == output.name else name for name in node.input]
        graph.node.append(helper.make_node("Cast", [half], [output.name], to=TensorProto.FLOAT))


def _split_shared_weights(graph: onnx.GraphProto, kept: set[str], kept_ops: set[str]) -> None:
    """Give the converted consumers of a float32 weight that a kept node also reads a
    float16 copy of it (the converter leaves the weight float32 for all of them)."""
    weights = {init.name: init for init in graph.initializer if init.data_type == TensorProto.FLOAT}
    copies: dict[str, str] = {}
    for node in graph.node:
        if node.name in kept or node.op_type in kept_ops or node.op_type == "Cast":
            continue
        for i, name in enumerate(node.input):
            if name not in weights:
                continue
            if name not in copies:
                value = numpy_helper.to_array(weights[name])
                half = np.clip(value, -FP16_MAX, FP16_MAX).astype(np.float16)
                copies[name] = f"{name}_fp16"
                graph.initializer.append(numpy_helper.from_array(half, copies[name]))
            node.input[i] = copies[name]


def _retarget_float_casts(model: onnx.ModelProto) -> None:
    """Make inner ``Cast(to=float)`` nodes cast to float16, as the converter typed their outputs.

    onnxconverter-common retypes a Cast's output to float16 but leaves ``to=FLOAT`` (an
    int64 -> float cast feeding an fp16 MatMul, say), which onnxruntime rejects.
    """
    fp16_tensors = {
        vi.name for vi in model.graph.value_info if vi.type.tensor_type.elem_type == TensorProto.FLOAT16
    }
    for node in model.graph.node:
        if node.op_type != "Cast" or node.output[0] not in fp16_tensors:
            continue
        for attr in node.attribute:
            if attr.name == "to" and attr.i == TensorProto.FLOAT:
                attr.i = TensorProto.FLOAT16


def _float16_tensors(model: onnx.ModelProto) -> set[str]:
    """Names of the node outputs that hold float16, from shape inference where it works."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception as e:  # a graph onnx cannot infer: its declared types are used
        logger.info("shape inference failed, using declared types: %s", first_line(e))
        inferred = model
    graph = inferred.graph
    values = [*graph.value_info, *graph.output]
    return {v.name for v in values if v.type.tensor_type.elem_type == TensorProto.FLOAT16}


def _upcast_attributes(node: onnx.NodeProto) -> None:
    for attr in node.attribute:
        if attr.name == "to" and node.op_type == "Cast" and attr.i == TensorProto.FLOAT16:
            attr.i = TensorProto.FLOAT
        if attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type == TensorProto.FLOAT16:
            attr.t.CopyFrom(
                numpy_helper.from_array(numpy_helper.to_array(attr.t).astype(np.float32), attr.t.name)
            )


def storage_twin(fp16_model: onnx.ModelProto) -> onnx.ModelProto:
    """The same graph with float32 arithmetic and float16 storage: each float16 weight is
    widened (exactly), and each tensor the model holds in float16 is rounded to float16 by a
    ``Cast(float16) -> Cast(float)`` pair after the node that makes it. The rounded tensor
    keeps its name, so the twin's tensors line up with the source's."""
    twin = onnx.ModelProto()
    twin.CopyFrom(fp16_model)
    graph = twin.graph
    half = _float16_tensors(twin)
    for init in graph.initializer:
        if init.data_type == TensorProto.FLOAT16:
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float32), init.name))
    nodes: list[onnx.NodeProto] = []
    for node in graph.node:
        _upcast_attributes(node)
        nodes.append(node)
        for i, name in enumerate(node.output):
            if name not in half:
                continue
            wide = f"{name}{_TWIN_SUFFIX}"
            node.output[i] = wide
            nodes.append(helper.make_node("Cast", [wide], [f"{wide}_16"], to=TensorProto.FLOAT16))
            nodes.append(helper.make_node("Cast", [f"{wide}_16"], [name], to=TensorProto.FLOAT))
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.value_info[:]  # float16 declarations no longer hold: onnxruntime infers the types
    for value in [*graph.input, *graph.output]:
        if value.type.tensor_type.elem_type == TensorProto.FLOAT16:
            value.type.tensor_type.elem_type = TensorProto.FLOAT
    return twin


class StorageTwinRunner:
    """Runs an fp16 ONNX artifact as a device that stores float16 would (``storage_twin``),
    after checking that onnxruntime loads the artifact itself. The twin is written to
    ``workdir``, outside the artifact."""

    def __init__(self, path: Path, workdir: Path) -> None:
        OnnxRuntimeRunner(path)  # the artifact must load as it is shipped
        twin_path = workdir / f"{path.stem}.fp16-storage.onnx"
        try:
            onnx.save(storage_twin(onnx.load(str(path))), str(twin_path))
            self._runner = OnnxRuntimeRunner(twin_path)
        except Exception as e:  # the twin is a check of ours: its failure is named, not hidden
            raise ConversionError(
                f"cannot emulate float16 storage for {path.name}: {first_line(e)}; "
                "build at fp32 or report the model"
            ) from e

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self._runner.run(feeds)


@dataclass(frozen=True)
class NodeError:
    """One float tensor of the source graph, as the float16 graph computes it."""

    tensor: str
    producer: str
    op: str
    max_abs: float  # largest magnitude in the float32 graph
    sqnr_db: float  # float16 against float32, all the error up to this tensor
    added_db: float  # how much worse than its producer's worst input: the producer's own share

    @property
    def overflows(self) -> bool:
        return self.max_abs > FP16_MAX

    def described(self) -> str:
        if self.overflows:
            return f"{self.tensor} ({self.op}, max |x| {self.max_abs:.3g} > {FP16_MAX:g})"
        return f"{self.tensor} ({self.op}, {self.added_db:.1f} dB lost)"

    def as_dict(self) -> dict[str, object]:
        return {
            "tensor": self.tensor,
            "producer": self.producer,
            "op": self.op,
            "max_abs": self.max_abs,
            "fp16_sqnr_db": round(self.sqnr_db, 2),
            "added_db": round(self.added_db, 2),
        }


def _exposed(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """``model`` with ``names`` added to its outputs (types left to onnxruntime)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    present = {o.name for o in out.graph.output}
    out.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names if n not in present)
    return out


def _float_tensors(model: onnx.ModelProto) -> list[str]:
    """Node outputs of the top-level graph that hold float32."""
    inferred = onnx.shape_inference.infer_shapes(model)
    values = [*inferred.graph.value_info, *inferred.graph.output]
    floats = {v.name for v in values if v.type.tensor_type.elem_type == TensorProto.FLOAT}
    return [out for node in model.graph.node for out in node.output if out in floats]


class _Stats:
    def __init__(self) -> None:
        self.signal = 0.0
        self.noise = 0.0
        self.broken = False  # inf or NaN in float16 where float32 is finite
        self.max_abs = 0.0

    def add(self, ref: np.ndarray, test: np.ndarray) -> None:
        if ref.dtype.kind != "f" or np.shape(ref) != np.shape(test):
            return
        r = np.asarray(ref, np.float64)
        if not np.isfinite(r).all():
            return
        t = np.asarray(test, np.float64)
        self.max_abs = max(self.max_abs, float(np.abs(r).max(initial=0.0)))
        if not np.isfinite(t).all():
            self.broken = True
            return
        self.signal += float(np.sum(r * r))
        self.noise += float(np.sum((r - t) ** 2))

    def db(self) -> float:
        if self.broken:
            return SQNR_FLOOR_DB
        if self.noise == 0.0:
            return SQNR_CEILING_DB
        if self.signal == 0.0:
            return SQNR_FLOOR_DB
        return float(np.clip(10 * np.log10(self.signal / self.noise), SQNR_FLOOR_DB, SQNR_CEILING_DB))


def _session(model: onnx.ModelProto, path: Path) -> ort.InferenceSession:
    import onnxruntime as ort

    onnx.save(model, str(path))
    return ort.InferenceSession(str(path), session_options({}), providers=["CPUExecutionProvider"])


def node_errors(source: Path, samples: SampleSet, workdir: Path) -> list[NodeError]:
    """Each float tensor of ``source`` (and each weight past float16's range) as the float16
    graph computes it, worst first: tensors whose float32 values leave float16's range, by
    magnitude, then by the error their producer adds (``added_db``)."""
    model = onnx.load(str(source))
    half = workdir / "fp16-whole.onnx"
    to_fp16(source, half)
    names = _float_tensors(model)
    with captured_output():
        reference = _session(_exposed(model, names), workdir / "fp32-exposed.onnx")
        twin = _session(_exposed(storage_twin(onnx.load(str(half))), names), workdir / "fp16-exposed.onnx")
    twin_names = {o.name for o in twin.get_outputs()}
    names = [n for n in names if n in twin_names]
    stats = {name: _Stats() for name in names}
    for feed in samples.head(SAMPLES):
        ref = dict(zip(names, reference.run(names, feed), strict=True))
        test = dict(zip(names, twin.run(names, feed), strict=True))
        for name in names:
            stats[name].add(np.asarray(ref[name]), np.asarray(test[name]))
    return _ranked(model, stats)


def _ranked(model: onnx.ModelProto, stats: dict[str, _Stats]) -> list[NodeError]:
    db = {name: s.db() for name, s in stats.items()}
    found = []
    for node in model.graph.node:
        inputs = [db[name] for name in node.input if name in db]
        before = min(inputs, default=SQNR_CEILING_DB)
        for name in node.output:
            if name in stats:
                found.append(
                    NodeError(
                        name,
                        node.name,
                        node.op_type,
                        stats[name].max_abs,
                        db[name],
                        max(0.0, before - db[name]),
                    )
                )
    for init in model.graph.initializer:
        if init.data_type == TensorProto.FLOAT:
            peak = float(np.abs(numpy_helper.to_array(init)).max(initial=0.0))
            if peak > FP16_MAX:  # clamped by the conversion: its consumers must keep it float32
                found.append(NodeError(init.name, "", "weight", peak, SQNR_FLOOR_DB, 0.0))
    return sorted(found, key=lambda e: (not e.overflows, -e.max_abs if e.overflows else -e.added_db))


def fp16_runner(
    path: Path, workdir: Path, notes: list[str], runtime_config: dict[str, str] | None = None
) -> Runner:
    """The runner an fp16 artifact is verified with: float16 storage emulated; where the
    emulation cannot load the graph (our limit, not the artifact's), onnxruntime as it runs
    the artifact, with a note that says so."""
    try:
        return StorageTwinRunner(path, workdir)
    except ConversionError as e:
        runner = (
            OnnxRuntimeRunner(path) if runtime_config is None else OnnxRuntimeRunner(path, runtime_config)
        )
        notes.append(f"verified as onnxruntime's CPU provider runs it (float32 compute): {first_line(e)}")
        return runner
