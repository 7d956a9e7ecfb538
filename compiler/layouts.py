"""Channels-first vs channels-last: the artifact's tensor specs, as a converter left them.

ONNX models are channels-first (NCHW); converters to TFLite and CoreML make 3-D to 5-D
tensors channels-last (NHWC) so the runtimes' delegates need no transposes. ``artifact_spec``
records the layout an artifact takes in its tensor spec; data moves across with
``bundle_runtime.TensorPort``, the conversion the agent runs, built from that spec.
"""

from __future__ import annotations

from collections.abc import Sequence

from bundle_runtime.layouts import CHANNELS_LAST, is_channels_last_of
from edgec.errors import ConversionError
from edgec.manifest import TensorSpec

__all__ = ["artifact_spec"]


def artifact_spec(
    source: TensorSpec, artifact_shape: Sequence[int], dtype: str, runtime_name: str | None = None
) -> TensorSpec:
    """The artifact's view of a source tensor: the same shape, or its channels-last form."""
    shape = [int(d) for d in artifact_shape]
    rank = len(source.shape)
    if shape == source.shape:
        layout = source.layout
    elif is_channels_last_of(shape, source.shape):
        layout = CHANNELS_LAST[rank]
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


def _squeezed(shape: Sequence[int]) -> list[int]:
    return [int(d) for d in shape if d != 1]
