import numpy as np
import pytest

from compiler.kinds import detect_kinds, kind_of, parse_output_kinds
from compiler.verify import compare, gate_failures
from device_profiles import Gate
from edgec.errors import OptionError
from edgec.manifest import OutputKind

CLASSES = {"logits": OutputKind.CLASSIFICATION}
rng = np.random.default_rng(0)


def _outputs(rows):
    return [{"logits": np.asarray([r], dtype=np.float32)} for r in rows]


def test_identical_outputs():
    ref = _outputs([[0.1, 2.0, -1.0], [3.0, 0.0, 0.5]])
    m = compare(ref, ref, labels=np.array([1, 0]), kinds=CLASSES)
    assert m.max_abs_err == 0.0
    assert m.mean_abs_err == 0.0
    assert m.cosine == pytest.approx(1.0)
    assert m.top1_agreement == 1.0
    assert m.accuracy == m.source_accuracy == 1.0


def test_one_flipped_prediction():
    ref = _outputs([[0.0, 1.0], [1.0, 0.0], [0.0, 2.0], [2.0, 0.0]])
    cand = _outputs([[0.0, 1.0], [1.0, 0.0], [0.0, 2.0], [0.0, 2.0]])
    m = compare(ref, cand, labels=np.array([1, 0, 1, 0]), kinds=CLASSES)
    assert m.top1_agreement == 0.75
    assert m.source_accuracy == 1.0
    assert m.accuracy == 0.75
    assert m.max_abs_err == 2.0
    assert m.mean_abs_err == pytest.approx(4.0 / 8)
    # cosine of the flipped sample is 0, the others 1
    assert m.cosine == pytest.approx(0.75)


def test_integer_outputs_count_mismatches_not_errors():
    ref = [{"total": np.array([3], np.int64)}]
    cand = [{"total": np.array([4], np.int64)}]
    m = compare(ref, cand, labels=None, kinds={"total": OutputKind.CLASSIFICATION})
    assert m.max_abs_err == 1.0
    assert m.cosine is None
    assert m.top1_agreement == 0.0


def test_gate_failures_name_figure_and_limit():
    ref = _outputs([[0.0, 1.0], [1.0, 0.0]])
    cand = _outputs([[0.0, 1.0], [0.0, 1.0]])
    m = compare(ref, cand, labels=np.array([1, 0]), kinds=CLASSES)
    gate = Gate(min_cosine=0.99, min_top1_agreement=0.97, max_accuracy_drop_points=1.0)
    failures = gate_failures(m, gate)
    assert failures == [
        "top-1 agreement 0.5000 < 0.97",
        "cosine 0.500000 < 0.99",
        "accuracy drop 50.00 points > 1.0",
    ]
    assert gate_failures(compare(ref, ref, None, CLASSES), gate) == []


# ----------------------------------------------------------------------------- kinds from values


def _softmax(x, axis=-1):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


@pytest.mark.parametrize(
    ("values", "kind"),
    [
        (lambda: rng.normal(size=(1, 10)), OutputKind.CLASSIFICATION),  # logits
        (lambda: _softmax(rng.normal(size=(1, 1000))), OutputKind.CLASSIFICATION),
        (lambda: np.abs(rng.normal(size=(1, 1280))), OutputKind.DENSE),  # a ReLU embedding
        (lambda: rng.uniform(0, 192, size=(1, 1, 1, 1404)), OutputKind.DENSE),  # landmarks
        (lambda: rng.uniform(size=(1, 1, 64, 64)), OutputKind.DENSE),  # a probability map
        (lambda: rng.normal(size=(1, 1, 1, 1)), OutputKind.REGRESSION),  # a presence flag
        (lambda: rng.uniform(size=(1, 4)), OutputKind.REGRESSION),  # one box
        (lambda: rng.normal(size=(1, 896, 1)), OutputKind.DETECTION),  # BlazeFace scores
        (lambda: rng.normal(size=(1, 896, 16)), OutputKind.DETECTION),  # BlazeFace boxes
        (lambda: rng.uniform(size=(1, 3549, 6)), OutputKind.DETECTION),  # YOLOX
        (  # YOLOv8: [4 + classes, anchors], boxes in pixels then scores in [0, 1]
            lambda: np.concatenate([rng.uniform(0, 320, (1, 4, 2100)), rng.uniform(size=(1, 18, 2100))], 1),
            OutputKind.DETECTION,
        ),
        (lambda: rng.normal(size=(32, 1, 8210)), OutputKind.SEQUENCE),  # CTC logits [T, N, C]
        (lambda: _softmax(rng.normal(size=(1, 25, 37))), OutputKind.SEQUENCE),
    ],
)
def test_kind_found_from_shape_and_values(values, kind):
    samples = [values().astype(np.float32) for _ in range(3)]
    assert kind_of(samples) is kind


def test_integer_outputs_are_classes_or_sequences():
    assert kind_of([np.array([3], np.int64)]) is OutputKind.CLASSIFICATION
    assert kind_of([np.arange(7, dtype=np.int64)[None]]) is OutputKind.SEQUENCE


def test_given_kind_wins_and_unknown_names_are_refused():
    ref = [{"a": rng.normal(size=(1, 10)).astype(np.float32)}]
    assert detect_kinds(ref, ["a"], {"a": OutputKind.DENSE}) == {"a": OutputKind.DENSE}
    with pytest.raises(OptionError, match="'b', which the model does not output; its outputs are 'a'"):
        detect_kinds(ref, ["a"], {"b": OutputKind.DENSE})


def test_output_kind_options_parsed_with_clear_errors():
    assert parse_output_kinds(["scores=Detection", "a=b=dense"]) == {
        "scores": OutputKind.DETECTION,
        "a=b": OutputKind.DENSE,
    }
    with pytest.raises(OptionError, match="is not NAME=KIND"):
        parse_output_kinds(["scores"])
    with pytest.raises(OptionError, match="'boxes' is not a kind; use one of classification, dense"):
        parse_output_kinds(["x=boxes"])


# ----------------------------------------------------------------------------- metrics per kind


def test_detection_top1_is_not_used_and_confident_anchors_are():
    """A detector whose values barely move keeps its confident anchors even where the
    flattened argmax of near-equal background anchors flips (the failure that refused a
    near-identical TFLite fp16 face detector at top-1 0.13)."""
    ref, cand = [], []
    for _ in range(20):
        scores = rng.normal(-8.0, 0.01, size=(1, 896, 1))  # background, nearly tied
        scores[0, rng.integers(0, 896, 3), 0] = 4.0  # three faces
        noisy = scores + rng.normal(0, 0.02, scores.shape)
        ref.append({"scores": scores.astype(np.float32)})
        cand.append({"scores": noisy.astype(np.float32)})
    m = compare(ref, cand, None, {"scores": OutputKind.DETECTION})
    (scores,) = m.outputs
    assert scores.anchor_agreement == 1.0
    assert scores.top1_agreement is None
    assert m.top1_agreement is None
    fp16 = Gate(min_cosine=0.999, min_top1_agreement=0.995, max_accuracy_drop_points=0.5)
    assert gate_failures(m, fp16) == []


def test_detection_lost_anchor_fails_the_gate():
    scores = np.full((1, 896, 1), -8.0)
    scores[0, 10, 0] = 5.0
    scores[0, 20, 0] = 5.0
    lost = scores.copy()
    lost[0, 20, 0] = -8.0  # the candidate misses one of two objects
    boxes = rng.normal(size=(1, 896, 16))
    ref = [{"boxes": boxes.astype(np.float32), "scores": scores.astype(np.float32)}]
    cand = [{"boxes": boxes.astype(np.float32), "scores": lost.astype(np.float32)}]
    kinds = {"boxes": OutputKind.DETECTION, "scores": OutputKind.DETECTION}
    m = compare(ref, cand, None, kinds)
    by_name = {o.name: o for o in m.outputs}
    assert by_name["scores"].anchor_agreement == pytest.approx(2 / 3)  # 1 of ref's 2 + cand's 1 of 1
    assert by_name["boxes"].anchor_agreement is None  # the score head carries it
    assert by_name["boxes"].cosine == pytest.approx(1.0)
    gate = Gate(min_cosine=0.9, min_top1_agreement=0.97, max_accuracy_drop_points=1.0)
    assert "scores (detection): confident-anchor agreement 0.6667 < 0.97" in gate_failures(m, gate)


def test_yolo_head_scores_are_the_best_class_after_the_box():
    head = np.zeros((1, 22, 100))
    head[0, :4] = 50.0
    head[0, 4 + 3, 7] = 0.9  # one object of class 3 at anchor 7
    moved = head.copy()
    moved[0, 4 + 3, 7] = 0.1
    moved[0, 4 + 5, 9] = 0.9
    kinds = {"y": OutputKind.DETECTION}
    m = compare([{"y": head.astype(np.float32)}], [{"y": moved.astype(np.float32)}], None, kinds)
    assert m.outputs[0].anchor_agreement == 0.0


def test_sequence_agreement_is_per_step():
    ref = rng.normal(size=(32, 1, 50)).astype(np.float32)
    cand = ref.copy()
    cand[5, 0] = 0.0
    cand[5, 0, (ref[5, 0].argmax() + 1) % 50] = 100.0  # one step changes its class
    m = compare([{"seq": ref}], [{"seq": cand}], None, {"seq": OutputKind.SEQUENCE})
    assert m.outputs[0].sequence_agreement == pytest.approx(31 / 32)
    assert m.top1_agreement is None
    gate = Gate(min_cosine=0.5, min_top1_agreement=0.99, max_accuracy_drop_points=1.0)
    assert gate_failures(m, gate) == ["per-step agreement 0.9688 < 0.99"]


def test_dense_map_psnr_and_iou():
    ref = rng.uniform(size=(1, 1, 32, 32)).astype(np.float32)
    cand = ref.copy()
    cand[0, 0, :8] = 1.0 - cand[0, 0, :8]  # a quarter of the map inverted
    m = compare([{"map": ref}], [{"map": cand}], None, {"map": OutputKind.DENSE})
    (out,) = m.outputs
    assert 0.4 < out.map_iou < 0.8
    assert out.psnr_db < 15.0
    same = compare([{"map": ref}], [{"map": ref}], None, {"map": OutputKind.DENSE}).outputs[0]
    assert same.map_iou == 1.0
    assert same.psnr_db == 200.0


def test_regression_error_is_over_the_output_range():
    ref = [{"flag": np.array([[v]], np.float32)} for v in (-6.0, 0.0, 6.0)]
    cand = [{"flag": np.array([[v + 0.6]], np.float32)} for v in (-6.0, 0.0, 6.0)]
    m = compare(ref, cand, None, {"flag": OutputKind.REGRESSION})
    assert m.outputs[0].rel_err == pytest.approx(0.05, rel=1e-5)
    assert m.cosine is None  # a scalar's cosine says nothing; not in the summary
    gate = Gate(min_cosine=0.98, min_top1_agreement=0.97, max_accuracy_drop_points=1.0)  # max_rel_err 0.02
    assert gate_failures(m, gate) == ["error over range 0.05 > 0.02"]


def test_kind_tables_override_defaults_and_refuse_foreign_thresholds():
    gate = Gate(
        min_cosine=0.98,
        min_top1_agreement=0.97,
        max_accuracy_drop_points=1.0,
        detection={"min_anchor_agreement": 0.9},
    )
    assert gate.for_kind(OutputKind.DETECTION) == {"min_cosine": 0.98, "min_anchor_agreement": 0.9}
    assert gate.for_kind(OutputKind.SEQUENCE) == {"min_sequence_agreement": 0.97}
    assert gate.flat()["detection.min_anchor_agreement"] == 0.9
    with pytest.raises(ValueError, match="detection gate cannot use min_top1_agreement"):
        Gate(
            min_cosine=0.98,
            min_top1_agreement=0.97,
            max_accuracy_drop_points=1.0,
            detection={"min_top1_agreement": 0.9},
        )


def test_landmarks_with_negative_depth_are_dense_and_names_decide_first():
    """MediaPipe's iris model writes [1, 213]: x, y in pixels and z around zero. Judged as
    class scores, the argmax of two nearly equal coordinates flips; they are dense."""
    points = [
        np.stack([rng.uniform(0, 64, 71), rng.uniform(0, 64, 71), rng.normal(0, 3, 71)], 1).reshape(1, 213)
        for _ in range(3)
    ]
    assert kind_of([p.astype(np.float32) for p in points]) is OutputKind.DENSE
    logits = [np.abs(rng.normal(size=(1, 10))).astype(np.float32) for _ in range(3)]
    assert kind_of(logits) is OutputKind.DENSE
    assert kind_of(logits, name="class_logits") is OutputKind.CLASSIFICATION
    centred = [rng.normal(size=(1, 10)).astype(np.float32) for _ in range(3)]
    assert kind_of(centred, name="output_iris") is OutputKind.DENSE


def test_nan_outputs_miss_the_gate():
    """A NaN cosine compares false with every limit: it must fail the gate, not slip past it."""
    ref = [{"emb": np.abs(rng.normal(size=(1, 64))).astype(np.float32)}]
    cand = [{"emb": np.full((1, 64), np.nan, np.float32)}]
    m = compare(ref, cand, None, {"emb": OutputKind.DENSE})
    gate = Gate(min_cosine=0.98, min_top1_agreement=0.97, max_accuracy_drop_points=1.0)
    assert gate_failures(m, gate) == ["cosine nan < 0.98"]


def test_box_head_is_judged_on_the_anchors_the_scores_call_confident():
    """BlazeFace's regressors hold noise for the 890-odd background anchors; int8 moves that
    noise a lot and the faces' boxes little. The box head's cosine is over confident anchors;
    the score head's over their probabilities (logits near 0 flip sign for nothing)."""
    scores = np.full((1, 896, 1), -6.0)
    scores[0, [5, 6, 7], 0] = 3.0
    boxes = rng.normal(0, 50, (1, 896, 16))
    moved = boxes + rng.normal(0, 40, boxes.shape)  # background boxes: anything
    moved[0, [5, 6, 7]] = boxes[0, [5, 6, 7]] * 1.001  # the faces' boxes: kept
    near = scores + 0.05
    ref = [{"boxes": boxes.astype(np.float32), "scores": scores.astype(np.float32)}]
    cand = [{"boxes": moved.astype(np.float32), "scores": near.astype(np.float32)}]
    kinds = {"boxes": OutputKind.DETECTION, "scores": OutputKind.DETECTION}
    by_name = {o.name: o for o in compare(ref, cand, None, kinds).outputs}
    assert by_name["boxes"].cosine == pytest.approx(1.0, abs=1e-6)
    assert by_name["scores"].cosine == pytest.approx(1.0, abs=1e-4)
    assert by_name["scores"].anchor_agreement == 1.0
