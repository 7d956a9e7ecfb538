"""Graph preparation: the one ONNX graph every backend starts from.

Fixes dynamic input dimensions (symbolic, unknown, or a negative ``dim_value``), sanitizes
node and tensor names (converters such as onnx2tf choke on names that collide once it
rewrites ``:`` and ``/``, and on names TensorFlow refuses), and runs shape inference so every
tensor has a static shape. What was renamed is kept, to name things as the source does in
reports. Inputs a deployment fixes (``--freeze``) become constants, and what they decide is
folded away (``compiler.freeze``). A source that ships quantized is rewritten to the float
graph it computes (``compiler.dequantize``), so it can be halved, requantized or converted.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

from compiler.dequantize import dequantize
from compiler.freeze import fold_frozen, fold_shape_decided_ifs, freeze_inputs
from compiler.importers import Imported
from compiler.runtime import first_line
from edgec.errors import ModelLoadError, ShapeSpecError
from edgec.manifest import Layout, TensorSpec

__all__ = [
    "PreparedModel",
    "converter_copy",
    "converter_names",
    "graph_nodes",
    "parse_input_shapes",
    "prepare",
]

logger = logging.getLogger(__name__)
_SPEC = re.compile(r"^(?P<name>[^=]+)=(?P<dims>\d+(,\d+)*)$")
_UNSAFE = re.compile(r"[^A-Za-z0-9_]")
_SAFE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
MAX_NAME = 64  # longer node and tensor names are shortened (with a hash) for the converters


@dataclass(frozen=True)
class PreparedModel:
    path: Path
    model: onnx.ModelProto
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    opset: int
    tf_saved_model: Path | None = None  # the source's own serving SavedModel (TensorFlow family)
    channels_last: bool = False  # the graph's image inputs are NHWC already
    # names prepare gave nodes and tensors -> their names in the source model, for reports
    renamed_nodes: dict[str, str] = field(default_factory=dict)
    renamed_tensors: dict[str, str] = field(default_factory=dict)
    # inputs of the source replaced by constants (--freeze): no longer inputs of the graph
    frozen: dict[str, np.ndarray] = field(default_factory=dict)
    # a quantized source rewritten to its float equivalent: op type -> nodes rewritten
    dequantized: dict[str, int] = field(default_factory=dict)

    def node_label(self, name: str) -> str:
        """A node's name, with its name in the source model when prepare renamed it."""
        source = self.renamed_nodes.get(name)
        return name if source is None else f"{name} (source: {source or 'unnamed'})"

    def tensor_label(self, name: str) -> str:
        source = self.renamed_tensors.get(name)
        return name if source is None else f"{name} (source: {source})"


def parse_input_shapes(specs: Sequence[str]) -> dict[str, list[int]]:
    """``["x=1,3,224,224"]`` -> ``{"x": [1, 3, 224, 224]}``. Raises ``ShapeSpecError``."""
    shapes: dict[str, list[int]] = {}
    for spec in specs:
        match = _SPEC.match(spec.strip())
        if not match:
            raise ShapeSpecError(
                f"bad --input-shape {spec!r}: expected NAME=D0,D1,... with positive integers, "
                "e.g. x=1,3,224,224"
            )
        dims = [int(d) for d in match["dims"].split(",")]
        if any(d <= 0 for d in dims):
            raise ShapeSpecError(f"bad --input-shape {spec!r}: dimensions must be positive")
        name = match["name"]
        if name in shapes:
            raise ShapeSpecError(f"--input-shape gives {name!r} twice")
        shapes[name] = dims
    return shapes


def load_onnx(path: Path) -> onnx.ModelProto:
    try:
        model = onnx.load(str(path))
        onnx.checker.check_model(model)
    except Exception as e:  # protobuf and onnx raise many untyped errors
        detail = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise ModelLoadError(f"{path} is not a valid ONNX model ({detail}); re-export it") from e
    return model


def graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """Real inputs: graph inputs that are not initializers (older exporters list both)."""
    initializers = {init.name for init in model.graph.initializer}
    return [vi for vi in model.graph.input if vi.name not in initializers]


def _dynamic(dim: onnx.TensorShapeProto.Dimension) -> bool:
    """A symbolic or unknown dimension, or a negative ``dim_value``: paddle2onnx and some older
    exporters write ``-1`` for a dynamic axis, and onnxruntime treats it as one."""
    return not dim.HasField("dim_value") or dim.dim_value < 0


def _fix_input_dims(model: onnx.ModelProto, shapes: Mapping[str, list[int]]) -> None:
    inputs = {vi.name: vi for vi in graph_inputs(model)}
    unknown = sorted(set(shapes) - set(inputs))
    if unknown:
        raise ShapeSpecError(
            f"--input-shape names {', '.join(map(repr, unknown))}, which the model does not "
            f"have; its inputs are {', '.join(map(repr, inputs))}"
        )
    for name, vi in inputs.items():
        dims = vi.type.tensor_type.shape.dim
        if name in shapes:
            wanted = shapes[name]
            if len(wanted) != len(dims):
                raise ShapeSpecError(
                    f"--input-shape {name}={','.join(map(str, wanted))} has rank {len(wanted)}, "
                    f"the model's input {name!r} has rank {len(dims)}"
                )
            for dim, value in zip(dims, wanted, strict=True):
                if not _dynamic(dim) and dim.dim_value != value:
                    raise ShapeSpecError(
                        f"--input-shape for {name!r} sets a dimension to {value}, but the "
                        f"model fixes it at {dim.dim_value}"
                    )
                dim.dim_value = value
            continue
        for axis, dim in enumerate(dims):
            if not _dynamic(dim):
                continue
            if axis == 0:
                dim.dim_value = 1  # a dynamic batch axis: build for one sample at a time
                continue
            label = dim.dim_param or (str(dim.dim_value) if dim.HasField("dim_value") else "?")
            raise ShapeSpecError(
                f"input {name!r} has a dynamic dimension {label!r} at axis {axis}; fix it "
                f"with --input-shape {name}=D0,D1,..."
            )


def _subgraphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """``graph`` and every graph nested in its nodes' attributes (If, Loop, Scan bodies)."""
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _subgraphs(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    yield from _subgraphs(sub)


def graph_nodes(model: onnx.ModelProto) -> Iterator[onnx.NodeProto]:
    """Every node of the model, in its subgraphs too."""
    for graph in _subgraphs(model.graph):
        yield from graph.node


def _safe_name(name: str, taken: set[str], prefix: str) -> str:
    """``name`` as ``[A-Za-z0-9_]`` only, not starting with a digit, at most ``MAX_NAME``
    characters (a hash of the whole keeps long names apart), and not in ``taken``."""
    safe = _UNSAFE.sub("_", name)
    if not safe or safe[0].isdigit():
        safe = f"{prefix}_{safe}"
    if len(safe) > MAX_NAME:
        digest = hashlib.sha256(name.encode()).hexdigest()[:8]
        safe = f"{safe[: MAX_NAME - 9]}_{digest}"
    candidate, suffix = safe, 1
    while candidate in taken:
        candidate, suffix = f"{safe}_{suffix}", suffix + 1
    taken.add(candidate)
    return candidate


def _sanitize_node_names(graph: onnx.GraphProto) -> dict[str, str]:
    """Give every node (in subgraphs too) a unique ``[A-Za-z0-9_]`` name.

    Returns ``{new name: name in the source}`` for the nodes renamed (an unnamed node's
    source name is ``""``).
    """
    taken: set[str] = set()
    renamed: dict[str, str] = {}
    for sub in _subgraphs(graph):
        for index, node in enumerate(sub.node):
            name = node.name or f"{node.op_type}_{index}"
            if _SAFE.match(name) and len(name) <= MAX_NAME and name not in taken:
                taken.add(name)
            else:
                name = _safe_name(name, taken, "n")
            if name != node.name:
                renamed[name] = node.name
                node.name = name
    return renamed


def _sanitize_tensor_names(model: onnx.ModelProto) -> dict[str, str]:
    """Rename the tensors converters choke on (onnx2tf: names that collide once it rewrites
    ``:`` and a leading ``/``, names TensorFlow refuses as scopes) to unique ``[A-Za-z0-9_]``
    names, in every subgraph. The model's own inputs and outputs keep their names: they are
    the user's contract (data files, manifests); ``converter_copy`` renames those for a
    converter. Returns ``{new name: name in the source}``."""
    keep = {vi.name for vi in graph_inputs(model)} | {vi.name for vi in model.graph.output} | {""}
    graphs = list(_subgraphs(model.graph))
    used: dict[str, None] = {}
    for g in graphs:
        for vi in [*g.input, *g.output, *g.value_info]:
            used[vi.name] = None
        for init in g.initializer:
            used[init.name] = None
        for node in g.node:
            used.update(dict.fromkeys([*node.input, *node.output]))
    taken = set(used)
    renames = {
        name: _safe_name(name, taken, "t")
        for name in used
        if name not in keep and not (_SAFE.match(name) and len(name) <= MAX_NAME)
    }
    if not renames:
        return {}
    for g in graphs:
        for vi in [*g.input, *g.output, *g.value_info]:
            vi.name = renames.get(vi.name, vi.name)
        for init in g.initializer:
            init.name = renames.get(init.name, init.name)
        for sparse in g.sparse_initializer:
            sparse.values.name = renames.get(sparse.values.name, sparse.values.name)
        for node in g.node:
            node.input[:] = [renames.get(n, n) for n in node.input]
            node.output[:] = [renames.get(n, n) for n in node.output]
    return {new: old for old, new in renames.items()}


def converter_names(prepared: PreparedModel) -> dict[str, str]:
    """``{model's name: name for a converter}`` for every input and output: names a converter
    that turns them into TensorFlow scopes and signature keys takes (onnx2tf refuses an output
    named ``out put``, and serves an input named ``0`` as ``arg_0``)."""
    names = list(dict.fromkeys([t.name for t in prepared.inputs] + [t.name for t in prepared.outputs]))
    keep = {n for n in names if _SAFE.match(n) and n[0].isalpha() and len(n) <= MAX_NAME}
    taken = (_tensor_names(prepared.model) - set(names)) | keep
    return {
        n: n if n in keep else _safe_name(n if n[:1].isalpha() else f"io_{n}", taken, "io") for n in names
    }


def converter_copy(prepared: PreparedModel) -> tuple[onnx.ModelProto, dict[str, str]]:
    """The prepared graph with its inputs and outputs renamed by ``converter_names`` (the
    prepared graph keeps the user's names); returns the copy and the names."""
    mapping = converter_names(prepared)
    model = onnx.ModelProto()
    model.CopyFrom(prepared.model)
    for g in _subgraphs(model.graph):
        for vi in [*g.input, *g.output, *g.value_info]:
            vi.name = mapping.get(vi.name, vi.name)
        for node in g.node:
            node.input[:] = [mapping.get(n, n) for n in node.input]
            node.output[:] = [mapping.get(n, n) for n in node.output]
    return model, mapping


def _tensor_names(model: onnx.ModelProto) -> set[str]:
    names: set[str] = set()
    for g in _subgraphs(model.graph):
        names.update(init.name for init in g.initializer)
        names.update(vi.name for vi in [*g.input, *g.output, *g.value_info])
        for node in g.node:
            names.update([*node.input, *node.output])
    return names


def _layout(shape: list[int]) -> Layout:
    if len(shape) == 4:
        if shape[1] in (1, 3, 4) and shape[2] > 4 and shape[3] > 4:
            return Layout.NCHW
        if shape[3] in (1, 3, 4) and shape[1] > 4 and shape[2] > 4:
            return Layout.NHWC
    return Layout.ANY


def tensor_spec(vi: onnx.ValueInfoProto) -> TensorSpec:
    ttype = vi.type.tensor_type
    shape = [d.dim_value if d.HasField("dim_value") else -1 for d in ttype.shape.dim]
    dtype = helper.tensor_dtype_to_np_dtype(ttype.elem_type).name
    return TensorSpec(name=vi.name, shape=shape, dtype=dtype, layout=_layout(shape))


def prepare(
    source: Path,
    input_shapes: Mapping[str, list[int]],
    workdir: Path,
    imported: Imported | None = None,
    freeze: Mapping[str, str] | None = None,
) -> PreparedModel:
    """Load, freeze and fold, fix shapes, sanitize, infer shapes; save as
    ``workdir/prepared.onnx``. ``freeze`` maps inputs to their values as written on the
    command line (``--freeze``)."""
    model = load_onnx(source)
    # None: some quantized op has no rewrite (refused later, by the precisions that cannot take it)
    dequantized: Mapping[str, int] = dequantize(model) or {}
    frozen: dict[str, np.ndarray] = {}
    if freeze:
        frozen = freeze_inputs(model, graph_inputs(model), freeze, input_shapes)
        fold_frozen(model, frozen)
    _fix_input_dims(model, {k: v for k, v in input_shapes.items() if k not in frozen})
    fold_shape_decided_ifs(model)  # the shapes are static now
    renamed_nodes = _sanitize_node_names(model.graph)
    renamed_tensors = _sanitize_tensor_names(model)
    del model.graph.value_info[:]
    for out in model.graph.output:
        for dim in out.type.tensor_type.shape.dim:
            if _dynamic(dim):
                dim.Clear()
    try:
        model = onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception as e:
        raise ModelLoadError(f"shape inference failed on {source.name}: {first_line(e)}") from e
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    path = workdir / "prepared.onnx"
    onnx.save(model, str(path))
    inputs = [tensor_spec(vi) for vi in graph_inputs(model)]
    outputs = [tensor_spec(vi) for vi in model.graph.output]
    logger.info(
        "prepared %s: opset %d, %d node(s) and %d tensor(s) renamed",
        source.name,
        opset,
        len(renamed_nodes),
        len(renamed_tensors),
    )
    return PreparedModel(
        path=path,
        model=model,
        inputs=inputs,
        outputs=outputs,
        opset=opset,
        tf_saved_model=imported.tf_saved_model if imported else None,
        channels_last=imported.channels_last if imported else False,
        renamed_nodes=renamed_nodes,
        renamed_tensors=renamed_tensors,
        frozen=frozen,
        dequantized=dict(dequantized),
    )
