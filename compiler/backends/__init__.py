"""Backends: one module per artifact format, registered by name, imported lazily.

Each backend declares what it can do as data (``BackendSpec``), so listing targets or
rejecting an impossible option never imports an SDK. A missing SDK makes that format
unavailable with a message naming the extra to install; it never breaks ``import compiler``.
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol

from compiler._capture import captured_output
from compiler.prepare import PreparedModel
from compiler.runtime import Runner
from compiler.tensors import SampleSet
from device_profiles import DeviceProfile
from edgec.errors import BackendUnavailableError
from edgec.manifest import Precision, TargetFormat, TensorSpec

__all__ = [
    "BACKENDS",
    "Artifact",
    "Backend",
    "BackendSpec",
    "CompileOptions",
    "Int8Config",
    "get_backend",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Int8Config:
    """One point of the int8 search space. The default is the first thing tried."""

    per_channel: bool = True  # weights: one scale per output channel, else per tensor
    calibration_method: Literal["minmax", "entropy", "percentile"] = "minmax"
    symmetric_activations: bool = False
    int16_activations: bool = False  # int16 activations, int8 weights (TFLite's 16x8 mode)
    float_nodes: tuple[str, ...] = ()  # mixed precision: nodes kept in float
    # onnxruntime on x86 (compiler/backends/_ort_x86.py): GEMM weights in 7 bits, which its fast
    # u8s8 kernels run exactly on every x86 CPU; False: 8 bits, more precise, run on exact but
    # slower u8u8 kernels (the manifest asks for them)
    x86_fast_weights: bool = True

    def label(self) -> str:
        parts = [
            "per-channel" if self.per_channel else "per-tensor",
            self.calibration_method,
            "symmetric" if self.symmetric_activations else "asymmetric",
        ]
        if self.int16_activations:
            parts.append("int16 activations")
        if self.float_nodes:
            parts.append(f"{len(self.float_nodes)} node(s) in float")
        if not self.x86_fast_weights:
            parts.append("8-bit weights on x86")
        return ", ".join(parts)


@dataclass(frozen=True)
class BackendSpec:
    format: TargetFormat
    module: str
    precisions: tuple[Precision, ...]
    requires: tuple[str, ...]  # importable modules the backend needs
    extra: str  # the pip extra that installs them
    model_file: str  # name of the artifact inside a bundle
    # int8: the configuration tried first, then the ones to try, in order, if it misses the gate
    int8_default: Int8Config = Int8Config()
    int8_search: tuple[Int8Config, ...] = ()
    mixed_precision: bool = False  # can keep chosen nodes in float (ranked by per-layer error)
    int8_after_mixed: tuple[Int8Config, ...] = ()  # tried when mixed precision did not pass either
    fp16_fp32_nodes: bool = False  # fp16 can keep chosen nodes in float32 (ranked by fp16 error)
    profile_fields: tuple[str, ...] = ()  # the DeviceProfile fields compile() reads (cache key)


@dataclass(frozen=True)
class CompileOptions:
    precision: Precision
    calibration: SampleSet | None = None
    int8: Int8Config = Int8Config()
    fp16_fp32_nodes: tuple[str, ...] = ()  # fp16: nodes kept in float32 (their fp16 error was largest)


@dataclass
class Artifact:
    """What a backend produced, in its work folder, before it becomes a bundle."""

    format: TargetFormat
    precision: Precision
    path: Path
    inputs: list[TensorSpec]  # as the artifact takes them (layout, runtime names, int8 scales)
    outputs: list[TensorSpec]
    source_inputs: list[TensorSpec]  # the same tensors as the source model has them
    source_outputs: list[TensorSpec]
    tool_versions: dict[str, str] = field(default_factory=dict)
    runtime_config: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    unverified_reason: str | None = None  # the figures come from a stand-in runtime, and why
    qdq_graph: Path | None = None  # the Q/DQ ONNX graph of an int8 artifact, for per-layer error


class Backend(Protocol):
    spec: BackendSpec

    def compile(
        self, prepared: PreparedModel, profile: DeviceProfile, options: CompileOptions, workdir: Path
    ) -> Artifact: ...

    def open(self, artifact: Artifact) -> Runner: ...


_ONNX_INT8_SEARCH = (
    Int8Config(x86_fast_weights=False),
    Int8Config(per_channel=False),
    Int8Config(calibration_method="entropy"),
    Int8Config(calibration_method="percentile"),
    Int8Config(symmetric_activations=True),
)

BACKENDS: dict[TargetFormat, BackendSpec] = {
    TargetFormat.ONNX: BackendSpec(
        format=TargetFormat.ONNX,
        module="compiler.backends.ort",
        precisions=(Precision.FP32, Precision.FP16, Precision.INT8, Precision.DYNAMIC),
        requires=("onnx", "onnxruntime", "onnxconverter_common"),
        extra="compiler",
        model_file="model.onnx",
        profile_fields=("onnxruntime_providers", "cpu_arch"),
        int8_search=_ONNX_INT8_SEARCH,
        mixed_precision=True,
        # int16 activations (com.microsoft Q/DQ): int8's size, but onnxruntime computes between
        # them in float: after mixed precision, which keeps most of the model in fast int8
        int8_after_mixed=(Int8Config(int16_activations=True),),
        fp16_fp32_nodes=True,
    ),
    TargetFormat.TFLITE: BackendSpec(
        format=TargetFormat.TFLITE,
        module="compiler.backends.tflite",
        precisions=(Precision.FP32, Precision.FP16, Precision.INT8, Precision.DYNAMIC),
        requires=("tensorflow", "onnx2tf", "ai_edge_litert"),
        extra="compiler",
        model_file="model.tflite",
        profile_fields=("tflite_int8_io",),
        int8_search=(
            Int8Config(per_channel=False),
            Int8Config(int16_activations=True),
        ),
        mixed_precision=True,  # TFLite's selective quantization (compiler/backends/_tflite_mixed.py)
    ),
    TargetFormat.TENSORRT: BackendSpec(
        format=TargetFormat.TENSORRT,
        module="compiler.backends.tensorrt",
        precisions=(Precision.FP32, Precision.FP16, Precision.INT8),
        requires=("onnx", "onnxruntime", "onnxconverter_common"),
        extra="compiler",
        model_file="model.trt",
        profile_fields=("ram_bytes", "accelerators"),
        # TensorRT takes symmetric activations only (zero points 0)
        int8_default=Int8Config(symmetric_activations=True),
        int8_search=(
            Int8Config(per_channel=False, symmetric_activations=True),
            Int8Config(calibration_method="entropy", symmetric_activations=True),
            Int8Config(calibration_method="percentile", symmetric_activations=True),
        ),
        mixed_precision=True,
        fp16_fp32_nodes=True,
    ),
    TargetFormat.COREML: BackendSpec(
        format=TargetFormat.COREML,
        module="compiler.backends.coreml",
        precisions=(Precision.FP32, Precision.FP16, Precision.INT8),
        requires=("tensorflow", "onnx2tf", "coremltools"),
        extra="compiler",
        model_file="model.mlpackage",
        profile_fields=("coreml_deployment_target", "coreml_int8_weights"),
    ),
}


def get_backend(fmt: TargetFormat) -> Backend:
    """Import the backend for ``fmt``. Raises ``BackendUnavailableError``."""
    spec = BACKENDS.get(fmt)
    if spec is None:
        known = ", ".join(f.value for f in BACKENDS)
        raise BackendUnavailableError(
            f"no backend for format {fmt.value!r} in this version of edgec; available: {known}"
        )
    for module in spec.requires:
        try:
            with captured_output():  # TensorFlow and friends log to the terminal on import
                importlib.import_module(module)
        except ImportError as e:
            raise BackendUnavailableError(
                f"format {fmt.value!r} needs the Python package {module!r}, which is not "
                f"installed: pip install 'edgec[{spec.extra}]'"
            ) from e
    backend: Backend = importlib.import_module(spec.module).BACKEND
    return backend
