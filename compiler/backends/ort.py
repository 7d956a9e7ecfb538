"""ONNX Runtime backend: fp32 (offline graph optimization), fp16, int8 static QDQ."""

from __future__ import annotations

import logging
from importlib.metadata import version
from pathlib import Path

import onnxruntime as ort

from compiler.backends import BACKENDS, Artifact, CompileOptions
from compiler.backends._quantize import to_dynamic_int8, to_fp16, to_int8
from compiler.prepare import PreparedModel
from compiler.runtime import ORT_SESSION_CONFIG, OnnxRuntimeRunner, Runner, first_line
from device_profiles import DeviceProfile, Runtime
from edgec.errors import ConversionError
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
        raise ConversionError(f"onnxruntime graph optimization failed: {first_line(e)}") from e


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
            notes = to_fp16(prepared.path, target)
            notes.append("verified with onnxruntime's CPU provider: fp16 weights, float32 compute")
            tools["onnxconverter-common"] = version("onnxconverter-common")
        elif options.precision is Precision.DYNAMIC:
            to_dynamic_int8(prepared.path, target, workdir)
            notes = ["dynamic quantization: int8 weights, activations quantized at run time"]
            runtime_config = dict(ORT_SESSION_CONFIG)
        else:
            # Quantize the unfused graph so the device's runtime can fuse QDQ itself.
            notes = [f"int8 static QDQ: {options.int8.label()}"]
            notes += to_int8(prepared.path, target, options, workdir)
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
            qdq_graph=target if options.precision is Precision.INT8 else None,
        )

    def open(self, artifact: Artifact) -> Runner:
        return OnnxRuntimeRunner(artifact.path)


BACKEND = OnnxRuntimeBackend()
