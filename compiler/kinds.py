"""What each output of a model holds, found from its shape and the source's values on the
verification data, so each is judged by the figures that mean something for it.

Top-1 agreement over a flattened detection head or probability map says nothing (a TFLite
fp16 face detector with near-identical values scored 0.13); cosine over a sequence of class
scores hides a changed character. The rules, on one sample's output (``kind_of``):

- integer values: ``sequence`` when there are several (per-step indices), else
  ``classification`` (a class index); both judged by equal values;
- a single value: ``regression`` (a score, a flag);
- one axis of length C that is the last: ``classification`` when the values are a
  distribution (non-negative, summing to 1); else what the output's name says
  (``logits``/``prob``/``class``: classification; ``landmarks``/``embedding``/``features``/...:
  dense); else ``regression`` when C <= 4 (a box); else ``classification`` when the values
  centre on zero (logits: |mean| <= std, a quarter or more negative), ``dense`` when they
  sit away from it (coordinates, ReLU features, embeddings); one axis that is not the last
  (``[1, 896, 1]``): ``detection`` scores per anchor when it is long (>= 64), else
  ``regression``;
- four or more axes with at least two left after squeezing: ``dense`` (maps, masks);
- two axes: ``sequence`` when the last is a distribution; ``detection`` when one axis is
  long (>= 64 anchors) and the other short (<= 128 features), anchors first (``[3549, 6]``)
  or, as YOLOv8 writes it, features first with box coordinates in the first four rows and
  scores in [0, 1] below them (``[22, 2100]``); else ``sequence`` (steps x class logits);
- three or more axes otherwise: ``dense``.

Ambiguous shapes exist (logits and signed embeddings look alike), so every kind can be set
with ``--output-kind NAME=KIND``; the report says which kinds were found and which given.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from edgec.errors import OptionError
from edgec.manifest import OutputKind

__all__ = ["ANCHORS_MIN", "Kinds", "check_kind_names", "detect_kinds", "kind_of", "parse_output_kinds"]

ANCHORS_MIN = 64  # a detection head has at least this many anchors (BlazeFace: 896)
FEATURES_MAX = 128  # ... and at most this many values per anchor (box + classes)
_SUM_TOLERANCE = 1e-2

Kinds = dict[str, OutputKind]  # output name -> kind, in the model's output order


def _is_distribution(rows: np.ndarray) -> bool:
    """Rows (last axis) that are probabilities: non-negative and summing to 1."""
    if rows.size == 0 or rows.min() < -1e-6:
        return False
    sums = rows.reshape(-1, rows.shape[-1]).sum(-1, dtype=np.float64)
    return bool(np.all(np.abs(sums - 1.0) <= _SUM_TOLERANCE))


def _yolo_features_first(values: np.ndarray) -> bool:
    """``[4 + classes, anchors]``: four rows of box coordinates, then scores in [0, 1]."""
    if values.shape[0] < 5:
        return False
    scores = values[4:]
    return bool(scores.min() >= 0.0 and scores.max() <= 1.0 and values[:4].min() >= 0.0)


_NAME_HINTS = (
    (("logit", "prob", "softmax", "class", "label"), OutputKind.CLASSIFICATION),
    (
        ("landmark", "keypoint", "contour", "coord", "mesh", "embed", "feature", "iris", "depth", "mask"),
        OutputKind.DENSE,
    ),
)


def _hinted(name: str) -> OutputKind | None:
    lowered = name.lower()
    for words, kind in _NAME_HINTS:
        if any(word in lowered for word in words):
            return kind
    return None


def kind_of(values: Sequence[np.ndarray], name: str = "") -> OutputKind:
    """The kind of an output from its values on several samples (same shape each)."""
    first = np.asarray(values[0])
    if first.dtype.kind != "f":
        return OutputKind.SEQUENCE if first.size > 1 else OutputKind.CLASSIFICATION
    if first.size <= 1:
        return OutputKind.REGRESSION
    stacked = np.stack([np.asarray(v, dtype=np.float64) for v in values])
    shape = first.shape
    long_axes = [axis for axis, n in enumerate(shape) if n > 1]
    if len(long_axes) == 1:
        (axis,) = long_axes
        length = shape[axis]
        rows = stacked.reshape(len(values), length)
        if axis != len(shape) - 1:
            return OutputKind.DETECTION if length >= ANCHORS_MIN else OutputKind.REGRESSION
        if _is_distribution(rows):
            return OutputKind.CLASSIFICATION
        if (hint := _hinted(name)) is not None:
            return hint
        if length <= 4:
            return OutputKind.REGRESSION
        # logits centre on zero; coordinates and ReLU features sit away from it
        negative = float(np.mean(rows < 0.0))
        centred = abs(float(rows.mean())) <= float(rows.std()) and negative >= 0.25
        return OutputKind.CLASSIFICATION if centred else OutputKind.DENSE
    if len(shape) >= 4 or len(long_axes) >= 3:
        return OutputKind.DENSE
    a, b = (shape[axis] for axis in long_axes)
    squeezed = stacked.reshape(len(values), a, b)
    if _is_distribution(squeezed):
        return OutputKind.SEQUENCE
    if a >= ANCHORS_MIN and b <= FEATURES_MAX and a > b:
        return OutputKind.DETECTION
    if b >= ANCHORS_MIN and a <= FEATURES_MAX and b > a and all(_yolo_features_first(s) for s in squeezed):
        return OutputKind.DETECTION
    return OutputKind.SEQUENCE


def check_kind_names(given: Mapping[str, OutputKind], names: Sequence[str]) -> None:
    """An OptionError for a ``--output-kind`` name the model does not output."""
    unknown = sorted(set(given) - set(names))
    if unknown:
        raise OptionError(
            f"--output-kind names {', '.join(repr(n) for n in unknown)}, which the model does not "
            f"output; its outputs are {', '.join(repr(n) for n in names)}"
        )


def detect_kinds(
    reference: Sequence[Mapping[str, np.ndarray]], names: Sequence[str], given: Mapping[str, OutputKind]
) -> Kinds:
    """Each output's kind: the one given, else found from the reference outputs' values."""
    check_kind_names(given, names)
    found: Kinds = {}
    for name in names:
        values = [np.asarray(sample[name]) for sample in reference]
        shapes = {v.shape for v in values}
        if name in given:
            found[name] = given[name]
        elif len(shapes) > 1:  # the shape changes per sample (a variable length): judged on one
            found[name] = kind_of(values[:1], name)
        else:
            found[name] = kind_of(values, name)
    return found


def parse_output_kinds(specs: Sequence[str]) -> dict[str, OutputKind]:
    """``NAME=KIND`` options as a mapping; a malformed one is an OptionError naming it."""
    kinds: dict[str, OutputKind] = {}
    choices = ", ".join(k.value for k in OutputKind)
    for spec in specs:
        name, sep, kind = spec.rpartition("=")
        if not sep or not name:
            raise OptionError(f"--output-kind {spec!r} is not NAME=KIND (KIND is one of {choices})")
        try:
            kinds[name] = OutputKind(kind.strip().lower())
        except ValueError:
            message = f"--output-kind {spec!r}: {kind!r} is not a kind; use one of {choices}"
            raise OptionError(message) from None
    return kinds
