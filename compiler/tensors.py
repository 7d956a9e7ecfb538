"""Sample sets: calibration and evaluation data, checked against the model's inputs.

Data files are ``.npz`` keyed by input name, or a folder of ``NAME.npy`` files. Each
array's first axis indexes samples; a sample is either the input's full shape or its shape
without a leading batch axis of 1. Evaluation data may hold integer labels under ``y``.
"""

from __future__ import annotations

import logging
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgec.errors import DataMismatchError
from edgec.manifest import TensorSpec

__all__ = ["LABELS_KEY", "SampleSet", "generate_samples", "load_samples"]

logger = logging.getLogger(__name__)
LABELS_KEY = "y"


@dataclass(frozen=True)
class SampleSet:
    """``arrays[name]`` has shape ``[N, *input_shape]``; ``labels`` is ``[N]`` or None."""

    origin: str  # "eval", "calibration" or "generated"
    arrays: dict[str, np.ndarray]
    labels: np.ndarray | None = None

    def __len__(self) -> int:
        return len(next(iter(self.arrays.values())))

    def sample(self, index: int) -> dict[str, np.ndarray]:
        # np.asarray: a scalar input indexes to a numpy scalar, runtimes want a 0-d array
        return {name: np.asarray(array[index]) for name, array in self.arrays.items()}

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return (self.sample(i) for i in range(len(self)))

    def head(self, count: int) -> SampleSet:
        labels = None if self.labels is None else self.labels[:count]
        return SampleSet(self.origin, {k: v[:count] for k, v in self.arrays.items()}, labels)


def _read_arrays(path: Path) -> dict[str, np.ndarray]:
    try:
        if path.is_dir():
            files = sorted(path.glob("*.npy"))
            if not files:
                raise DataMismatchError(f"{path} holds no .npy files (expected INPUT_NAME.npy)")
            return {f.stem: np.load(f, allow_pickle=False) for f in files}
        with np.load(path, allow_pickle=False) as npz:
            if not isinstance(npz, np.lib.npyio.NpzFile):
                raise DataMismatchError(f"{path} is a single .npy array; use an .npz keyed by input name")
            return {key: npz[key] for key in npz.files}
    except FileNotFoundError:
        raise DataMismatchError(f"data file {path} does not exist") from None
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise DataMismatchError(f"cannot read data file {path}: {e}") from e


def _integral(array: np.ndarray) -> bool:
    return bool(np.all(np.isfinite(array)) and np.array_equal(array, np.round(array)))


def _as_input(name: str, array: np.ndarray, spec: TensorSpec, path: Path) -> np.ndarray:
    shape = tuple(spec.shape)
    sample_shape = tuple(array.shape[1:])
    if array.ndim == 0:
        raise DataMismatchError(f"{path}: {name!r} is a scalar; its first axis must index samples")
    if sample_shape == shape:
        out = array
    elif shape[:1] == (1,) and sample_shape == shape[1:]:
        out = array.reshape((array.shape[0], *shape))
    else:
        accepted = f"[N, {', '.join(map(str, shape))}]"
        if shape[:1] == (1,):
            accepted += f" or [N, {', '.join(map(str, shape[1:]))}]"
        raise DataMismatchError(
            f"{path}: {name!r} has shape {list(array.shape)}, the model's input {name!r} "
            f"is {list(shape)}: expected {accepted.replace(', ]', ']')}"
        )
    want = np.dtype(spec.dtype)
    if out.dtype == want:
        return out
    if out.dtype.kind not in "biuf":
        raise DataMismatchError(f"{path}: {name!r} has dtype {out.dtype}, the model wants {want}")
    if want.kind in "iu" and out.dtype.kind == "f" and not _integral(out):
        raise DataMismatchError(
            f"{path}: {name!r} holds non-integer {out.dtype} values, the model wants {want}"
        )
    return out.astype(want)


def load_samples(path: Path, inputs: Sequence[TensorSpec], origin: str) -> SampleSet:
    """Read a data file or folder and check it against the model's inputs."""
    raw = _read_arrays(path)
    labels = raw.pop(LABELS_KEY, None)
    names = [spec.name for spec in inputs]
    missing = [n for n in names if n not in raw]
    unknown = sorted(set(raw) - set(names))
    if missing or unknown:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(map(repr, missing))}")
        if unknown:
            parts.append(f"unknown {', '.join(map(repr, unknown))}")
        raise DataMismatchError(
            f"{path}: keys do not match the model's inputs ({'; '.join(parts)}); "
            f"expected keys: {', '.join(map(repr, names))}"
            + (f" and optional labels {LABELS_KEY!r}" if origin == "eval" else "")
        )
    arrays = {spec.name: _as_input(spec.name, raw[spec.name], spec, path) for spec in inputs}
    counts = {name: len(a) for name, a in arrays.items()}
    if len(set(counts.values())) != 1:
        raise DataMismatchError(f"{path}: inputs hold different sample counts {counts}")
    count = next(iter(counts.values()))
    if count == 0:
        raise DataMismatchError(f"{path} holds no samples")
    if labels is not None and (labels.shape != (count,) or labels.dtype.kind not in "iu"):
        raise DataMismatchError(
            f"{path}: labels {LABELS_KEY!r} must be integers of shape [{count}], "
            f"got {labels.dtype} {list(labels.shape)}"
        )
    logger.debug("loaded %d %s samples from %s", count, origin, path)
    return SampleSet(origin, arrays, labels)


def generate_samples(inputs: Sequence[TensorSpec], count: int, seed: int = 0) -> SampleSet:
    """Inputs of the right shape and dtype when the user gave no data.

    Floats are standard normal; integers are small non-negative values (they are often
    indices); booleans are fair coin flips.
    """
    rng = np.random.default_rng(seed)
    arrays: dict[str, np.ndarray] = {}
    for spec in inputs:
        shape = (count, *spec.shape)
        dtype = np.dtype(spec.dtype)
        if dtype.kind == "f":
            arrays[spec.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype.kind in "iu":
            arrays[spec.name] = rng.integers(0, 4, size=shape).astype(dtype)
        elif dtype.kind == "b":
            arrays[spec.name] = rng.integers(0, 2, size=shape).astype(bool)
        else:
            raise DataMismatchError(
                f"cannot generate inputs for {spec.name!r} of dtype {dtype}; pass --eval data"
            )
    return SampleSet("generated", arrays)
