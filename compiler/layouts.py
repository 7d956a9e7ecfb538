"""Channels-first vs channels-last: how an artifact's tensors relate to the source's.

ONNX models are channels-first (NCHW); converters to TFLite and CoreML make 3-D to 5-D
tensors channels-last (NHWC) so the runtimes' delegates need no transposes. The artifact's
tensor specs record the layout it takes; ``to_artifact`` and ``to_source`` move data across.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from edgec.errors import ConversionError
from edgec.manifest import Layout, TensorSpec

__all__ = ["artifact_spec", "to_artifact", "to_source"]

_CHANNELS_LAST = {3: Layout.NWC, 4: Layout.NHWC, 5: Layout.NDHWC}


def _channels_last_axes(rank: int) -> tuple[int, ...]:
    return (0, *range(2, rank), 1)


def artifact_spec(
    source: TensorSpec, artifact_shape: Sequence[int], dtype: str, runtime_name: str | None = None
) -> TensorSpec:
    """The artifact's view of a source tensor: the same shape, or its channels-last form."""
    shape = [int(d) for d in artifact_shape]
    rank = len(source.shape)
    if shape == source.shape:
        layout = source.layout
    elif _is_channels_last_of(shape, source.shape):
        layout = _CHANNELS_LAST[rank]
    elif _squeezed(shape) == _squeezed(source.shape):
        layout = source.layout  # only axes of size 1 added or dropped
    else:
        raise ConversionError(f"the converter changed tensor {source.name!r} from {source.shape} to {shape}")
    name = None if runtime_name == source.name else runtime_name
    return TensorSpec(
        name=source.name,
        shape=shape,
        dtype=dtype,
        layout=layout,
        runtime_name=name,
        source_shape=None if shape == source.shape else list(source.shape),
    )


def _is_channels_last_of(shape: Sequence[int], source_shape: Sequence[int]) -> bool:
    rank = len(source_shape)
    if rank not in _CHANNELS_LAST or len(shape) != rank:
        return False
    return list(shape) == [source_shape[a] for a in _channels_last_axes(rank)]


def _squeezed(shape: Sequence[int]) -> list[int]:
    return [int(d) for d in shape if d != 1]


def to_artifact(array: np.ndarray, spec: TensorSpec, source_shape: Sequence[int]) -> np.ndarray:
    """Source-layout data -> the artifact's layout (``artifact_spec`` allows only these)."""
    if list(source_shape) == spec.shape:
        return array
    if _is_channels_last_of(spec.shape, source_shape):
        return np.transpose(array, _channels_last_axes(array.ndim))
    return array.reshape(spec.shape)


def to_source(array: np.ndarray, spec: TensorSpec, source_shape: Sequence[int]) -> np.ndarray:
    """Artifact-layout data -> the source's layout."""
    if list(source_shape) == spec.shape:
        return array
    if _is_channels_last_of(spec.shape, source_shape):
        return np.transpose(array, np.argsort(_channels_last_axes(array.ndim)))
    return array.reshape(source_shape)
