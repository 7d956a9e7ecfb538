"""TFLite backend: the SavedModel (from onnx2tf or the source) -> TFLiteConverter -> LiteRT.

fp32; fp16 (float16 weights); int8 full-integer quantization calibrated on the calibration
set, with float inputs and outputs unless the profile asks for int8 I/O, and chosen nodes
kept in float where the mixed-precision search asks (``_tflite_mixed``; the tensors are
ranked on an ONNX Q/DQ stand-in, since a TFLite model has no Q/DQ graph). Verified with the
LiteRT interpreter (ai-edge-litert) through ``bundle_runtime``, as the agent runs it;
channels-last tensors are recorded in the manifest.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np

from bundle_runtime import TensorPort
from compiler._capture import call_quietly, captured_output, meaningful_lines, report_log
from compiler.backends import BACKENDS, Artifact, CompileOptions, Int8Config
from compiler.backends._quantize import refuse_quantized, to_int8
from compiler.backends._tf import TfModel, saved_model_for
from compiler.backends._tflite_mixed import FloatOps, find_float_ops, quantize_keeping_float
from compiler.layouts import artifact_spec
from compiler.prepare import PreparedModel
from compiler.runtime import Runner, first_line, open_for_verification
from compiler.tensors import SampleSet
from device_profiles import DeviceProfile
from edgec.errors import BuildError, ConversionError, OptionError, UnsupportedOperatorError
from edgec.manifest import Precision, TargetFormat, TensorSpec

__all__ = ["BACKEND", "TfliteBackend"]

logger = logging.getLogger(__name__)
CALIBRATION_SAMPLES = 200  # the TFLite converter's representative set; more adds time, not accuracy
RANKING_GRAPH = "int8-ranking.onnx"  # the ONNX stand-in per-layer error is measured on


def _artifact_feed(model: TfModel, sources: list[TensorSpec], feed: dict[str, np.ndarray]) -> dict[str, Any]:
    """One sample of the source's inputs as the SavedModel's signature takes it."""
    return {
        tensor.key: TensorPort.of(_spec(src, tensor)).to_artifact(feed[src.name])
        for src, tensor in zip(sources, model.inputs, strict=True)
    }


def _representative(model: TfModel, sources: list[TensorSpec], data: SampleSet) -> Any:
    def samples() -> Iterator[dict[str, np.ndarray]]:
        for feed in data.head(CALIBRATION_SAMPLES):
            yield _artifact_feed(model, sources, feed)

    return samples


def _spec(source: TensorSpec, tensor: Any) -> TensorSpec:
    return artifact_spec(source, tensor.shape, tensor.dtype, tensor.key)


def convert(
    model: TfModel, prepared: PreparedModel, options: CompileOptions, int8_io: bool, target: Path
) -> list[str]:
    """Write the TFLite model to ``target``; returns notes (int8: the nodes kept in float)."""
    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_saved_model(str(model.path))
    if options.precision is Precision.FP16:
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.target_spec.supported_types = [tf.float16]
    elif options.precision is Precision.DYNAMIC:
        converter.optimizations = [tf.lite.Optimize.DEFAULT]  # no representative data: dynamic range
    elif options.precision is Precision.INT8:
        if options.calibration is None:
            raise OptionError("int8 needs calibration data: pass --calibration FILE.npz|DIR")
        config = options.int8
        if config.float_nodes and config.int16_activations:
            raise ConversionError(
                "TFLite keeps chosen ops in float only in a model with int8 activations, not int16: "
                "drop int16 activations or the float nodes"
            )
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = _representative(model, prepared.inputs, options.calibration)
        ops = tf.lite.OpsSet.TFLITE_BUILTINS_INT8
        if config.int16_activations:
            ops = tf.lite.OpsSet.EXPERIMENTAL_TFLITE_BUILTINS_ACTIVATIONS_INT16_WEIGHTS_INT8
        converter.target_spec.supported_ops = [ops]
        converter._experimental_disable_per_channel = not config.per_channel
        if int8_io and not config.int16_activations:
            converter.inference_input_type = tf.int8
            converter.inference_output_type = tf.int8
        if config.float_nodes:
            return _convert_mixed(
                converter,
                model,
                prepared,
                calibration=options.calibration,
                config=config,
                int8_io=int8_io,
                target=target,
            )
    run = call_quietly(converter.convert)
    if run.failure is not None or run.value is None:
        raise _converter_error(run.failure, run.log.text, options.precision)
    target.write_bytes(run.value)
    return []


def _convert_mixed(
    converter: Any,
    model: TfModel,
    prepared: PreparedModel,
    *,
    calibration: SampleSet,
    config: Int8Config,
    int8_io: bool,
    target: Path,
) -> list[str]:
    """int8 with ``config.float_nodes`` (nodes of the prepared ONNX graph) kept in float:
    their TFLite ops found by value on the first calibration sample (``_tflite_mixed``)."""
    sample = calibration.sample(0)
    feed = _artifact_feed(model, prepared.inputs, sample)

    def find(calibrated: bytes) -> FloatOps:
        return find_float_ops(
            prepared,
            config.float_nodes,
            calibrated,
            onnx_feed=sample,
            tflite_feed=feed,
            workdir=target.parent,
        )

    run = call_quietly(lambda: quantize_keeping_float(converter, find, int8_io))
    if run.failure is not None or run.value is None:
        raise _converter_error(run.failure, run.log.text, Precision.INT8)
    quantized, kept = run.value
    target.write_bytes(quantized)
    return kept.notes(prepared)


def _converter_error(failure: BaseException | None, log: str, precision: Precision) -> ConversionError:
    """Name the ops the TFLite converter refused and its own reason, never its start-up noise."""
    text = f"{failure}\n{log}"
    ops = sorted({line.split("'")[1] for line in text.splitlines() if "op '" in line and "'" in line})
    lines = meaningful_lines(str(failure)) if failure is not None else []
    reason = lines[0][:300] if lines else "no model came out"
    hint = "try another precision or --format onnx for this target"
    kept = report_log(f"{failure}\n{log}" if failure is not None else log)
    if ops:
        return UnsupportedOperatorError(
            f"the TFLite converter cannot build {precision.value} op(s) {', '.join(ops)}: {reason}; {hint}",
            ops,
            kept,
        )
    return ConversionError(f"the TFLite converter failed at {precision.value}: {reason}; {hint}", kept)


def _io_specs(
    path: Path, model: TfModel, prepared: PreparedModel
) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """The TFLite file's own tensors (dtypes, int8 scales), lined up with the source's."""
    from ai_edge_litert.interpreter import Interpreter

    with captured_output():
        runner = Interpreter(model_path=str(path)).get_signature_runner()
    details_in, details_out = runner.get_input_details(), runner.get_output_details()

    def spec(source: TensorSpec, key: str, details: dict[str, Any]) -> TensorSpec:
        d = details[key]
        base = artifact_spec(source, list(d["shape"]), np.dtype(d["dtype"]).name, key)
        scale, zero = d["quantization"]
        if np.dtype(d["dtype"]).kind in "iu" and scale:
            return base.model_copy(update={"scale": float(scale), "zero_point": int(zero)})
        return base

    inputs = [spec(s, t.key, details_in) for s, t in zip(prepared.inputs, model.inputs, strict=True)]
    outputs = [spec(s, t.key, details_out) for s, t in zip(prepared.outputs, model.outputs, strict=True)]
    return inputs, outputs


def _ranking_graph(
    prepared: PreparedModel, options: CompileOptions, workdir: Path
) -> tuple[Path | None, list[str]]:
    """The prepared graph quantized by onnxruntime as ``options.int8`` says, for ranking only.

    A TFLite model has no Q/DQ ONNX graph, on which the mixed-precision search measures the
    error each tensor's int8 rounding adds (``compiler.layer_error``). onnxruntime's int8 is
    TFLite's in kind (asymmetric int8 activations from min/max calibration, symmetric int8
    weights per channel), so its graph ranks the tensors; the TFLite model is never judged
    by it. Returns the graph (None when it cannot be made) and a note."""
    if options.calibration is None:
        return None, []
    workdir.mkdir(exist_ok=True)
    target = workdir / RANKING_GRAPH
    calibration = options.calibration.head(CALIBRATION_SAMPLES)
    try:
        to_int8(prepared.path, target, dataclasses.replace(options, calibration=calibration), workdir)
    except BuildError as e:
        return None, [f"per-layer int8 error not measured (its ONNX stand-in failed: {first_line(e)})"]
    return target, [
        "per-layer int8 error (what mixed precision ranks, edgec explain) measured on a stand-in: "
        "the ONNX graph quantized the same way by onnxruntime"
    ]


class TfliteBackend:
    spec = BACKENDS[TargetFormat.TFLITE]

    def compile(
        self, prepared: PreparedModel, profile: DeviceProfile, options: CompileOptions, workdir: Path
    ) -> Artifact:
        if prepared.tf_saved_model is None and options.precision is not Precision.FP32:
            refuse_quantized(prepared.model, options.precision)  # before onnx2tf's slow conversion
        model = saved_model_for(prepared, options.calibration)
        target = workdir / self.spec.model_file
        kept = convert(model, prepared, options, profile.tflite_int8_io, target)
        inputs, outputs = _io_specs(target, model, prepared)
        if prepared.tf_saved_model is None:
            notes = ["converted ONNX -> SavedModel with onnx2tf (channels-last)"]
        else:
            notes = ["converted from the source's own SavedModel with the TFLite converter"]
        if options.precision is Precision.DYNAMIC:
            notes.append("dynamic-range: int8 weights, float activations")
        if options.precision is Precision.INT8:
            io = "int8" if profile.tflite_int8_io else "float"
            count = min(CALIBRATION_SAMPLES, len(options.calibration or ()))
            notes.append(
                f"full-integer int8 ({options.int8.label()}), {io} inputs/outputs, "
                f"calibrated on {count} samples"
            )
        notes += kept
        ranking = None
        if options.precision is Precision.INT8 and options.int8 == self.spec.int8_default:
            ranking, said = _ranking_graph(prepared, options, workdir / "ranking")
            notes += said
        return Artifact(
            format=TargetFormat.TFLITE,
            precision=options.precision,
            path=target,
            inputs=inputs,
            outputs=outputs,
            source_outputs=prepared.outputs,
            source_inputs=prepared.inputs,
            tool_versions=dict(model.tool_versions, **{"ai-edge-litert": version("ai-edge-litert")}),
            notes=notes,
            qdq_graph=ranking,
        )

    def open(self, artifact: Artifact) -> Runner:
        # the LiteRT session the agent serves it with, converting tensors as the agent does
        return open_for_verification(
            artifact.path,
            artifact.format,
            artifact.inputs,
            artifact.outputs,
            artifact.runtime_config,
            threads=2,
        )


BACKEND = TfliteBackend()
