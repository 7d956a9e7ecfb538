"""The typed model every device profile file is validated against."""

from __future__ import annotations

import enum
import hashlib
import json
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from edgec.manifest import Precision, TargetFormat

__all__ = ["Accelerator", "CpuArch", "DeviceProfile", "Gate", "Runtime"]

_ID_PATTERN = r"^[a-z0-9][a-z0-9-]*$"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CpuArch(enum.StrEnum):
    ARM64 = "arm64"
    ARMV7 = "armv7"
    X86_64 = "x86_64"


class Runtime(enum.StrEnum):
    """Where an ONNX Runtime artifact executes on the device (its execution providers)."""

    CPU = "CPUExecutionProvider"
    CUDA = "CUDAExecutionProvider"
    TENSORRT = "TensorrtExecutionProvider"
    COREML = "CoreMLExecutionProvider"
    NNAPI = "NnapiExecutionProvider"
    XNNPACK = "XnnpackExecutionProvider"


class Accelerator(_Model):
    kind: Annotated[str, Field(pattern=r"^(gpu|npu|dsp|neural-engine)$")]
    name: str
    peak_tops_int8: Annotated[float, Field(gt=0)] | None = None
    peak_tflops_fp16: Annotated[float, Field(gt=0)] | None = None
    cuda_compute_capability: Annotated[str, Field(pattern=r"^\d+\.\d+$")] | None = None


class Gate(_Model):
    """What an artifact must reach against the source model to be accepted."""

    min_cosine: Annotated[float, Field(ge=-1.0, le=1.0)]
    min_top1_agreement: Annotated[float, Field(ge=0.0, le=1.0)]
    max_accuracy_drop_points: Annotated[float, Field(ge=0.0, le=100.0)]


class DeviceProfile(_Model):
    id: Annotated[str, Field(pattern=_ID_PATTERN)]
    display_name: str
    cpu_arch: CpuArch
    cpu_cores: Annotated[int, Field(gt=0)]
    cpu_model: str
    ram_bytes: Annotated[int, Field(gt=0)]
    accelerators: list[Accelerator] = []
    formats: Annotated[list[TargetFormat], Field(min_length=1)]
    onnxruntime_providers: Annotated[list[Runtime], Field(min_length=1)] = [Runtime.CPU]
    tflite_int8_io: bool = False  # int8 TFLite artifacts take and give int8 (else float) tensors
    coreml_deployment_target: Annotated[str, Field(pattern=r"^(macOS|iOS)\d+$")] = "macOS13"
    coreml_int8_weights: Literal["linear", "palettize"] = "linear"  # how CoreML int8 compresses
    precisions: Annotated[list[Precision], Field(min_length=1)]
    default_precision: Precision
    gates: dict[Precision, Gate]
    max_latency_ms: Annotated[float, Field(gt=0)]
    max_artifact_bytes: Annotated[int, Field(gt=0)]

    @model_validator(mode="after")
    def _consistent(self) -> DeviceProfile:
        if len(set(self.formats)) != len(self.formats):
            raise ValueError("formats lists a format twice")
        if self.default_precision not in self.precisions:
            raise ValueError(f"default_precision {self.default_precision.value} is not in precisions")
        missing = [p.value for p in self.precisions if p not in self.gates]
        if missing:
            raise ValueError(f"gates has no entry for precision(s) {', '.join(missing)}")
        return self

    @property
    def default_format(self) -> TargetFormat:
        return self.formats[0]

    def sha256(self) -> str:
        """Hash of the profile's content, recorded in every manifest built for it."""
        canonical = json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()
        return hashlib.sha256(canonical).hexdigest()
