"""The TensorRT build plan: what the agent executes on a Jetson to build its engine.

TensorRT engines are specific to a GPU and a TensorRT version, so a bundle carries a
TensorRT-ready ONNX graph plus this plan instead of an engine. The graph's own types decide
precision (TensorRT 10's strongly typed networks; TensorRT 11 has no FP16/INT8 builder
flags): an fp16 graph, or explicit Q/DQ nodes for int8.

A wire document read tolerantly (a newer compiler's fields are kept and ignored); only a
newer major ``schema_version`` is refused (``NewerBundleError``: upgrade the agent).
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from edgec._schema import check_schema_version
from edgec.errors import NewerBundleError
from edgec.manifest import Precision

__all__ = ["PLAN_NAME", "SCHEMA_VERSION", "InputShapes", "TensorRtPlan"]

PLAN_NAME = "build_plan.json"
SCHEMA_VERSION = 1  # the major this reader reads; additive changes do not bump it


class _Model(BaseModel):
    # a wire document: unknown fields are kept and ignored, at every level
    model_config = ConfigDict(extra="allow", frozen=True)


class InputShapes(_Model):
    """One optimization-profile entry; all three equal for a static shape."""

    name: str
    min: list[int]
    opt: list[int]
    max: list[int]


class TensorRtPlan(_Model):
    schema_version: int = SCHEMA_VERSION
    onnx_file: str
    precision: Precision
    strongly_typed: bool = True
    inputs: list[InputShapes]
    workspace_bytes: Annotated[int, Field(gt=0)]
    builder_optimization_level: Annotated[int, Field(ge=0, le=5)] = 3
    timing_cache: str = "reuse"  # keep a timing cache per GPU + TensorRT version on the device
    engine_cache_key: list[str] = ["onnx_sha256", "tensorrt_version", "gpu_name", "compute_capability"]
    target_compute_capability: str | None = None
    operator_table: str  # which TensorRT operator table the preflight checked against

    @model_validator(mode="before")
    @classmethod
    def _readable_version(cls, data: Any) -> Any:
        """A newer major is refused before any field is read (it may have changed them)."""
        return check_schema_version(
            data,
            document=f"TensorRT build plan {PLAN_NAME}",
            supported=SCHEMA_VERSION,
            writer="compiler",
            upgrade="agent",
            error=NewerBundleError,
        )
