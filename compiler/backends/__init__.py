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
from typing import Protocol

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
    "get_backend",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BackendSpec:
    format: TargetFormat
    module: str
    precisions: tuple[Precision, ...]
    requires: tuple[str, ...]  # importable modules the backend needs
    extra: str  # the pip extra that installs them
    model_file: str  # name of the artifact inside a bundle


@dataclass(frozen=True)
class CompileOptions:
    precision: Precision
    calibration: SampleSet | None = None
    per_channel: bool = True


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


class Backend(Protocol):
    spec: BackendSpec

    def compile(
        self, prepared: PreparedModel, profile: DeviceProfile, options: CompileOptions, workdir: Path
    ) -> Artifact: ...

    def open(self, artifact: Artifact) -> Runner: ...


BACKENDS: dict[TargetFormat, BackendSpec] = {
    TargetFormat.ONNX: BackendSpec(
        format=TargetFormat.ONNX,
        module="compiler.backends.ort",
        precisions=(Precision.FP32, Precision.FP16, Precision.INT8, Precision.DYNAMIC),
        requires=("onnx", "onnxruntime", "onnxconverter_common"),
        extra="compiler",
        model_file="model.onnx",
    ),
    TargetFormat.TFLITE: BackendSpec(
        format=TargetFormat.TFLITE,
        module="compiler.backends.tflite",
        precisions=(Precision.FP32, Precision.FP16, Precision.INT8, Precision.DYNAMIC),
        requires=("tensorflow", "onnx2tf", "ai_edge_litert"),
        extra="compiler",
        model_file="model.tflite",
    ),
    TargetFormat.TENSORRT: BackendSpec(
        format=TargetFormat.TENSORRT,
        module="compiler.backends.tensorrt",
        precisions=(Precision.FP32, Precision.FP16, Precision.INT8),
        requires=("onnx", "onnxruntime", "onnxconverter_common"),
        extra="compiler",
        model_file="model.trt",
    ),
    TargetFormat.COREML: BackendSpec(
        format=TargetFormat.COREML,
        module="compiler.backends.coreml",
        precisions=(Precision.FP32, Precision.FP16, Precision.INT8),
        requires=("tensorflow", "onnx2tf", "coremltools"),
        extra="compiler",
        model_file="model.mlpackage",
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
