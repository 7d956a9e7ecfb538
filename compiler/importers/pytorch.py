"""PyTorch sources: a ``torch.export`` program saved with ``torch.export.save`` (``.pt2``).

Imported with the torch.export-based ONNX exporter; the program itself (``.module()``) is
the reference. Works with the CPU wheel of torch.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from compiler._capture import call_quietly, captured_output
from compiler.importers import Imported, fix_shape
from compiler.limits import MemoryBudget, format_size
from compiler.runtime import first_line
from edgec.errors import ConversionError, ModelLoadError

__all__ = ["import_pytorch"]

logger = logging.getLogger(__name__)
OPSET = 18  # the lowest the torch.export-based exporter emits


class ExportedProgramRunner:
    def __init__(self, program: Any, input_names: list[str], output_names: list[str]) -> None:
        self._module = program.module()
        self._inputs = input_names
        self._outputs = output_names

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        with torch.no_grad():
            result = self._module(*[torch.from_numpy(np.asarray(feeds[n])) for n in self._inputs])
        flat = list(result) if isinstance(result, (tuple, list)) else [result]
        return {name: t.detach().numpy() for name, t in zip(self._outputs, flat, strict=True)}


def _user_inputs(program: Any) -> list[tuple[str, list[int | None], Any]]:
    from torch.export.graph_signature import InputKind

    placeholders = {n.name: n for n in program.graph.nodes if n.op == "placeholder"}
    found = []
    for spec in program.graph_signature.input_specs:
        if spec.kind != InputKind.USER_INPUT:
            continue
        value = placeholders[spec.arg.name].meta["val"]
        shape = [d if isinstance(d, int) else None for d in value.shape]
        found.append((spec.arg.name, shape, value.dtype))
    return found


def import_pytorch(
    path: Path, shapes: Mapping[str, list[int]], workdir: Path, budget: MemoryBudget | None = None
) -> Imported:
    with captured_output():
        import torch

    try:
        program = torch.export.load(str(path))
    except Exception as e:
        raise ModelLoadError(f"torch.export cannot load {path}: {first_line(e)}") from e
    inputs = _user_inputs(program)
    names = [name for name, _, _ in inputs]
    fixed = [(fix_shape(n, s, shapes), t) for n, s, t in inputs]
    need = sum(math.prod(shape) * t.itemsize for shape, t in fixed)
    if budget is not None:
        shown = ", ".join(f"{n!r} {shape}" for n, (shape, _) in zip(names, fixed, strict=True))
        head = f"the example inputs to trace the model ({shown}) need {format_size(need)}"
        budget.check(need, head, "set a smaller --input-shape")
    examples = tuple(torch.zeros(shape, dtype=t) for shape, t in fixed)
    onnx_path = workdir / "imported.onnx"
    run = call_quietly(
        lambda: torch.onnx.export(
            program, examples, str(onnx_path), input_names=names, opset_version=OPSET, dynamo=True
        )
    )
    if run.failure is not None:
        raise ConversionError(f"torch.onnx could not export {path.name}: {first_line(run.failure)}")
    output_names = [o.name for o in onnx.load(str(onnx_path), load_external_data=False).graph.output]
    return Imported(onnx_path=onnx_path, runner=lambda: ExportedProgramRunner(program, names, output_names))
