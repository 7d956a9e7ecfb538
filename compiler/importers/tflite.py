"""TFLite (.tflite) sources: imported with tf2onnx, run in LiteRT as the reference."""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from compiler._capture import call_quietly, captured_output
from compiler.importers import Imported
from compiler.runtime import first_line
from edgec.errors import ConversionError, ModelLoadError

__all__ = ["import_tflite"]

logger = logging.getLogger(__name__)
OPSET = 17


def _clean(name: str) -> str:
    """``serving_default_x:0`` -> ``x``; ``StatefulPartitionedCall:0`` stays readable."""
    name = re.sub(r":\d+$", "", name)
    return name.removeprefix("serving_default_")


class TfliteRunner:
    def __init__(self, path: Path) -> None:
        from ai_edge_litert.interpreter import Interpreter

        with captured_output():
            self._interpreter = Interpreter(model_path=str(path), num_threads=2)
            self._interpreter.allocate_tensors()
        self.input_details = self._interpreter.get_input_details()
        self._outputs = self._interpreter.get_output_details()

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        for d in self.input_details:
            self._interpreter.set_tensor(d["index"], feeds[_clean(d["name"])].astype(d["dtype"]))
        self._interpreter.invoke()
        return {_clean(d["name"]): self._interpreter.get_tensor(d["index"]).copy() for d in self._outputs}


def _rename(model: onnx.ModelProto, renames: dict[str, str]) -> None:
    for value in [*model.graph.input, *model.graph.output]:
        value.name = renames.get(value.name, value.name)
    for node in model.graph.node:
        node.input[:] = [renames.get(n, n) for n in node.input]
        node.output[:] = [renames.get(n, n) for n in node.output]


def import_tflite(path: Path, shapes: Mapping[str, list[int]], workdir: Path) -> Imported:
    import tf2onnx

    try:
        runner = TfliteRunner(path)
    except Exception as e:
        raise ModelLoadError(f"LiteRT cannot load {path}: {first_line(e)}") from e
    if any(d["dtype"] == np.int8 or d["quantization"][0] for d in runner.input_details):
        raise ModelLoadError(f"{path} is a quantized TFLite model; give edgec the float model to convert")
    onnx_path = workdir / "imported.onnx"
    run = call_quietly(lambda: tf2onnx.convert.from_tflite(str(path), opset=OPSET))
    if run.failure is not None or run.value is None:
        reason = first_line(run.failure) if run.failure else "it returned no model"
        raise ConversionError(f"tf2onnx could not import {path.name}: {reason}")
    proto, _ = run.value
    renames: dict[str, Any] = {v.name: _clean(v.name) for v in [*proto.graph.input, *proto.graph.output]}
    _rename(proto, renames)
    onnx.save(proto, str(onnx_path))
    return Imported(onnx_path=onnx_path, runner=lambda: TfliteRunner(path), channels_last=True)
