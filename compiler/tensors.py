"""Sample sets: calibration and evaluation data, checked against the model's inputs.

Data files are ``.npz`` keyed by input name, or a folder of ``NAME.npy`` files. Each
array's first axis indexes samples; a sample is either the input's full shape or its shape
without a leading batch axis of 1. Evaluation data may hold integer labels under ``y``.

Nothing is loaded before it is known to fit: every member's zip entry size and ``.npy``
header (shape, dtype) are read first and checked against the memory budget and the
model's inputs; then only the first ``max_samples`` samples are read. Object arrays are
never unpickled, and members that are not ``.npy`` arrays are refused.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import zipfile
import zlib
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np
from numpy.lib import format as npy

from compiler.limits import DEFAULT_MAX_SAMPLES, MemoryBudget, format_size, memory_budget
from edgec.errors import DataMismatchError
from edgec.manifest import TensorSpec

__all__ = ["LABELS_KEY", "SampleSet", "generate_samples", "load_samples"]

logger = logging.getLogger(__name__)
LABELS_KEY = "y"
_MAX_HEADER_BYTES = 10_000  # numpy's own default limit for a .npy header
_CHUNK_BYTES = 16 * 2**20
_FILE_FIX = "pass a smaller data file"
_SAMPLES_FIX = "pass fewer samples (--max-samples N)"
# what zipfile, zlib and numpy raise on a corrupt, encrypted or unsupported file
_READ_ERRORS = (
    OSError,
    ValueError,
    EOFError,
    zipfile.BadZipFile,
    zlib.error,
    RuntimeError,
    NotImplementedError,
)


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


@dataclass(frozen=True)
class _Member:
    """One array of a data file, known from its header only."""

    key: str
    where: str  # for messages: "calib.npz: 'x.npy'" or "data/x.npy"
    shape: tuple[int, ...]
    dtype: np.dtype
    fortran_order: bool
    open: Callable[[], IO[bytes]]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    def described(self) -> str:
        return f"{list(self.shape)} {self.dtype}"


def _read_header(stream: IO[bytes], where: str) -> tuple[tuple[int, ...], bool, np.dtype]:
    try:
        version = npy.read_magic(stream)
    except ValueError:
        raise DataMismatchError(f"{where} is not a .npy array; save arrays with numpy.savez") from None
    if version == (1, 0):
        shape, fortran_order, dtype = npy.read_array_header_1_0(stream, max_header_size=_MAX_HEADER_BYTES)
    elif version == (2, 0):
        shape, fortran_order, dtype = npy.read_array_header_2_0(stream, max_header_size=_MAX_HEADER_BYTES)
    else:
        raise DataMismatchError(f"{where} is a .npy file of version {version}, which edgec does not read")
    if any(d < 0 for d in shape):
        raise DataMismatchError(f"{where} has a corrupt header (shape {list(shape)})")
    return tuple(shape), bool(fortran_order), np.dtype(dtype)


def _checked_member(
    key: str, where: str, stored_bytes: int, open_: Callable[[], IO[bytes]], budget: MemoryBudget
) -> _Member:
    """Read one member's header; refuse objects, non-numeric data, more data than the budget
    allows and more than the entry holds."""
    with open_() as stream:
        shape, fortran_order, dtype = _read_header(stream, where)
        header_bytes = stream.tell()
    member = _Member(key, where, shape, dtype, fortran_order, open_)
    if dtype.hasobject:
        raise DataMismatchError(
            f"{where} holds Python objects (dtype {dtype}); edgec never unpickles data: "
            "save numeric arrays (bool, int, uint, float)"
        )
    if dtype.kind not in "biuf":
        raise DataMismatchError(f"{where} has dtype {dtype}; save numeric arrays (bool, int, uint, float)")
    budget.check(
        member.nbytes, f"{where} declares {member.described()}, {format_size(member.nbytes)}", _FILE_FIX
    )
    if header_bytes + member.nbytes > stored_bytes:
        raise DataMismatchError(
            f"{where} is truncated: its header declares {member.described()} "
            f"({format_size(member.nbytes)}), the file holds {format_size(stored_bytes - header_bytes)}"
        )
    return member


def _npz_members(path: Path, archive: zipfile.ZipFile, budget: MemoryBudget) -> dict[str, _Member]:
    entries = archive.infolist()
    for info in entries:  # sizes first, from the zip's directory: nothing is unpacked yet
        if info.is_dir() or not info.filename.endswith(".npy"):
            raise DataMismatchError(
                f"{path} holds {info.filename!r}, which is not a .npy array; an .npz holds only "
                "arrays keyed by input name (numpy.savez)"
            )
        budget.check(
            info.file_size,
            f"{path}: {info.filename!r} ({format_size(info.compress_size)} in the file) unpacks to "
            f"{format_size(info.file_size)}",
            _FILE_FIX,
        )
    total = sum(info.file_size for info in entries)
    budget.check(total, f"{path} unpacks to {format_size(total)} in {len(entries)} arrays", _FILE_FIX)
    members: dict[str, _Member] = {}
    for info in entries:
        key = info.filename[: -len(".npy")]
        if key in members:
            raise DataMismatchError(f"{path} holds {key!r} twice; save each input once")
        members[key] = _checked_member(
            key,
            f"{path}: {info.filename!r}",
            info.file_size,
            functools.partial(archive.open, info),
            budget,
        )
    return members


def _opener(file: Path) -> Callable[[], IO[bytes]]:
    return lambda: file.open("rb")


def _folder_members(path: Path, budget: MemoryBudget) -> dict[str, _Member]:
    files = sorted(path.glob("*.npy"))
    if not files:
        raise DataMismatchError(f"{path} holds no .npy files (expected INPUT_NAME.npy)")
    sizes = {}
    for file in files:
        if not file.is_file():
            raise DataMismatchError(f"{file} is not a regular file")
        sizes[file] = file.stat().st_size
        budget.check(sizes[file], f"{file} is {format_size(sizes[file])}", _FILE_FIX)
    total = sum(sizes.values())
    budget.check(total, f"{path} holds {format_size(total)} in {len(files)} arrays", _FILE_FIX)
    return {f.stem: _checked_member(f.stem, str(f), sizes[f], _opener(f), budget) for f in files}


@contextlib.contextmanager
def _members(path: Path, budget: MemoryBudget) -> Iterator[dict[str, _Member]]:
    """The arrays of a data file or folder, headers checked; open while in the block."""
    try:
        if path.is_dir():
            yield _folder_members(path, budget)
            return
        with open(path, "rb") as file:
            if file.read(len(npy.MAGIC_PREFIX)) == npy.MAGIC_PREFIX:
                raise DataMismatchError(f"{path} is a single .npy array; use an .npz keyed by input name")
        with zipfile.ZipFile(path) as archive:
            yield _npz_members(path, archive, budget)
    except FileNotFoundError:
        raise DataMismatchError(f"data file {path} does not exist") from None
    except _READ_ERRORS as e:
        raise DataMismatchError(f"cannot read data file {path}: {e}") from e


def _read_exact(stream: IO[bytes], nbytes: int, member: _Member) -> bytearray:
    buffer = bytearray(nbytes)
    done = 0
    while done < nbytes:
        chunk = stream.read(min(nbytes - done, _CHUNK_BYTES))
        if not chunk:
            raise DataMismatchError(
                f"{member.where} is truncated: it ends before the data its header declares"
            )
        buffer[done : done + len(chunk)] = chunk
        done += len(chunk)
    return buffer


def _rows_read(member: _Member, count: int) -> int:
    """Samples to read for the first ``count``: all of a Fortran-ordered array."""
    whole = member.fortran_order and len(member.shape) > 1
    return member.shape[0] if whole else count


def _read_rows(member: _Member, count: int) -> np.ndarray:
    """The first ``count`` entries along the first axis, reading no more than needed."""
    rows = _rows_read(member, count)
    shape = (rows, *member.shape[1:])
    with member.open() as stream:
        _read_header(stream, member.where)
        data = _read_exact(stream, math.prod(shape) * member.dtype.itemsize, member)
    array = np.frombuffer(data, dtype=member.dtype)
    if member.fortran_order:
        return np.ascontiguousarray(array.reshape(shape[::-1]).transpose()[:count])
    return array.reshape(shape)


def _integral(array: np.ndarray) -> bool:
    return bool(np.all(np.isfinite(array)) and np.array_equal(array, np.round(array)))


def _check_layout(member: _Member, spec: TensorSpec, path: Path) -> tuple[int, ...]:
    """The model's shape for one sample, if the member's header fits it. Raises otherwise."""
    name = member.key
    shape = tuple(spec.shape)
    sample_shape = member.shape[1:]
    if not member.shape:
        raise DataMismatchError(f"{path}: {name!r} is a scalar; its first axis must index samples")
    if sample_shape != shape and not (shape[:1] == (1,) and sample_shape == shape[1:]):
        accepted = f"[N, {', '.join(map(str, shape))}]"
        if shape[:1] == (1,):
            accepted += f" or [N, {', '.join(map(str, shape[1:]))}]"
        raise DataMismatchError(
            f"{path}: {name!r} has shape {list(member.shape)}, the model's input {name!r} "
            f"is {list(shape)}: expected {accepted.replace(', ]', ']')}"
        )
    return shape


def _as_input(array: np.ndarray, spec: TensorSpec, path: Path) -> np.ndarray:
    out = array.reshape((array.shape[0], *spec.shape))
    want = np.dtype(spec.dtype)
    if out.dtype == want:
        return out
    if want.kind in "iu" and out.dtype.kind == "f" and not _integral(out):
        raise DataMismatchError(
            f"{path}: {spec.name!r} holds non-integer {out.dtype} values, the model wants {want}"
        )
    return out.astype(want)


def _check_keys(path: Path, members: dict[str, _Member], names: list[str], origin: str) -> None:
    missing = [n for n in names if n not in members]
    unknown = sorted(set(members) - set(names))
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


def _held_bytes(inputs: list[tuple[TensorSpec, _Member]], labels: _Member | None, count: int) -> int:
    """What loading ``count`` samples holds: the rows read, and their copy in the model's dtype."""
    held = 0
    for spec, member in inputs:
        read = _rows_read(member, count) * math.prod(member.shape[1:]) * member.dtype.itemsize
        converted = count * math.prod(spec.shape) * np.dtype(spec.dtype).itemsize
        held += read + (converted if member.dtype != np.dtype(spec.dtype) else 0)
    if labels is not None:
        held += count * labels.dtype.itemsize
    return held


def load_samples(
    path: Path,
    inputs: Sequence[TensorSpec],
    origin: str,
    budget: MemoryBudget | None = None,
    max_samples: int = DEFAULT_MAX_SAMPLES,
    *,
    frozen: Collection[str] = (),
) -> SampleSet:
    """Read a data file or folder and check it against the model's inputs.

    Headers are checked against ``budget`` and the inputs before any data is read; at most
    the first ``max_samples`` samples are read (a warning says so when there are more).
    Keys naming ``frozen`` inputs (no longer inputs: ``--freeze`` fixed them) are skipped
    with a warning. Raises ``DataMismatchError`` or ``ResourceLimitError``."""
    budget = budget if budget is not None else memory_budget()
    with _members(path, budget) as members:
        labels = members.pop(LABELS_KEY, None)
        skipped = [members.pop(name).key for name in frozen if name in members]
        if skipped:
            logger.warning(
                "%s: ignoring %s: frozen by --freeze, the build uses the frozen value",
                path,
                ", ".join(map(repr, skipped)),
            )
        names = [spec.name for spec in inputs]
        _check_keys(path, members, names, origin)
        wanted = [(spec, members[spec.name]) for spec in inputs]
        for spec, member in wanted:
            _check_layout(member, spec, path)
        counts = {m.key: m.shape[0] for _, m in wanted}
        if len(set(counts.values())) != 1:
            raise DataMismatchError(f"{path}: inputs hold different sample counts {counts}")
        total = next(iter(counts.values()))
        if total == 0:
            raise DataMismatchError(f"{path} holds no samples")
        if labels is not None and (labels.shape != (total,) or labels.dtype.kind not in "iu"):
            raise DataMismatchError(
                f"{path}: labels {LABELS_KEY!r} must be integers of shape [{total}], "
                f"got {labels.dtype} {list(labels.shape)}"
            )
        count = min(total, max_samples)
        held = _held_bytes(wanted, labels, count)
        budget.reserve(held, f"{count} {origin} samples from {path} need {format_size(held)}", _SAMPLES_FIX)
        if count < total:
            logger.warning(
                "%s: using the first %d of its %d samples (--max-samples %d); pass --max-samples N for more",
                path,
                count,
                total,
                max_samples,
            )
        arrays = {spec.name: _as_input(_read_rows(member, count), spec, path) for spec, member in wanted}
        label_values = _read_rows(labels, count) if labels is not None else None
    logger.debug("loaded %d %s samples from %s", count, origin, path)
    return SampleSet(origin, arrays, label_values)


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
