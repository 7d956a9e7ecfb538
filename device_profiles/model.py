"""The typed model every device profile file is validated against."""

from __future__ import annotations

import enum
import hashlib
import json
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from edgec.manifest import OutputKind, Precision, TargetFormat

__all__ = ["Accelerator", "CpuArch", "DeviceProfile", "Gate", "KindGate", "Objective", "Runtime"]

_ID_PATTERN = r"^[a-z0-9][a-z0-9-]*$"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CpuArch(enum.StrEnum):
    ARM64 = "arm64"
    ARMV7 = "armv7"
    X86_64 = "x86_64"


class Objective(enum.StrEnum):
    """What ``--precision auto`` picks among the artifacts that meet the gate."""

    SIZE = "size"  # the smallest
    LATENCY = "latency"  # the fastest, timed where the build host is the target; else the smallest


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


_Fraction = Annotated[float, Field(ge=0.0, le=1.0)]
_Cosine = Annotated[float, Field(ge=-1.0, le=1.0)]

# The thresholds each output kind can be gated on (compiler/verify.py measures them).
_KIND_FIELDS: dict[OutputKind, tuple[str, ...]] = {
    OutputKind.CLASSIFICATION: ("min_top1_agreement", "min_cosine"),
    OutputKind.DENSE: ("min_cosine", "min_psnr_db", "min_map_iou"),
    OutputKind.SEQUENCE: ("min_sequence_agreement", "min_cosine"),
    OutputKind.DETECTION: ("min_cosine", "min_anchor_agreement"),
    OutputKind.REGRESSION: ("max_rel_err",),
}


class KindGate(_Model):
    """Thresholds for the outputs of one kind; a field left out takes the gate's default
    (see ``Gate.for_kind``), a field that does not apply to the kind is refused."""

    min_cosine: _Cosine | None = None
    min_psnr_db: Annotated[float, Field(ge=0.0)] | None = None
    min_top1_agreement: _Fraction | None = None
    min_map_iou: _Fraction | None = None
    min_sequence_agreement: _Fraction | None = None
    min_anchor_agreement: _Fraction | None = None
    max_rel_err: Annotated[float, Field(ge=0.0)] | None = None


class Gate(_Model):
    """What an artifact must reach against the source model to be accepted.

    ``min_cosine`` and ``min_top1_agreement`` are the defaults every kind derives from; a
    table per kind (``[gates.int8.detection]``) names that kind's own thresholds.
    """

    min_cosine: _Cosine
    min_top1_agreement: _Fraction
    max_accuracy_drop_points: Annotated[float, Field(ge=0.0, le=100.0)]
    classification: KindGate | None = None
    dense: KindGate | None = None
    sequence: KindGate | None = None
    detection: KindGate | None = None
    regression: KindGate | None = None

    @model_validator(mode="after")
    def _fields_fit_kinds(self) -> Gate:
        for kind, allowed in _KIND_FIELDS.items():
            table = getattr(self, kind.value)
            wrong = sorted(table.model_fields_set - set(allowed)) if table is not None else []
            if wrong:
                raise ValueError(
                    f"{kind.value} gate cannot use {', '.join(wrong)} (it takes {', '.join(allowed)})"
                )
        return self

    def for_kind(self, kind: OutputKind) -> dict[str, float]:
        """The thresholds an output of ``kind`` must meet, the kind's table over the defaults."""
        defaults: dict[str, float | None] = {
            "min_cosine": self.min_cosine if kind is not OutputKind.SEQUENCE else None,
            "min_top1_agreement": self.min_top1_agreement,
            "min_sequence_agreement": self.min_top1_agreement,
            "min_anchor_agreement": self.min_top1_agreement,
            "max_rel_err": round(1.0 - self.min_cosine, 12),
        }
        table = getattr(self, kind.value)
        given = table.model_dump(exclude_none=True) if table is not None else {}
        found = {name: given.get(name, defaults.get(name)) for name in _KIND_FIELDS[kind]}
        return {name: value for name, value in found.items() if value is not None}

    def flat(self) -> dict[str, float]:
        """Every threshold as ``name`` (the defaults) and ``kind.name``: the manifest's record."""
        found = {
            "min_cosine": self.min_cosine,
            "min_top1_agreement": self.min_top1_agreement,
            "max_accuracy_drop_points": self.max_accuracy_drop_points,
        }
        for kind in OutputKind:
            found.update({f"{kind.value}.{k}": v for k, v in self.for_kind(kind).items()})
        return found


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
    objective: Objective = Objective.SIZE
    gates: dict[Precision, Gate]
    max_latency_ms: Annotated[float, Field(gt=0)]
    max_artifact_bytes: Annotated[int, Field(gt=0)]
    # the peak memory one model may take in its runtime, load and inference (measured at build,
    # ``edgec.manifest.MemoryPeak``): a share of ``ram_bytes``; None: no memory gate
    model_memory_budget_bytes: Annotated[int, Field(gt=0)] | None = None

    @model_validator(mode="after")
    def _consistent(self) -> DeviceProfile:
        if len(set(self.formats)) != len(self.formats):
            raise ValueError("formats lists a format twice")
        if self.default_precision not in self.precisions:
            raise ValueError(f"default_precision {self.default_precision.value} is not in precisions")
        missing = [p.value for p in self.precisions if p not in self.gates]
        if missing:
            raise ValueError(f"gates has no entry for precision(s) {', '.join(missing)}")
        if self.model_memory_budget_bytes is not None and self.model_memory_budget_bytes > self.ram_bytes:
            raise ValueError("model_memory_budget_bytes is more than ram_bytes")
        return self

    @property
    def default_format(self) -> TargetFormat:
        return self.formats[0]

    def sha256(self) -> str:
        """Hash of the profile's content, recorded in every manifest built for it."""
        canonical = json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()
        return hashlib.sha256(canonical).hexdigest()
