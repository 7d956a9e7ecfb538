"""Whether a candidate's answer to one request agrees with the serving model's (``agent.shadow``).

Each output is judged with ``bundle_runtime.compare``, the figures the build's gate
uses, against the thresholds the candidate's manifest records for the output's kind
(``verification.gate``, ``KIND.THRESHOLD`` keys), on that one request:

- classification: the same top-1 class (``min_top1_agreement``, per row of a batch);
- sequence: per-step argmax agreement of at least ``min_sequence_agreement``;
- dense: cosine of at least ``min_cosine``;
- detection: cosine over the confident anchors of at least ``min_cosine`` and confident-anchor
  agreement of at least ``min_anchor_agreement``;
- regression: error over the output's scale of at most ``max_rel_err``;
- integer outputs: equal values.

A request agrees when every output compared agrees. The outputs compared are the candidate's
that the serving model also gives; an output whose kind neither manifest records (bundles
from before output kinds) is judged as the self-test does: the first as class scores, the
rest as dense.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from pydantic import ValidationError

from bundle_runtime.compare import compare, missed
from device_profiles import Gate
from edgec.errors import UserInputError
from edgec.manifest import Manifest, OutputKind

__all__ = ["Judge", "ShadowMismatchError"]

# the thresholds that decide, per kind, whether one request's output agrees
_DECISIVE: dict[OutputKind, tuple[str, ...]] = {
    OutputKind.CLASSIFICATION: ("min_top1_agreement",),
    OutputKind.SEQUENCE: ("min_sequence_agreement",),
    OutputKind.DENSE: ("min_cosine",),
    OutputKind.DETECTION: ("min_cosine", "min_anchor_agreement"),
    OutputKind.REGRESSION: ("max_rel_err",),
}


class ShadowMismatchError(UserInputError):
    """The candidate cannot be judged against the serving model: no output in common, or no
    gate thresholds recorded in its manifest."""


class Judge:
    """Whether each compared output of one request agrees, by its kind and the candidate's gate."""

    def __init__(self, candidate: Manifest, serving: Manifest) -> None:
        served = {o.name: o for o in serving.outputs}
        names = [o.name for o in candidate.outputs if o.name in served]
        if not names:
            raise ShadowMismatchError(
                f"{candidate.name}:{candidate.version} shares no output with the serving "
                f"{serving.name}:{serving.version} ({', '.join(sorted(served))}): nothing to compare"
            )
        untyped = all(o.kind is None for o in candidate.outputs) and all(
            o.kind is None for o in serving.outputs
        )
        self.kinds: dict[str, OutputKind] = {}
        for spec in candidate.outputs:
            if spec.name in served:
                kind = spec.kind or served[spec.name].kind
                if kind is None:  # as agent.runtime's self-test judges bundles from before kinds
                    first = untyped and spec.name == candidate.outputs[0].name
                    kind = OutputKind.CLASSIFICATION if first else OutputKind.DENSE
                self.kinds[spec.name] = kind
        self.thresholds = {kind: _thresholds(candidate, kind) for kind in set(self.kinds.values())}

    def agreement(
        self, serving: Mapping[str, np.ndarray], candidate: Mapping[str, np.ndarray]
    ) -> dict[str, bool]:
        """Output name -> whether the candidate's value agrees with the serving model's."""
        try:
            reference = {name: np.asarray(serving[name]) for name in self.kinds}
            found = {name: np.asarray(candidate[name]) for name in self.kinds}
            metrics = compare([reference], [found], None, self.kinds)
        except (KeyError, ValueError):  # an output missing or of another size: no agreement
            return dict.fromkeys(self.kinds, False)
        agrees = {}
        for output in metrics.outputs:
            if reference[output.name].dtype.kind != "f":  # integers: equal values
                agrees[output.name] = output.max_abs_err == 0.0
            else:
                agrees[output.name] = not missed(output, self.thresholds[output.kind])
        return agrees


def _thresholds(manifest: Manifest, kind: OutputKind) -> dict[str, float]:
    """The thresholds ``_DECISIVE`` names for ``kind``, as the manifest's gate records them
    (``KIND.THRESHOLD``), or derived from its defaults as the profile's gate derives them."""
    gate = manifest.verification.gate
    found = {name: gate[f"{kind.value}.{name}"] for name in _DECISIVE[kind] if f"{kind.value}.{name}" in gate}
    if len(found) < len(_DECISIVE[kind]):
        try:
            derived = Gate(
                min_cosine=gate["min_cosine"],
                min_top1_agreement=gate["min_top1_agreement"],
                max_accuracy_drop_points=gate.get("max_accuracy_drop_points", 0.0),
            ).for_kind(kind)
        except (KeyError, ValidationError):
            raise ShadowMismatchError(
                f"{manifest.name}:{manifest.version} records no gate thresholds for {kind.value} "
                "outputs: rebuild it with this edgec to shadow it"
            ) from None
        found = {name: found.get(name, derived[name]) for name in _DECISIVE[kind] if name in derived}
    return found
