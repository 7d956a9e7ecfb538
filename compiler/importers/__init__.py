"""Importers: every source format becomes one ONNX graph, and keeps its own runtime.

The ONNX form is where every backend starts; the source model itself, run in its own
framework, stays the reference that artifacts are verified against. TensorFlow-family
sources (Keras, SavedModel) also hand the TFLite and CoreML backends a serving SavedModel,
so those convert from the original graph rather than through ONNX.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from compiler.runtime import Runner
from edgec.errors import ShapeSpecError

__all__ = ["Imported", "fix_shape"]


@dataclass(frozen=True)
class Imported:
    onnx_path: Path
    runner: Callable[[], Runner]
    tf_saved_model: Path | None = None
    channels_last: bool = False  # the source takes NHWC image tensors (TensorFlow family)


def fix_shape(name: str, shape: Sequence[int | None], given: Mapping[str, list[int]]) -> list[int]:
    """A static shape: ``--input-shape`` if given, else a dynamic batch axis becomes 1."""
    if name in given:
        wanted = given[name]
        fits = len(wanted) == len(shape) and all(
            d is None or d < 0 or d == w for d, w in zip(shape, wanted, strict=True)
        )
        if not fits:
            spec = ",".join(map(str, wanted))
            raise ShapeSpecError(f"--input-shape {name}={spec} does not fit the input's shape {list(shape)}")
        return list(wanted)
    fixed = []
    for axis, dim in enumerate(shape):
        if dim is not None and dim >= 0:
            fixed.append(int(dim))
        elif axis == 0:
            fixed.append(1)  # a dynamic batch axis: build for one sample at a time
        else:
            raise ShapeSpecError(
                f"input {name!r} has a dynamic dimension at axis {axis}; fix it with "
                f"--input-shape {name}=D0,D1,..."
            )
    return fixed
