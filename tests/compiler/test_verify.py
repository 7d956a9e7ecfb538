import numpy as np
import pytest

from compiler.verify import compare, gate_failures
from device_profiles import Gate


def _outputs(rows):
    return [{"logits": np.asarray([r], dtype=np.float32)} for r in rows]


def test_identical_outputs():
    ref = _outputs([[0.1, 2.0, -1.0], [3.0, 0.0, 0.5]])
    m = compare(ref, ref, labels=np.array([1, 0]), output_names=["logits"])
    assert m.max_abs_err == 0.0
    assert m.mean_abs_err == 0.0
    assert m.cosine == pytest.approx(1.0)
    assert m.top1_agreement == 1.0
    assert m.accuracy == m.source_accuracy == 1.0


def test_one_flipped_prediction():
    ref = _outputs([[0.0, 1.0], [1.0, 0.0], [0.0, 2.0], [2.0, 0.0]])
    cand = _outputs([[0.0, 1.0], [1.0, 0.0], [0.0, 2.0], [0.0, 2.0]])
    m = compare(ref, cand, labels=np.array([1, 0, 1, 0]), output_names=["logits"])
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
    m = compare(ref, cand, labels=None, output_names=["total"])
    assert m.max_abs_err == 1.0
    assert m.cosine is None
    assert m.top1_agreement is None


def test_gate_failures_name_figure_and_limit():
    ref = _outputs([[0.0, 1.0], [1.0, 0.0]])
    cand = _outputs([[0.0, 1.0], [0.0, 1.0]])
    m = compare(ref, cand, labels=np.array([1, 0]), output_names=["logits"])
    gate = Gate(min_cosine=0.99, min_top1_agreement=0.97, max_accuracy_drop_points=1.0)
    failures = gate_failures(m, gate)
    assert len(failures) == 3
    assert "cosine 0.500000 < 0.99" in failures[0]
    assert "top-1 agreement 0.5000 < 0.97" in failures[1]
    assert "accuracy drop 50.00 points > 1.0" in failures[2]
    assert gate_failures(compare(ref, ref, None, ["logits"]), gate) == []
