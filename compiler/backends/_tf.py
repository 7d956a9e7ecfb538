"""The TensorFlow SavedModel that the TFLite and CoreML backends convert from.

A Keras or SavedModel source brings its own (written by the importer). For other sources
onnx2tf writes it, channels-last, once per build, shared by every target. onnx2tf must run
offline: it is never asked to quantize (the TFLite converter does that with the user's
calibration data), and for RGB image models, where it runs the graph on sample images it
would otherwise download, it is handed those images from the calibration set.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import tempfile
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import numpy as np
import onnx

from compiler._capture import call_quietly, captured_output
from compiler.backends._onnx2tf_fixes import constants_as_initializers, explicit_rnn_states
from compiler.backends._onnx2tf_log import explain
from compiler.prepare import PreparedModel, converter_copy, converter_names
from compiler.tensors import SampleSet
from edgec.errors import ConversionError, UnsupportedOperatorError

__all__ = ["TfModel", "TfTensor", "saved_model_for"]

logger = logging.getLogger(__name__)
_FOLDER = "onnx2tf-saved-model"
_FAILED = "onnx2tf-failed.json"
_INPUT = "onnx2tf-input.onnx"  # the prepared graph, inputs and outputs renamed for onnx2tf
_SAMPLE_IMAGES = "calibration_image_sample_data_20x128x128x3_float32.npy"  # the name onnx2tf looks for


@dataclass(frozen=True)
class TfTensor:
    key: str  # the signature's name for it
    shape: list[int]
    dtype: str


@dataclass(frozen=True)
class TfModel:
    """A SavedModel and its serving signature, in the source model's input/output order."""

    path: Path
    inputs: list[TfTensor]
    outputs: list[TfTensor]
    tool_versions: dict[str, str]


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_]", "_", name)


def _static(shape: object) -> list[int]:
    """Unknown dimensions (onnx2tf makes a scalar input a ``[None]``) become 1."""
    return [1 if d is None else int(d) for d in shape]  # type: ignore[attr-defined]


def describe_saved_model(path: Path, input_names: list[str], output_names: list[str]) -> TfModel:
    """Read the serving signature and line it up with the source's inputs and outputs."""
    import tensorflow as tf

    with captured_output():
        signature = tf.saved_model.load(str(path)).signatures["serving_default"]
    specs = signature.structured_input_signature[1]
    inputs = []
    for name in input_names:
        key = name if name in specs else _safe(name)
        if key not in specs:
            raise ConversionError(f"the SavedModel has no input for {name!r}; it has {sorted(specs)}")
        spec = specs[key]
        inputs.append(TfTensor(key, _static(spec.shape), spec.dtype.as_numpy_dtype.__name__))
    outs = signature.structured_outputs
    if len(outs) != len(output_names):
        raise ConversionError(f"the SavedModel has {len(outs)} outputs, the source {len(output_names)}")
    if set(output_names) <= set(outs):
        keys = list(output_names)
    else:  # onnx2tf names them output_0, output_1, ... in the source's order
        keys = sorted(outs, key=lambda k: int(k.rsplit("_", 1)[-1]) if k.rsplit("_", 1)[-1].isdigit() else k)
    outputs = [TfTensor(k, _static(outs[k].shape), outs[k].dtype.as_numpy_dtype.__name__) for k in keys]
    return TfModel(path, inputs, outputs, {"tensorflow": version("tensorflow")})


def saved_model_for(prepared: PreparedModel, samples: SampleSet | None) -> TfModel:
    """The source's own SavedModel when it has one, else onnx2tf's (converted once per build).

    ``samples`` (the calibration set, if any) stand in for the sample images onnx2tf would
    otherwise download for RGB models.
    """
    names = [t.name for t in prepared.inputs]
    output_names = [t.name for t in prepared.outputs]
    if prepared.tf_saved_model is not None:
        return describe_saved_model(prepared.tf_saved_model, names, output_names)
    folder = prepared.path.parent / _FOLDER
    failed = prepared.path.parent / _FAILED
    if failed.exists():  # one failed conversion per build is enough
        raise _failure_read(failed)
    if not (folder / "saved_model.pb").exists():
        error = _run_onnx2tf(prepared, samples, folder)
        if error is not None:
            _failure_write(failed, error)
            raise error
    renamed = converter_names(prepared)
    model = describe_saved_model(folder, [renamed[n] for n in names], [renamed[n] for n in output_names])
    versions = dict(model.tool_versions, onnx2tf=version("onnx2tf"))
    return TfModel(model.path, model.inputs, model.outputs, versions)


def _simplified(graph: onnx.ModelProto) -> onnx.ModelProto:
    """The graph with its shape computations folded to constants (onnx-simplifier), as onnx2tf
    expects: YOLOv8's Reshape/Concat of anchors and an LSTM's Shape->Gather chains otherwise
    reach it unfolded and fail ("Dimension 0 in both shapes must be equal, but are 400 and
    100"). The graph as it is when onnxsim is missing or fails, with a warning."""
    try:
        import onnxsim
    except ImportError:
        logger.warning("onnxsim is not installed: onnx2tf gets the graph without its shapes folded")
        return graph
    try:
        with captured_output():
            simplified, checked = onnxsim.simplify(graph)
    except Exception as e:  # a simplifier's failure is not the conversion's
        logger.warning("onnxsim could not simplify the graph (%s); onnx2tf gets it as it is", e)
        return graph
    if not checked:
        logger.warning("onnxsim's result did not match the graph; onnx2tf gets it as it is")
        return graph
    return simplified


def _run_onnx2tf(prepared: PreparedModel, samples: SampleSet | None, folder: Path) -> ConversionError | None:
    """onnx2tf on a copy of the prepared graph whose inputs and outputs have names it takes,
    simplified and patched where onnx2tf is known to fail (``_onnx2tf_fixes``)."""
    import onnx2tf

    graph, renamed = converter_copy(prepared)
    graph = _simplified(graph)
    source = prepared.path.with_name(_INPUT)  # onnx2tf rewrites its input: never the prepared graph
    onnx.save(explicit_rnn_states(constants_as_initializers(graph)), str(source))
    names = [renamed[t.name] for t in prepared.inputs]
    with tempfile.TemporaryDirectory(prefix="edgec-onnx2tf-") as cwd, contextlib.chdir(cwd):
        _write_sample_images(Path(cwd), prepared, samples)
        run = call_quietly(
            lambda: onnx2tf.convert(
                input_onnx_file_path=str(source),
                output_folder_path=str(folder),
                non_verbose=True,
                not_use_onnxsim=True,  # done above, in this process (onnx2tf runs it from $PATH)
                output_signaturedefs=True,
                # recurrent layers as plain ops: TensorFlow's int8 calibrator crashes on its LSTM
                enable_rnn_unroll=any(n.op_type in ("LSTM", "GRU", "RNN") for n in graph.graph.node),
                # a TensorFlow-family source's graph is NHWC already: keep it that way
                keep_nwc_or_nhwc_or_ndhwc_input_names=names if prepared.channels_last else None,
            )
        )
    if run.failure is not None or not (folder / "saved_model.pb").exists():
        return explain(run.failure, run.log.text, prepared)
    return None


def _write_sample_images(cwd: Path, prepared: PreparedModel, samples: SampleSet | None) -> None:
    """onnx2tf runs RGB image models once on 20 sample images it reads from the working
    folder, or downloads when the file is not there. Give it ours: the first image input's
    calibration samples (channels-last, resized to 128x128), else a fixed pattern."""
    images = None
    for spec in prepared.inputs:
        if samples is None or len(spec.shape) != 4 or 3 not in (spec.shape[1], spec.shape[3]):
            continue
        batch = samples.arrays[spec.name].reshape(-1, *spec.shape[1:]).astype(np.float32)
        images = batch if spec.shape[3] == 3 else batch.transpose(0, 2, 3, 1)
        break
    if images is None:
        images = np.random.default_rng(0).standard_normal((20, 128, 128, 3)).astype(np.float32)
    rows = np.linspace(0, images.shape[1] - 1, 128).round().astype(int)  # nearest-neighbour resize,
    cols = np.linspace(0, images.shape[2] - 1, 128).round().astype(int)  # without touching TensorFlow
    resized = images[:20][:, rows][:, :, cols].astype(np.float32)
    resized = np.resize(resized, (20, 128, 128, 3))  # repeats samples when there are fewer than 20
    np.save(cwd / _SAMPLE_IMAGES, resized)


def _failure_write(path: Path, error: ConversionError) -> None:
    nodes = error.nodes if isinstance(error, UnsupportedOperatorError) else None
    path.write_text(json.dumps({"message": str(error), "nodes": nodes, "log": error.log}), encoding="utf-8")


def _failure_read(path: Path) -> ConversionError:
    """The first target's onnx2tf failure, for the next target of the same build."""
    saved = json.loads(path.read_text(encoding="utf-8"))
    if saved["nodes"] is not None:
        return UnsupportedOperatorError(saved["message"], saved["nodes"], saved["log"])
    return ConversionError(saved["message"], saved["log"])
