"""Drift: the Population Stability Index (PSI) of live values against a manifest's reference bins.

``DriftMonitor`` bins each request's input and output values against the reference
statistics the build wrote (``Manifest.reference_stats``), per tensor, and gives the PSI of
what it counted and a verdict per tensor (``DriftConfig``: ok, warn, drift). It holds no
clock and does no I/O: ``agent.telemetry.WindowRecorder`` feeds it and closes its windows.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable

import numpy as np

from edgec.manifest import TensorStats
from edgec.reports import DriftVerdict

__all__ = ["DriftConfig", "DriftMonitor", "worst_verdict"]

logger = logging.getLogger(__name__)

_SEVERITY = {DriftVerdict.OK: 0, DriftVerdict.WARN: 1, DriftVerdict.DRIFT: 2}


def worst_verdict(verdicts: Iterable[DriftVerdict]) -> DriftVerdict | None:
    """The most severe verdict (drift > warn > ok); None when there is none."""
    return max(verdicts, key=_SEVERITY.__getitem__, default=None)


@dataclasses.dataclass(frozen=True)
class DriftConfig:
    """How drift is judged.

    A tensor gets a verdict once a window has seen ``min_values`` of its values from at least
    ``min_samples`` requests (values within one request, the pixels of one image, say, are not
    independent, so one request never makes a verdict). ``max_values_per_sample`` caps the
    values binned per request: larger tensors are subsampled at fixed random positions, which
    keeps ``observe`` within tens of microseconds for any model.
    """

    warn_psi: float = 0.1
    drift_psi: float = 0.25
    min_values: int = 1000
    min_samples: int = 20
    epsilon: float = 1e-4  # stands in for an empty bin's fraction, so PSI stays finite
    max_values_per_sample: int = 4096

    def __post_init__(self) -> None:
        if not 0 < self.warn_psi <= self.drift_psi:
            raise ValueError(f"need 0 < warn_psi <= drift_psi, got {self.warn_psi}, {self.drift_psi}")
        if self.min_values < 1 or self.min_samples < 1 or self.max_values_per_sample < 1:
            raise ValueError("min_values, min_samples and max_values_per_sample must be >= 1")
        if not 0 < self.epsilon < 1:
            raise ValueError(f"epsilon must be in (0, 1), got {self.epsilon}")

    def verdict(self, psi: float) -> DriftVerdict:
        if psi < self.warn_psi:
            return DriftVerdict.OK
        return DriftVerdict.WARN if psi < self.drift_psi else DriftVerdict.DRIFT


_KEEP_POSITIONS = 8  # subsampling positions cached per tensor, one set per tensor size


class _Tensor:
    """One reference tensor: its inner bin edges, expected fractions, and what was counted."""

    def __init__(self, stats: TensorStats) -> None:
        # the first and last bins are open-ended, so only the inner edges place a value
        self.inner = np.asarray(stats.bin_edges[1:-1], dtype=np.float64)
        expected = np.asarray(stats.bin_fractions, dtype=np.float64)
        self.expected = expected / expected.sum()
        self.counts = np.zeros(expected.size, dtype=np.int64)
        self.samples = 0
        self._positions: dict[int, np.ndarray] = {}

    def positions(self, size: int, keep: int) -> np.ndarray:
        """Fixed random positions to subsample a tensor of ``size`` values (sorted, cached)."""
        picked = self._positions.get(size)
        if picked is None:
            rng = np.random.default_rng(size)
            picked = np.sort(rng.choice(size, keep, replace=False))
            if len(self._positions) >= _KEEP_POSITIONS:  # tensors of many sizes: stay bounded
                self._positions.pop(next(iter(self._positions), size), None)
            self._positions[size] = picked
        return picked


class DriftMonitor:
    """PSI of live values against reference bins, one tensor at a time.

    ``bin_counts`` only reads the reference, so threads may call it at once; ``add_counts``,
    ``observe`` (both in one), ``psi``, ``verdicts`` and ``reset`` change or read the counts
    and are guarded by the caller (``WindowRecorder`` holds a lock).
    """

    def __init__(self, reference: Iterable[TensorStats], config: DriftConfig | None = None) -> None:
        self.config = config or DriftConfig()
        self._tensors: dict[str, _Tensor] = {}
        for stats in reference:
            bins = len(stats.bin_fractions)
            if bins < 1 or len(stats.bin_edges) != bins + 1 or sum(stats.bin_fractions) <= 0:
                logger.warning("reference statistics of %r are malformed; no drift check for it", stats.name)
                continue
            self._tensors[stats.name] = _Tensor(stats)

    @property
    def names(self) -> list[str]:
        return list(self._tensors)

    def bin_counts(self, name: str, array: np.ndarray) -> np.ndarray | None:
        """How many of ``array``'s finite values fall in each reference bin of ``name``.

        None for a tensor without reference statistics or with non-numeric values.
        """
        tensor = self._tensors.get(name)
        if tensor is None:
            return None
        values = np.asarray(array)
        if values.dtype.kind not in "biuf":
            return None
        flat = values.reshape(-1)
        keep = self.config.max_values_per_sample
        if flat.size > keep:
            flat = flat[tensor.positions(flat.size, keep)]
        if flat.dtype.kind == "f":
            finite = np.isfinite(flat)
            if not finite.all():
                flat = flat[finite]
        # side="right" puts a value equal to an edge in the bin it opens, as np.histogram does
        where = np.searchsorted(tensor.inner, flat, side="right")
        return np.bincount(where, minlength=tensor.counts.size)

    def add_counts(self, name: str, counts: np.ndarray) -> None:
        """Add one request's ``bin_counts`` of tensor ``name``."""
        tensor = self._tensors[name]
        tensor.counts += counts
        tensor.samples += 1

    def observe(self, name: str, array: np.ndarray) -> None:
        """Count one request's values of tensor ``name`` (ignored for unknown tensors)."""
        counts = self.bin_counts(name, array)
        if counts is not None:
            self.add_counts(name, counts)

    def observed(self, name: str) -> int:
        """How many values of ``name`` were counted since the last reset."""
        tensor = self._tensors.get(name)
        return 0 if tensor is None else int(tensor.counts.sum())

    def psi(self, name: str) -> float | None:
        """PSI of what was observed against the reference; None until enough was seen."""
        tensor = self._tensors.get(name)
        if tensor is None:
            return None
        total = int(tensor.counts.sum())
        if total < self.config.min_values or tensor.samples < self.config.min_samples:
            return None
        actual = np.maximum(tensor.counts / total, self.config.epsilon)
        expected = np.maximum(tensor.expected, self.config.epsilon)
        return float(np.sum((actual - expected) * np.log(actual / expected)))

    def psis(self) -> dict[str, float]:
        """PSI of every tensor that has seen enough values."""
        out = {}
        for name in self._tensors:
            value = self.psi(name)
            if value is not None:
                out[name] = value
        return out

    def verdicts(self) -> dict[str, DriftVerdict]:
        """ok / warn / drift for every tensor that has seen enough values."""
        return {name: self.config.verdict(value) for name, value in self.psis().items()}

    def verdict(self) -> DriftVerdict | None:
        """The worst tensor verdict; None when no tensor has seen enough values."""
        return worst_verdict(self.verdicts().values())

    def reset(self) -> None:
        for tensor in self._tensors.values():
            tensor.counts[:] = 0
            tensor.samples = 0
