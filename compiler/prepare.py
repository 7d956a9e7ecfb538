"""Graph preparation: the one ONNX graph every backend starts from.

Fixes dynamic input dimensions, sanitizes node names (converters such as onnx2tf choke on
``/`` and ``:``), and runs shape inference so every tensor has a static shape.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import onnx
from onnx import helper

from compiler.importers import Imported
from compiler.runtime import first_line
from edgec.errors import ModelLoadError, ShapeSpecError
from edgec.manifest import Layout, TensorSpec

__all__ = ["PreparedModel", "parse_input_shapes", "prepare"]

logger = logging.getLogger(__name__)
_SPEC = re.compile(r"^(?P<name>[^=]+)=(?P<dims>\d+(,\d+)*)$")
_UNSAFE = re.compile(r"[^A-Za-z0-9_]")


@dataclass(frozen=True)
class PreparedModel:
    path: Path
    model: onnx.ModelProto
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    opset: int
    tf_saved_model: Path | None = None  # the source's own serving SavedModel (TensorFlow family)
    channels_last: bool = False  # the graph's image inputs are NHWC already


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
                if dim.HasField("dim_value") and dim.dim_value != value:
                    raise ShapeSpecError(
                        f"--input-shape for {name!r} sets a dimension to {value}, but the "
                        f"model fixes it at {dim.dim_value}"
                    )
                dim.dim_value = value
            continue
        for axis, dim in enumerate(dims):
            if dim.HasField("dim_value"):
                continue
            if axis == 0:
                dim.dim_value = 1  # a dynamic batch axis: build for one sample at a time
                continue
            label = dim.dim_param or "?"
            raise ShapeSpecError(
                f"input {name!r} has a dynamic dimension {label!r} at axis {axis}; fix it "
                f"with --input-shape {name}=D0,D1,..."
            )


def _sanitize_node_names(graph: onnx.GraphProto) -> int:
    """Give every node a unique ``[A-Za-z0-9_]`` name. Returns how many were renamed."""
    seen: set[str] = set()
    renamed = 0
    for index, node in enumerate(graph.node):
        name = _UNSAFE.sub("_", node.name) or f"{node.op_type}_{index}"
        if name[0].isdigit():
            name = f"n_{name}"
        base, suffix = name, 1
        while name in seen:
            name, suffix = f"{base}_{suffix}", suffix + 1
        seen.add(name)
        if name != node.name:
            node.name = name
            renamed += 1
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                renamed += _sanitize_node_names(attr.g)
    return renamed


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
    source: Path, input_shapes: Mapping[str, list[int]], workdir: Path, imported: Imported | None = None
) -> PreparedModel:
    """Load, fix shapes, sanitize, infer shapes; save as ``workdir/prepared.onnx``."""
    model = load_onnx(source)
    _fix_input_dims(model, input_shapes)
    renamed = _sanitize_node_names(model.graph)
    del model.graph.value_info[:]
    for out in model.graph.output:
        for dim in out.type.tensor_type.shape.dim:
            if not dim.HasField("dim_value"):
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
    logger.info("prepared %s: opset %d, %d node(s) renamed", source.name, opset, renamed)
    return PreparedModel(
        path=path,
        model=model,
        inputs=inputs,
        outputs=outputs,
        opset=opset,
        tf_saved_model=imported.tf_saved_model if imported else None,
        channels_last=imported.channels_last if imported else False,
    )
