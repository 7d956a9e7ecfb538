"""One verification harness for every runtime.

The artifact and the source model run on the same inputs. Every output is judged by the
figures that mean something for its kind (compiler/kinds.py): top-1 agreement for class
scores, cosine, PSNR and the IoU of a [0, 1] map for dense outputs, per-step argmax agreement
for sequences, cosine per head and agreement on the confident anchors for detection heads,
error over the output's range for regression; max and mean absolute error for all, task
accuracy when labels are given. A profile's gate names a threshold per kind and turns the
figures into pass or fail.

The figures are ``bundle_runtime.compare``'s, the code the agent judges a shadow candidate
with on the device.
"""

from __future__ import annotations

from bundle_runtime.compare import DETECTION_SCORE, Outputs, compare, missed
from compiler.runtime import Runner
from compiler.tensors import SampleSet
from device_profiles import Gate
from edgec.manifest import Metrics

__all__ = ["DETECTION_SCORE", "Outputs", "compare", "gate_failures", "run_samples"]


def run_samples(runner: Runner, samples: SampleSet) -> Outputs:
    return [runner.run(feed) for feed in samples]


def gate_failures(metrics: Metrics, gate: Gate) -> list[str]:
    """Each missed threshold, as a phrase naming the output, its kind, the figure and the limit."""
    failures = []
    several = len(metrics.outputs) > 1
    for output in metrics.outputs:
        where = f"{output.name} ({output.kind.value}): " if several else ""
        failures += [where + phrase for phrase in missed(output, gate.for_kind(output.kind))]
    if metrics.accuracy is not None and metrics.source_accuracy is not None:
        drop = (metrics.source_accuracy - metrics.accuracy) * 100.0
        if drop > gate.max_accuracy_drop_points:
            failures.append(f"accuracy drop {drop:.2f} points > {gate.max_accuracy_drop_points}")
    return failures
