"""Keras (.keras, .h5) and TensorFlow SavedModel sources.

Both become one ``tf.function`` with a fixed input signature and named outputs. From it come
the ONNX graph (tf2onnx), a serving SavedModel with a single concrete function (which the
TFLite converter and coremltools take), and the reference runner (the model itself, eager).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from compiler._capture import call_quietly, captured_output
from compiler.importers import Imported, fix_shape
from compiler.runtime import first_line
from edgec.errors import ConversionError, ModelLoadError

__all__ = ["import_keras", "import_saved_model"]

logger = logging.getLogger(__name__)
OPSET = 17


def _tf() -> Any:
    with captured_output():
        import tensorflow as tf
    return tf


class TfFunctionRunner:
    def __init__(self, function: Any, input_names: list[str], keep: Any) -> None:
        self._function = function
        self._names = input_names
        self._keep = keep  # the model whose variables the function reads

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        tf = _tf()
        outputs = self._function(*[tf.constant(feeds[n]) for n in self._names])
        return {name: value.numpy() for name, value in outputs.items()}


def _export(function: Any, spec: list[Any], keep: Any, workdir: Path) -> Imported:
    """Write the ONNX graph and the serving SavedModel for a fixed-signature function."""
    tf = _tf()
    import tf2onnx

    onnx_path = workdir / "imported.onnx"
    saved = workdir / "source-saved-model"
    module = tf.Module()
    module.keep = keep
    module.serve = function

    def convert() -> None:
        tf.saved_model.save(module, str(saved), signatures={"serving_default": function})
        tf2onnx.convert.from_function(function, input_signature=spec, opset=OPSET, output_path=str(onnx_path))

    run = call_quietly(convert)
    if run.failure is not None:
        raise ConversionError(f"tf2onnx could not import the model: {first_line(run.failure)}")
    names = [s.name for s in spec]
    return Imported(
        onnx_path=onnx_path,
        runner=lambda: TfFunctionRunner(function, names, keep),
        tf_saved_model=saved,
        channels_last=True,
    )


class KerasRunner:
    """The Keras model itself, called eagerly: the reference for a Keras source."""

    def __init__(self, model: Any, input_names: list[str], output_names: list[str]) -> None:
        self._model = model
        self._inputs = input_names
        self._outputs = output_names

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        tf = _tf()
        args = [feeds[n] for n in self._inputs]
        result = self._model(args if len(args) > 1 else args[0], training=False)
        flat = tf.nest.flatten(result)
        return {name: np.asarray(value) for name, value in zip(self._outputs, flat, strict=True)}


def import_keras(path: Path, shapes: Mapping[str, list[int]], workdir: Path) -> Imported:
    """Keras 3 exports a SavedModel; that is imported like any SavedModel (the TFLite converter
    mis-freezes Keras 3 variables traced in a fresh function), with the Keras model as reference."""
    with captured_output():
        import keras

    try:
        with captured_output():
            model = keras.saving.load_model(str(path), compile=False)
    except Exception as e:
        raise ModelLoadError(f"Keras cannot load {path}: {first_line(e)}") from e
    export = workdir / "keras-export"
    with captured_output() as out:
        try:
            model.export(str(export), format="tf_saved_model")
        except Exception as e:
            raise ConversionError(f"Keras could not export {path.name}: {first_line(e)} {out.tail(2)}") from e
    input_names = [t.name for t in model.inputs]
    output_names = list(model.output_names)
    imported = import_saved_model(export, shapes, workdir, output_names=output_names)
    return dataclasses.replace(imported, runner=lambda: KerasRunner(model, input_names, output_names))


def import_saved_model(
    path: Path, shapes: Mapping[str, list[int]], workdir: Path, output_names: list[str] | None = None
) -> Imported:
    """``output_names`` renames the signature's outputs (in their sorted order)."""
    tf = _tf()
    try:
        with captured_output():
            loaded = tf.saved_model.load(str(path))
    except Exception as e:
        raise ModelLoadError(f"TensorFlow cannot load the SavedModel {path}: {first_line(e)}") from e
    signature = loaded.signatures.get("serving_default")
    if signature is None:
        known = ", ".join(loaded.signatures) or "none"
        raise ModelLoadError(f"SavedModel {path} has no 'serving_default' signature (it has: {known})")
    inputs = signature.structured_input_signature[1]
    names = sorted(inputs)
    spec = [tf.TensorSpec(fix_shape(n, inputs[n].shape, shapes), inputs[n].dtype, name=n) for n in names]
    keys = sorted(signature.structured_outputs)
    renamed = dict(zip(keys, output_names or keys, strict=True))

    @tf.function(input_signature=spec)
    def serve(*args: Any) -> dict[str, Any]:
        result = signature(**dict(zip(names, args, strict=True)))
        return {renamed[k]: result[k] for k in keys}

    return _export(serve, spec, loaded, workdir)
