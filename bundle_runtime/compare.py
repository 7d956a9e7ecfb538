"""Judging one model's outputs against another's on the same inputs, each output by its kind.

The figures that mean something for each kind (``edgec.manifest.OutputKind``): top-1
agreement for class scores, cosine, PSNR and the IoU of a [0, 1] map for dense outputs,
per-step argmax agreement for sequences, cosine per head and agreement on the confident
anchors for detection heads, error over the output's range for regression; max and mean
absolute error for all, task accuracy when labels are given. ``missed`` turns one output's
figures into the thresholds it misses (a gate's ``kind.threshold`` values).

The compiler judges an artifact against its source model with it (``compiler.verify``),
the agent a shadow candidate against the serving model (``agent.shadow``): the same figures
on both sides.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from edgec.manifest import Metrics, OutputKind, OutputMetrics

__all__ = ["DETECTION_SCORE", "Outputs", "compare", "missed"]

Outputs = list[dict[str, np.ndarray]]  # one dict of named outputs per sample
Pairs = list[tuple[np.ndarray, np.ndarray]]  # each sample's reference and candidate value of one output
DETECTION_SCORE = 0.25  # an anchor is confident at this probability (YOLO's default threshold)
_SLACK = 0.5  # ... and is found by the other side if it scores at least half of that there
_MAX_ANCHORS = 100  # the most confident anchors compared per sample
_PSNR_CAP = 200.0  # identical values: PSNR is infinite; JSON has no infinity


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    norm = float(np.linalg.norm(a) * np.linalg.norm(b))
    if norm == 0.0:
        return 1.0 if not a.any() and not b.any() else 0.0
    return float(np.dot(a, b) / norm)


def _pairs(reference: Outputs, candidate: Outputs, name: str) -> Pairs:
    """Each sample's reference and candidate value of ``name``, the candidate in the
    reference's shape (a runtime may drop or add axes of length 1)."""
    found = []
    for ref, cand in zip(reference, candidate, strict=True):
        r = np.asarray(ref[name])
        c = np.asarray(cand[name])
        found.append((r, c.reshape(r.shape) if c.shape != r.shape else c))
    return found


def _rows(array: np.ndarray) -> np.ndarray:
    """Class scores on the last axis, one row per position."""
    return array.reshape(-1, array.shape[-1]) if array.ndim else array.reshape(1, 1)


def _argmax_agreement(pairs: Pairs) -> tuple[float, np.ndarray, np.ndarray]:
    ref_top = np.concatenate([_rows(r).argmax(-1) for r, _ in pairs])
    cand_top = np.concatenate([_rows(c).argmax(-1) for _, c in pairs])
    return float(np.mean(ref_top == cand_top)), ref_top, cand_top


def _to_anchors(array: np.ndarray) -> np.ndarray:
    """A detection head as ``[anchors, features]`` (anchors the longer axis)."""
    squeezed = array.reshape([n for n in array.shape if n > 1] or [1])
    if squeezed.ndim == 1:
        return squeezed.reshape(-1, 1)
    two = squeezed.reshape(squeezed.shape[0], -1)
    return two if two.shape[0] >= two.shape[1] else two.T


def _sigmoid(values: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(values, -60.0, 60.0)))


def _anchor_scores(anchors: np.ndarray) -> np.ndarray | None:
    """Per-anchor score of a head: its only value, or the best class score after a box."""
    if anchors.shape[1] == 1:
        return anchors[:, 0]
    if anchors.shape[1] > 4:
        return anchors[:, 4:].max(axis=1)
    return None


def _probabilities(
    ref_scores: Sequence[np.ndarray], cand_scores: Sequence[np.ndarray]
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Scores as probabilities, both sides alike: through a sigmoid when the reference's
    are not in [0, 1] (logits)."""
    ref_p = [s.astype(np.float64) for s in ref_scores]
    cand_p = [s.astype(np.float64) for s in cand_scores]
    if any(s.min(initial=0.0) < 0.0 or s.max(initial=0.0) > 1.0 for s in ref_p):
        return [_sigmoid(s) for s in ref_p], [_sigmoid(s) for s in cand_p]
    return ref_p, cand_p


def _confident_cosine(
    pairs: Pairs, ref_p: Sequence[np.ndarray], cand_p: Sequence[np.ndarray], own: bool
) -> float | None:
    """Mean over samples of the cosine of the rows of the anchors the reference is confident
    about (background anchors' boxes are noise a detector never reports); a head of scores
    alone is compared as probabilities (logits near 0 flip sign for a change that decides
    nothing). None when no sample has a confident anchor."""
    if own and _to_anchors(pairs[0][0]).shape[1] == 1:
        pairs = [(r.reshape(-1, 1), c.reshape(-1, 1)) for r, c in zip(ref_p, cand_p, strict=True)]
    cosines = []
    for (r, c), p in zip(pairs, ref_p, strict=True):
        rows = np.flatnonzero(p >= DETECTION_SCORE)
        if rows.size:
            ra, ca = _to_anchors(r)[rows], _to_anchors(c)[rows]
            cosines.append(_cosine(ra.ravel().astype(np.float64), ca.ravel().astype(np.float64)))
    return float(np.mean(cosines)) if cosines else None


def _anchor_agreement(ref_p: Sequence[np.ndarray], cand_p: Sequence[np.ndarray]) -> float | None:
    """Of the anchors either side is confident about (the top ``_MAX_ANCHORS`` at
    ``DETECTION_SCORE`` or more), the share the other side also scores as likely
    (``_SLACK`` of the threshold: an anchor at 0.26 against 0.20 is not a disagreement).
    ``None`` when neither side is confident about any anchor on any sample."""
    found = total = 0
    for r, c in zip(ref_p, cand_p, strict=True):
        for mine, theirs in ((r, c), (c, r)):
            confident = np.flatnonzero(mine >= DETECTION_SCORE)
            if confident.size > _MAX_ANCHORS:
                confident = confident[np.argsort(mine[confident])[-_MAX_ANCHORS:]]
            total += confident.size
            found += int(np.count_nonzero(theirs[confident] >= _SLACK * DETECTION_SCORE))
    return found / total if total else None


def _score_heads(pairs_by_name: Mapping[str, Pairs], kinds: Mapping[str, OutputKind]) -> dict[int, str]:
    """Detection heads that hold only a score per anchor, by anchor count (BlazeFace writes
    scores and boxes as two outputs: the boxes are judged by cosine, the scores by both)."""
    heads: dict[int, str] = {}
    for name, kind in kinds.items():
        if kind is OutputKind.DETECTION and name in pairs_by_name:
            anchors = _to_anchors(pairs_by_name[name][0][0])
            if anchors.shape[1] == 1:
                heads.setdefault(anchors.shape[0], name)
    return heads


def _float_figures(pairs: Pairs) -> dict[str, float]:
    max_err = 0.0
    abs_sum = 0.0
    count = 0
    square_sum = 0.0
    low = np.inf
    high = -np.inf
    cosines = []
    for r, c in pairs:
        r64, c64 = r.astype(np.float64), c.astype(np.float64)
        diff = np.abs(r64 - c64)
        max_err = max(max_err, float(diff.max(initial=0.0)))
        abs_sum += float(diff.sum())
        square_sum += float(np.square(diff).sum())
        count += diff.size
        if r64.size:
            low, high = min(low, float(r64.min())), max(high, float(r64.max()))
        cosines.append(_cosine(r64.ravel(), c64.ravel()))
    mse = square_sum / count if count else 0.0
    peak = high - low if high > low else max(abs(high), abs(low), 1e-12)
    psnr = _PSNR_CAP if mse == 0.0 else min(_PSNR_CAP, float(10.0 * np.log10(peak * peak / mse)))
    return {
        "max_abs_err": max_err,
        "mean_abs_err": abs_sum / count if count else 0.0,
        "cosine": float(np.mean(cosines)) if cosines else 1.0,
        "psnr_db": psnr,
        # over the output's scale: a presence logit near 16 that moves by 1 over the data has
        # a range of 1 but a scale of 16
        "rel_err": max_err / max(peak, abs(high), abs(low)),
    }


def _map_iou(pairs: Pairs) -> float | None:
    """IoU of the maps thresholded at 0.5, pooled over samples, where the reference is in [0, 1]."""
    if any(r.min(initial=0.0) < 0.0 or r.max(initial=0.0) > 1.0 for r, _ in pairs):
        return None
    inter = union = 0
    for r, c in pairs:
        rm, cm = r >= 0.5, c >= 0.5
        inter += int(np.count_nonzero(rm & cm))
        union += int(np.count_nonzero(rm | cm))
    return inter / union if union else None


def _output_metrics(name: str, kind: OutputKind, pairs: Pairs) -> OutputMetrics:
    if pairs[0][0].dtype.kind != "f":  # integers: values must be equal
        equal = float(np.mean(np.concatenate([(r == c).ravel() for r, c in pairs])))
        mismatch = 0.0 if equal == 1.0 else 1.0
        agreement = {"sequence_agreement" if kind is OutputKind.SEQUENCE else "top1_agreement": equal}
        return OutputMetrics(name=name, kind=kind, max_abs_err=mismatch, **agreement)
    figures = _float_figures(pairs)
    common = {"max_abs_err": figures["max_abs_err"], "mean_abs_err": figures["mean_abs_err"]}
    if kind is OutputKind.CLASSIFICATION:
        top1, _, _ = _argmax_agreement(pairs)
        return OutputMetrics(name=name, kind=kind, cosine=figures["cosine"], top1_agreement=top1, **common)
    if kind is OutputKind.SEQUENCE:
        steps, _, _ = _argmax_agreement(pairs)
        cosine = figures["cosine"]
        return OutputMetrics(name=name, kind=kind, cosine=cosine, sequence_agreement=steps, **common)
    if kind is OutputKind.DENSE:
        return OutputMetrics(
            name=name,
            kind=kind,
            cosine=figures["cosine"],
            psnr_db=figures["psnr_db"],
            map_iou=_map_iou(pairs),
            **common,
        )
    if kind is OutputKind.DETECTION:  # compare() narrows the cosine to confident anchors
        return OutputMetrics(name=name, kind=kind, cosine=figures["cosine"], **common)
    return OutputMetrics(name=name, kind=kind, rel_err=figures["rel_err"], **common)


def _detection_scores(
    name: str, pairs_by_name: Mapping[str, Pairs], score_heads: dict[int, str]
) -> tuple[Pairs | None, bool]:
    """The per-anchor scores a detection head is judged with, and whether they are its own:
    a score head of the same anchor count (BlazeFace's boxes and scores are two outputs)
    gives its scores to the box head, whose own columns are not scores; else a head's best
    class score after its box (YOLO), or its only value."""
    pairs = pairs_by_name[name]
    anchors = [(_to_anchors(r), _to_anchors(c)) for r, c in pairs]
    count, width = anchors[0][0].shape
    sibling = score_heads.get(count)
    if width != 1 and sibling not in (None, name):
        assert sibling is not None
        sibling_pairs = [(_to_anchors(r), _to_anchors(c)) for r, c in pairs_by_name[sibling]]
        return [(r[:, 0], c[:, 0]) for r, c in sibling_pairs], False
    scores = [(_anchor_scores(r), _anchor_scores(c)) for r, c in anchors]
    if any(r is None or c is None for r, c in scores):
        return None, False
    return [(r, c) for r, c in scores if r is not None and c is not None], True


def compare(
    reference: Outputs, candidate: Outputs, labels: np.ndarray | None, kinds: Mapping[str, OutputKind]
) -> Metrics:
    """Figures of ``candidate`` against ``reference`` (both per sample, same order), each
    output judged by its kind."""
    pairs_by_name = {name: _pairs(reference, candidate, name) for name in kinds}
    score_heads = _score_heads(pairs_by_name, kinds)
    outputs = []
    for name, kind in kinds.items():
        pairs = pairs_by_name[name]
        found = _output_metrics(name, kind, pairs)
        if kind is OutputKind.DETECTION and pairs[0][0].dtype.kind == "f":
            scores, own = _detection_scores(name, pairs_by_name, score_heads)
            if scores is not None:
                ref_p, cand_p = _probabilities([r for r, _ in scores], [c for _, c in scores])
                confident = _confident_cosine(pairs, ref_p, cand_p, own)
                found = found.model_copy(
                    update={
                        "cosine": found.cosine if confident is None else confident,
                        "anchor_agreement": _anchor_agreement(ref_p, cand_p) if own else None,
                    }
                )
        outputs.append(found)

    accuracy = source_accuracy = None
    heads = [o.name for o in outputs if o.kind is OutputKind.CLASSIFICATION]
    if labels is not None and heads:
        _, ref_top, cand_top = _argmax_agreement(pairs_by_name[heads[0]])
        if len(ref_top) == len(labels):
            accuracy = float(np.mean(cand_top == labels))
            source_accuracy = float(np.mean(ref_top == labels))

    def worst(values: Sequence[float | None], largest: bool = False) -> float | None:
        found = [v for v in values if v is not None]
        return (max(found) if largest else min(found)) if found else None

    floats = [o for o in outputs if o.mean_abs_err is not None]
    sizes = {o.name: sum(r.size for r, _ in pairs_by_name[o.name]) for o in floats}
    total = sum(sizes.values())
    return Metrics(
        samples=len(reference),
        max_abs_err=worst([o.max_abs_err for o in outputs], largest=True),
        mean_abs_err=sum((o.mean_abs_err or 0.0) * sizes[o.name] for o in floats) / total if total else None,
        cosine=worst([o.cosine for o in outputs if o.kind is not OutputKind.REGRESSION]),
        top1_agreement=worst([o.top1_agreement for o in outputs if o.kind is OutputKind.CLASSIFICATION]),
        accuracy=accuracy,
        source_accuracy=source_accuracy,
        outputs=outputs,
    )


# threshold name -> (figure on OutputMetrics, its label in a message, format, True: a minimum)
_THRESHOLDS = {
    "min_cosine": ("cosine", "cosine", ".6f", True),
    "min_psnr_db": ("psnr_db", "PSNR", ".1f", True),
    "min_top1_agreement": ("top1_agreement", "top-1 agreement", ".4f", True),
    "min_map_iou": ("map_iou", "map IoU", ".4f", True),
    "min_sequence_agreement": ("sequence_agreement", "per-step agreement", ".4f", True),
    "min_anchor_agreement": ("anchor_agreement", "confident-anchor agreement", ".4f", True),
    "max_rel_err": ("rel_err", "error over range", ".4g", False),
}


def missed(output: OutputMetrics, thresholds: Mapping[str, float]) -> list[str]:
    """Each of ``thresholds`` (``min_cosine``, ``max_rel_err``, ...) that ``output`` misses, as a phrase
    naming the figure and the limit; a figure that does not apply (``None``) misses nothing."""
    failures = []
    for threshold, limit in thresholds.items():
        field, label, spec, minimum = _THRESHOLDS[threshold]
        value = getattr(output, field)
        if value is None:
            continue
        if not (value >= limit if minimum else value <= limit):  # NaN misses every limit
            failures.append(f"{label} {value:{spec}} {'<' if minimum else '>'} {limit}")
    return failures
