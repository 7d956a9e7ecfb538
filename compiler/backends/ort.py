"""ONNX Runtime backend: fp32 (offline graph optimization), fp16, int8 static QDQ."""

from __future__ import annotations

import logging
import warnings
from importlib.metadata import version
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto

from compiler.backends import BACKENDS, Artifact, CompileOptions
from compiler.prepare import PreparedModel
from compiler.runtime import ORT_SESSION_CONFIG, OnnxRuntimeRunner, Runner
from device_profiles import DeviceProfile, Runtime
from edgec.errors import ConversionError, OptionError
from edgec.manifest import Precision, TargetFormat

__all__ = ["BACKEND", "OnnxRuntimeBackend"]

logger = logging.getLogger(__name__)


def _optimization_level(profile: DeviceProfile) -> ort.GraphOptimizationLevel:
    # Extended fusions produce CPU-provider-only ops; a GPU or NPU device gets the portable
    # basic level (constant folding, redundant node removal) and fuses on the device.
    if profile.onnxruntime_providers == [Runtime.CPU]:
        return ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    return ort.GraphOptimizationLevel.ORT_ENABLE_BASIC


def optimize(source: Path, target: Path, level: ort.GraphOptimizationLevel) -> None:
    """Run onnxruntime's graph optimizer offline and save the result."""
    options = ort.SessionOptions()
    options.graph_optimization_level = level
    options.optimized_model_filepath = str(target)
    options.log_severity_level = 3
    try:
        ort.InferenceSession(str(source), options, providers=["CPUExecutionProvider"])
    except Exception as e:
        raise ConversionError(f"onnxruntime graph optimization failed: {e}") from e


class _CalibrationReader:
    """onnxruntime.quantization's data reader: one feed per ``get_next`` call."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]) -> None:
        self._feeds = iter(feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._feeds, None)


def _to_fp16(source: Path, target: Path) -> list[str]:
    """Convert to float16 with float32 inputs and outputs; returns notes for the report."""
    from onnxconverter_common import float16

    model = onnx.load(str(source))
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            converted = float16.convert_float_to_float16(model, keep_io_types=True)
    except Exception as e:
        raise ConversionError(f"fp16 conversion failed: {e}") from e
    _retarget_float_casts(converted)
    onnx.save(converted, str(target))
    truncated = sum("truncated" in str(w.message) for w in caught)
    if truncated:
        return [f"{truncated} weight value(s) outside float16's range were clamped"]
    return []


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


def _to_int8(source: Path, target: Path, options: CompileOptions, workdir: Path) -> None:
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if options.calibration is None:
        raise OptionError("int8 needs calibration data: pass --calibration FILE.npz|DIR")
    preprocessed = workdir / "int8-pre.onnx"
    try:
        quant_pre_process(str(source), str(preprocessed), skip_optimization=True, skip_symbolic_shape=True)
        quantize_static(
            str(preprocessed),
            str(target),
            _CalibrationReader(list(options.calibration)),
            quant_format=QuantFormat.QDQ,
            per_channel=options.per_channel,
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
            extra_options={"ActivationSymmetric": False, "WeightSymmetric": True},
        )
    except Exception as e:
        raise ConversionError(f"int8 quantization failed: {e}") from e


class OnnxRuntimeBackend:
    spec = BACKENDS[TargetFormat.ONNX]

    def compile(
        self, prepared: PreparedModel, profile: DeviceProfile, options: CompileOptions, workdir: Path
    ) -> Artifact:
        target = workdir / self.spec.model_file
        tools = {"onnx": version("onnx"), "onnxruntime": version("onnxruntime")}
        runtime_config: dict[str, str] = {}
        if options.precision is Precision.FP32:
            level = _optimization_level(profile)
            optimize(prepared.path, target, level)
            notes = [f"graph optimization: {level.name}"]
        elif options.precision is Precision.FP16:
            # Not optimized offline: onnxruntime's CPU provider would bake in Casts back to
            # float32 around every op it has no fp16 kernel for, and a GPU device would then
            # compute in float32. The device's runtime optimizes the graph when it loads it.
            notes = _to_fp16(prepared.path, target)
            notes.append("verified with onnxruntime's CPU provider: fp16 weights, float32 compute")
            tools["onnxconverter-common"] = version("onnxconverter-common")
        else:
            # Quantize the unfused graph so the device's runtime can fuse QDQ itself.
            _to_int8(prepared.path, target, options, workdir)
            per = "per-channel" if options.per_channel else "per-tensor"
            notes = [f"int8 static QDQ, {per} symmetric weights, asymmetric activations"]
            runtime_config = dict(ORT_SESSION_CONFIG)
        return Artifact(
            format=TargetFormat.ONNX,
            precision=options.precision,
            path=target,
            inputs=prepared.inputs,
            outputs=prepared.outputs,
            source_inputs=prepared.inputs,
            source_outputs=prepared.outputs,
            tool_versions=tools,
            runtime_config=runtime_config,
            notes=notes,
        )

    def open(self, artifact: Artifact) -> Runner:
        return OnnxRuntimeRunner(artifact.path)


BACKEND = OnnxRuntimeBackend()
