"""ONNX Runtime backend: fp32 (offline graph optimization), fp16, int8 static QDQ."""

from __future__ import annotations

import logging
from importlib.metadata import version
from pathlib import Path

import onnx
import onnxruntime as ort

from bundle_runtime import session_options
from compiler.backends import BACKENDS, Artifact, CompileOptions
from compiler.backends._fp16 import fp16_runner, to_fp16
from compiler.backends._ort_x86 import saturation_free
from compiler.backends._quantize import to_dynamic_int8, to_int8
from compiler.prepare import PreparedModel
from compiler.runtime import ORT_SESSION_CONFIG, Runner, first_line, open_for_verification
from device_profiles import CpuArch, DeviceProfile, Runtime
from edgec.errors import ConversionError
from edgec.manifest import Precision, TargetFormat

__all__ = ["BACKEND", "OnnxRuntimeBackend"]

logger = logging.getLogger(__name__)
FP16_VERIFIED = (
    "verified with onnxruntime's CPU provider, float16 storage emulated: float32 arithmetic, "
    "every tensor the model holds in float16 rounded to float16 as a device stores it"
)


def _optimization_level(profile: DeviceProfile) -> ort.GraphOptimizationLevel:
    # Extended fusions produce CPU-provider-only ops; a GPU or NPU device gets the portable
    # basic level (constant folding, redundant node removal) and fuses on the device.
    if profile.onnxruntime_providers == [Runtime.CPU]:
        return ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    return ort.GraphOptimizationLevel.ORT_ENABLE_BASIC


def _x86_cpu(profile: DeviceProfile) -> bool:
    """The device runs the model on onnxruntime's x86 CPU kernels (compiler/backends/_ort_x86.py)."""
    return profile.cpu_arch is CpuArch.X86_64 and profile.onnxruntime_providers == [Runtime.CPU]


def optimize(source: Path, target: Path, level: ort.GraphOptimizationLevel) -> None:
    """Run onnxruntime's graph optimizer offline and save the result."""
    options = session_options({})
    options.graph_optimization_level = level
    options.optimized_model_filepath = str(target)
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
            notes = to_fp16(prepared.path, target, options.fp16_fp32_nodes)
            notes.append(FP16_VERIFIED)
            tools["onnxconverter-common"] = version("onnxconverter-common")
        elif options.precision is Precision.DYNAMIC:
            to_dynamic_int8(prepared.path, target, workdir)
            notes = ["dynamic quantization: int8 weights, activations quantized at run time"]
            runtime_config = dict(ORT_SESSION_CONFIG)
        else:
            # Quantize the unfused graph so the device's runtime can fuse QDQ itself.
            notes = [f"int8 static QDQ: {options.int8.label()}"]
            notes += to_int8(prepared.path, target, options, workdir, x86=_x86_cpu(profile))
            if not saturation_free(onnx.load(str(target))):
                runtime_config = dict(ORT_SESSION_CONFIG)  # 8-bit GEMM weights: exact u8u8 kernels
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
        if artifact.precision is Precision.FP16:
            return fp16_runner(artifact.path, artifact.path.parent, artifact.notes, artifact.runtime_config)
        return open_for_verification(
            artifact.path, artifact.format, artifact.inputs, artifact.outputs, artifact.runtime_config
        )


BACKEND = OnnxRuntimeBackend()
