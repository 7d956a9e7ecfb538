"""Reference statistics of a model's inputs and outputs, for drift checks on the device.

The agent bins live values with the same edges and compares the fractions with the
Population Stability Index; quantile edges give each reference bin an equal share, which
keeps PSI sensitive in the dense part of the distribution.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from edgec.manifest import TensorStats

__all__ = ["BINS", "tensor_stats"]

BINS = 10


def tensor_stats(name: str, values: Sequence[np.ndarray]) -> TensorStats | None:
    """Statistics over every element of every sample; None for non-numeric tensors."""
    if not values or values[0].dtype.kind not in "biuf":
        return None
    flat = np.concatenate([np.asarray(v, dtype=np.float64).ravel() for v in values])
    flat = flat[np.isfinite(flat)]
    if flat.size == 0:
        return None
    edges = np.unique(np.quantile(flat, np.linspace(0.0, 1.0, BINS + 1)))
    if edges.size < 2:
        edges = np.array([edges[0], edges[0] + 1.0])
    counts, _ = np.histogram(flat, bins=edges)
    return TensorStats(
        name=name,
        count=int(flat.size),
        mean=float(flat.mean()),
        std=float(flat.std()),
        min=float(flat.min()),
        max=float(flat.max()),
        bin_edges=[float(e) for e in edges],
        bin_fractions=[float(c) / flat.size for c in counts],
    )
