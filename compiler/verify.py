"""One verification harness for every runtime.

The artifact and the source model run on the same inputs; the figures are the same for
every backend: max and mean absolute error, cosine similarity, top-1 agreement, and task
accuracy when labels are given. A profile's gate turns the figures into pass or fail.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from compiler.runtime import Runner
from compiler.tensors import SampleSet
from device_profiles import Gate
from edgec.manifest import Metrics

__all__ = ["Outputs", "compare", "gate_failures", "run_samples"]

logger = logging.getLogger(__name__)

Outputs = list[dict[str, np.ndarray]]  # one dict of named outputs per sample


def run_samples(runner: Runner, samples: SampleSet) -> Outputs:
    return [runner.run(feed) for feed in samples]


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    norm = float(np.linalg.norm(a) * np.linalg.norm(b))
    if norm == 0.0:
        return 1.0 if not a.any() and not b.any() else 0.0
    return float(np.dot(a, b) / norm)


def _is_float(array: np.ndarray) -> bool:
    return array.dtype.kind == "f"


def _classes(output: np.ndarray) -> np.ndarray | None:
    """Rows of class scores (last axis), or None when the output is not a classifier's."""
    if not _is_float(output) or output.ndim < 1 or output.shape[-1] < 2:
        return None
    return output.reshape(-1, output.shape[-1])


def compare(
    reference: Outputs, candidate: Outputs, labels: np.ndarray | None, output_names: Sequence[str]
) -> Metrics:
    """Figures of ``candidate`` against ``reference`` (both per sample, same order)."""
    max_err = 0.0
    abs_sum = 0.0
    abs_count = 0
    worst_cosine: float | None = None
    have_float = False
    for name in output_names:
        cosines = []
        for ref, cand in zip(reference, candidate, strict=True):
            r = np.asarray(ref[name])
            c = np.asarray(cand[name])
            if r.shape != c.shape:
                c = c.reshape(r.shape)
            if not _is_float(r):
                mismatch = float(np.count_nonzero(r != c))
                max_err = max(max_err, 1.0 if mismatch else 0.0)
                continue
            have_float = True
            diff = np.abs(r.astype(np.float64) - c.astype(np.float64))
            max_err = max(max_err, float(diff.max(initial=0.0)))
            abs_sum += float(diff.sum())
            abs_count += diff.size
            cosines.append(_cosine(r.ravel().astype(np.float64), c.ravel().astype(np.float64)))
        if cosines:
            mean_cos = float(np.mean(cosines))
            worst_cosine = mean_cos if worst_cosine is None else min(worst_cosine, mean_cos)

    top1 = accuracy = source_accuracy = None
    head = output_names[0]
    ref_rows = [_classes(np.asarray(o[head])) for o in reference]
    cand_rows = [_classes(np.asarray(o[head])) for o in candidate]
    if all(r is not None and c is not None for r, c in zip(ref_rows, cand_rows, strict=True)):
        ref_top = np.concatenate([r.argmax(-1) for r in ref_rows if r is not None])
        cand_top = np.concatenate([c.argmax(-1) for c in cand_rows if c is not None])
        top1 = float(np.mean(ref_top == cand_top))
        if labels is not None and len(ref_top) == len(labels):
            accuracy = float(np.mean(cand_top == labels))
            source_accuracy = float(np.mean(ref_top == labels))

    return Metrics(
        samples=len(reference),
        max_abs_err=max_err,
        mean_abs_err=abs_sum / abs_count if have_float and abs_count else None,
        cosine=worst_cosine,
        top1_agreement=top1,
        accuracy=accuracy,
        source_accuracy=source_accuracy,
    )


def gate_failures(metrics: Metrics, gate: Gate) -> list[str]:
    """Each missed threshold, as a phrase with the figure and the limit."""
    failures = []
    if metrics.cosine is not None and metrics.cosine < gate.min_cosine:
        failures.append(f"cosine {metrics.cosine:.6f} < {gate.min_cosine}")
    if metrics.top1_agreement is not None and metrics.top1_agreement < gate.min_top1_agreement:
        failures.append(f"top-1 agreement {metrics.top1_agreement:.4f} < {gate.min_top1_agreement}")
    if metrics.accuracy is not None and metrics.source_accuracy is not None:
        drop = (metrics.source_accuracy - metrics.accuracy) * 100.0
        if drop > gate.max_accuracy_drop_points:
            failures.append(f"accuracy drop {drop:.2f} points > {gate.max_accuracy_drop_points}")
    return failures
