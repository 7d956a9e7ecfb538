"""Channels-first vs channels-last: how an artifact's tensor shape relates to the source's.

ONNX models are channels-first (NCHW); converters to TFLite and CoreML make 3-D to 5-D
tensors channels-last (NHWC) so the runtimes' delegates need no transposes. These helpers
say whether a shape is the channels-last form of another and which axes move; the compiler
records the layout with them (``compiler.layouts.artifact_spec``) and ``TensorPort`` moves
data across with them.
"""

from __future__ import annotations

from collections.abc import Sequence

from edgec.manifest import Layout

__all__ = ["CHANNELS_LAST", "channels_last_axes", "is_channels_last_of"]

CHANNELS_LAST = {3: Layout.NWC, 4: Layout.NHWC, 5: Layout.NDHWC}  # rank -> the channels-last layout


def channels_last_axes(rank: int) -> tuple[int, ...]:
    """The transpose from channels-first to channels-last: (0, 2, ..., rank-1, 1)."""
    return (0, *range(2, rank), 1)


def is_channels_last_of(shape: Sequence[int], source_shape: Sequence[int]) -> bool:
    """``shape`` is ``source_shape`` with its channel axis (1) moved last, for ranks 3 to 5."""
    rank = len(source_shape)
    if rank not in CHANNELS_LAST or len(shape) != rank:
        return False
    return list(shape) == [source_shape[a] for a in channels_last_axes(rank)]
