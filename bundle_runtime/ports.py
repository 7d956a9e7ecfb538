"""One tensor between the source model's view and the artifact's: layout and int8 scaling.

A ``TensorPort`` is built from the manifest's ``TensorSpec`` (the artifact's shape, dtype,
runtime name, int8 scale and zero point, and the source's shape where it differs), so the
compiler's verification and the device's serving convert tensors with the same code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from bundle_runtime.layouts import channels_last_axes, is_channels_last_of
from edgec.manifest import TensorSpec

__all__ = ["TensorPort"]


@dataclass(frozen=True)
class TensorPort:
    """How one tensor moves between the source's layout and dtype and the artifact's."""

    name: str  # the source's name, which callers use
    key: str  # the runtime's name for it
    source_shape: tuple[int, ...]
    shape: tuple[int, ...]  # the artifact's
    dtype: np.dtype[Any]  # the artifact's
    scale: float | None  # int8 quantization, when the artifact's tensor is quantized
    zero_point: int | None
    transpose: tuple[int, ...] | None  # source -> artifact axes, for channels-last artifacts
    reshape: bool  # same data, axes of size 1 added or dropped

    @classmethod
    def of(cls, spec: TensorSpec) -> TensorPort:
        source = tuple(spec.source_shape if spec.source_shape is not None else spec.shape)
        shape = tuple(spec.shape)
        # a shape that is its own channels-last form ([1, 3, 3, 3]) was recorded as it is
        moved = shape != source and is_channels_last_of(shape, source)
        transpose = channels_last_axes(len(source)) if moved else None
        quantized = spec.scale is not None and spec.zero_point is not None
        return cls(
            name=spec.name,
            key=spec.runtime_name or spec.name,
            source_shape=source,
            shape=shape,
            dtype=np.dtype(spec.dtype),
            scale=spec.scale if quantized else None,
            zero_point=spec.zero_point if quantized else None,
            transpose=transpose,
            reshape=source != shape and transpose is None,
        )

    @property
    def quantized(self) -> bool:
        return self.scale is not None and self.zero_point is not None

    def to_artifact(self, array: np.ndarray) -> np.ndarray:
        """Source-layout data -> the artifact's layout and dtype (int8: quantized, clipped)."""
        if self.transpose is not None:
            array = np.ascontiguousarray(np.transpose(array, self.transpose))
        elif self.reshape:
            array = array.reshape(self.shape)
        if self.scale is not None and self.zero_point is not None:
            limits = np.iinfo(self.dtype)
            array = np.clip(np.round(array / self.scale + self.zero_point), limits.min, limits.max)
        return array.astype(self.dtype, copy=False)

    def to_source(self, array: np.ndarray) -> np.ndarray:
        """Artifact-layout data -> the source's layout (int8: dequantized to float32)."""
        if self.scale is not None and self.zero_point is not None:
            array = (array.astype(np.float32) - np.float32(self.zero_point)) * np.float32(self.scale)
        if self.transpose is not None:
            return np.transpose(array, np.argsort(self.transpose))
        if self.reshape:
            return array.reshape(self.source_shape)
        return array
