"""Bounds on what a build takes from user input: a memory budget and a sample cap.

Shapes come from the model and ``--input-shape``; data files come from the user. Both are
checked against the budget from what they declare (static shapes, ``.npy`` headers, zip
entry sizes) before anything is allocated, so a typo in a shape or a zip bomb is refused
with the figure instead of exhausting the machine.

The budget is ``--memory-budget``, else ``EDGEC_MEMORY_BUDGET``, else half the memory
available to this process (``MemAvailable``, or the cgroup's limit less its usage when
that is smaller).
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgec.errors import OptionError, ResourceLimitError
from edgec.manifest import TensorSpec

__all__ = [
    "DEFAULT_MAX_SAMPLES",
    "MEMORY_BUDGET_ENV",
    "MemoryBudget",
    "describe_tensors",
    "format_size",
    "memory_budget",
    "parse_size",
    "sample_bytes",
    "tensor_bytes",
]

logger = logging.getLogger(__name__)

MEMORY_BUDGET_ENV = "EDGEC_MEMORY_BUDGET"
DEFAULT_MAX_SAMPLES = 4096
AVAILABLE_FRACTION = 0.5  # converters and runtimes copy inputs; leave them the other half
_FALLBACK_AVAILABLE = 8 * 2**30  # when the platform tells us nothing
_UNITS = {"": 1, "b": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40, "p": 2**50}
_SIZE = re.compile(r"^(?P<number>\d+(\.\d+)?)\s*(?P<unit>[kmgtp]?)(i?b)?$", re.IGNORECASE)
_RAISE = f"or raise the budget with --memory-budget SIZE or {MEMORY_BUDGET_ENV}"


def parse_size(text: str, source: str = "--memory-budget") -> int:
    """``"512MiB"`` -> bytes. K, M, G, T and P are powers of 1024. Raises ``OptionError``."""
    match = _SIZE.match(text.strip())
    value = math.floor(float(match["number"]) * _UNITS[match["unit"].lower()]) if match else 0
    if value < 1:
        raise OptionError(f"bad {source} {text!r}: expected a size such as 512MiB, 8GiB or 1000000 (bytes)")
    return value


def format_size(nbytes: int) -> str:
    for unit, scale in (("PiB", 2**50), ("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{nbytes} bytes"


def _itemsize(dtype: str | np.dtype) -> int:
    try:
        return np.dtype(dtype).itemsize
    except TypeError:  # a type numpy does not name (bfloat16 without ml_dtypes): assume the widest
        return 8


def tensor_bytes(shape: Sequence[int], dtype: str | np.dtype) -> int:
    """Bytes of one tensor; unknown (negative) dimensions count as 0. Python ints: no overflow."""
    return math.prod(max(int(d), 0) for d in shape) * _itemsize(dtype)


def sample_bytes(specs: Sequence[TensorSpec]) -> int:
    """Bytes of one sample of these tensors (those with unknown dimensions count as 0)."""
    return sum(tensor_bytes(s.shape, s.dtype) for s in specs if -1 not in s.shape)


def describe_tensors(specs: Sequence[TensorSpec], kind: str = "input") -> str:
    """``input 'x' [1, 3, 224, 224] float32``, the largest three when there are more."""
    largest = sorted(specs, key=lambda s: tensor_bytes(s.shape, s.dtype), reverse=True)[:3]
    named = ", ".join(f"{s.name!r} {list(s.shape)} {s.dtype}" for s in largest)
    if len(specs) > len(largest):
        named += f" (largest of {len(specs)})"
    return f"{kind}{'s' if len(specs) > 1 else ''} {named}"


@dataclass
class MemoryBudget:
    """The most a build may hold of what user input asks it to allocate.

    ``check`` holds one thing against the whole budget (a data file as declared);
    ``reserve`` adds what the build keeps to a running total."""

    limit_bytes: int
    origin: str  # where the figure came from, for the message
    used_bytes: int = 0

    def _refuse(self, head: str, fix: str, held: int = 0) -> ResourceLimitError:
        also = f", with {format_size(held)} already held" if held else ""
        return ResourceLimitError(
            f"{head}, over the memory budget of {format_size(self.limit_bytes)} ({self.origin}{also}); "
            f"{fix}, {_RAISE}"
        )

    def check(self, nbytes: int, head: str, fix: str) -> None:
        """Refuse ``nbytes`` over the whole budget. ``head`` states the figure."""
        if nbytes > self.limit_bytes:
            raise self._refuse(head, fix)

    def reserve(self, nbytes: int, head: str, fix: str) -> None:
        """Count ``nbytes`` against what is left, or refuse."""
        if self.used_bytes + nbytes > self.limit_bytes:
            raise self._refuse(head, fix, self.used_bytes)
        self.used_bytes += nbytes
        logger.debug("memory budget: %s of %s held", format_size(self.used_bytes), self.origin)


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # cgroup v2 writes "max" for no limit


def _cgroup_room() -> int | None:
    """The cgroup's limit less its usage, if this process runs under a memory limit."""
    root = Path("/sys/fs/cgroup")
    for limit_file, usage_file in (
        (root / "memory.max", root / "memory.current"),  # cgroup v2
        (root / "memory" / "memory.limit_in_bytes", root / "memory" / "memory.usage_in_bytes"),  # v1
    ):
        limit = _read_int(limit_file)
        if limit is not None and limit < 2**60:  # v1 writes a huge number for no limit
            return max(limit - (_read_int(usage_file) or 0), 0)
    return None


def _mem_available() -> int | None:
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")  # macOS: physical memory
    except (OSError, ValueError, AttributeError):
        return None


def available_memory() -> int:
    found = [m for m in (_mem_available(), _cgroup_room()) if m is not None]
    return min(found) if found else _FALLBACK_AVAILABLE


def memory_budget(explicit_bytes: int | None = None) -> MemoryBudget:
    """``explicit_bytes`` (``--memory-budget``), else ``EDGEC_MEMORY_BUDGET``, else half the
    memory available. Raises ``OptionError`` for a bad environment value."""
    if explicit_bytes is not None:
        if explicit_bytes < 1:
            raise OptionError("--memory-budget must be at least 1 byte")
        return MemoryBudget(explicit_bytes, "--memory-budget")
    env = os.environ.get(MEMORY_BUDGET_ENV, "").strip()
    if env:
        return MemoryBudget(parse_size(env, MEMORY_BUDGET_ENV), MEMORY_BUDGET_ENV)
    available = available_memory()
    return MemoryBudget(
        max(int(available * AVAILABLE_FRACTION), 1), f"half the {format_size(available)} available"
    )
