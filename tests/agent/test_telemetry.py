"""Telemetry windows: latency percentiles, PSI drift against real reference statistics, one
model per window, and the on-disk buffer across restarts, overflow and corruption."""

from __future__ import annotations

import json
import logging
import threading

import numpy as np
import pytest

from agent.drift import DriftConfig, DriftMonitor, worst_verdict
from agent.telemetry import LatencyHistogram, TelemetryBuffer, WindowRecorder
from compiler.stats import tensor_stats
from edgec.manifest import TensorStats
from edgec.reports import DriftVerdict, Telemetry
from tests.conftest import DIGITS


class FakeClock:
    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def calib() -> np.ndarray:
    return np.load(DIGITS / "calib.npz")["x"]


@pytest.fixture(scope="module")
def held_out() -> np.ndarray:
    return np.load(DIGITS / "eval.npz")["x"]


@pytest.fixture(scope="module")
def reference(calib) -> TensorStats:
    """The digits input's reference statistics, made the way ``edgec build`` makes them."""
    stats = tensor_stats("x", list(calib))
    assert stats is not None
    return stats


# --- latency histogram ---------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_percentiles_within_one_bucket_of_numpy(seed):
    rng = np.random.default_rng(seed)
    # a long-tailed latency mix: most requests near 2 ms, some slow ones near 40 ms
    samples = np.concatenate(
        [rng.lognormal(np.log(2e-3), 0.3, 9_000), rng.lognormal(np.log(40e-3), 0.5, 1_000)]
    )
    histogram = LatencyHistogram()
    for value in samples:
        histogram.add(float(value))

    assert histogram.count == samples.size
    qs = [1, 25, 50, 90, 95, 99, 99.9]
    estimates = histogram.percentiles(qs)
    for q, estimate in zip(qs, estimates, strict=True):
        assert estimate is not None
        # the same rank numpy's inverted-CDF percentile answers: in the same bucket, so within its width
        exact = np.percentile(samples, q, method="inverted_cdf")
        assert abs(estimate - exact) <= exact * histogram.relative_error, q
        # numpy's default (linear) lies between two neighbouring samples: within two widths
        linear = np.percentile(samples, q)
        assert abs(estimate - linear) <= 2 * linear * histogram.relative_error, q
        assert histogram.percentile(q) == estimate


def test_percentiles_of_an_empty_a_single_and_an_extreme_histogram():
    histogram = LatencyHistogram()
    assert histogram.percentiles([50, 99]) == [None, None]

    histogram.add(0.0123)
    assert histogram.percentile(50) == pytest.approx(0.0123)
    assert histogram.percentile(99) == pytest.approx(0.0123)

    histogram.reset()
    histogram.add(3e-6)  # below the lowest bucket
    histogram.add(250.0)  # above the highest
    assert histogram.percentile(0) == 3e-6
    assert histogram.percentile(100) == 250.0
    assert 0 <= histogram.percentile(25) < 10e-6

    with pytest.raises(ValueError, match="between 0 and 100"):
        histogram.percentile(101)
    with pytest.raises(ValueError, match=">= 0"):
        histogram.add(float("nan"))


def test_merged_histograms_answer_like_one_that_saw_everything():
    rng = np.random.default_rng(7)
    first, second = rng.lognormal(-6, 1, 3000), rng.lognormal(-4, 1, 2000)
    whole, left, right = LatencyHistogram(), LatencyHistogram(), LatencyHistogram()
    for value in first:
        whole.add(float(value))
        left.add(float(value))
    for value in second:
        whole.add(float(value))
        right.add(float(value))

    left.merge(right)

    assert left.count == whole.count == 5000
    assert left.percentiles([50, 95, 99]) == whole.percentiles([50, 95, 99])
    with pytest.raises(ValueError, match="different buckets"):
        left.merge(LatencyHistogram(growth=1.1))


# --- drift ---------------------------------------------------------------------------------


def test_values_outside_the_reference_range_fall_in_the_open_end_bins(reference):
    monitor = DriftMonitor([reference])
    values = np.array([-100.0, 1e9, np.nan, np.inf, -np.inf, reference.bin_edges[1]], dtype=np.float32)

    counts = monitor.bin_counts("x", values)

    assert counts is not None
    assert counts.size == len(reference.bin_fractions)
    assert counts[0] == 1  # -100
    assert counts[-1] == 1  # 1e9; the non-finite values are not counted
    assert counts[1] == 1  # a value on an inner edge opens that edge's bin, as np.histogram has it
    assert counts.sum() == 3
    assert monitor.bin_counts("not-a-tensor", values) is None
    assert monitor.bin_counts("x", np.array(["a", "b"])) is None


def test_psi_is_near_zero_for_traffic_like_the_reference(reference, held_out):
    monitor = DriftMonitor([reference])
    for image in held_out:
        monitor.observe("x", image)

    psi = monitor.psi("x")

    assert psi is not None
    assert psi < 0.05
    assert monitor.verdicts() == {"x": DriftVerdict.OK}
    assert monitor.verdict() is DriftVerdict.OK


def test_inputs_shifted_by_half_a_std_are_drift(reference, held_out):
    monitor = DriftMonitor([reference])
    for image in held_out:
        monitor.observe("x", image + 0.5 * reference.std)

    psi = monitor.psi("x")

    assert psi is not None
    assert psi >= 0.25
    assert monitor.verdict() is DriftVerdict.DRIFT


def test_drift_of_inputs_and_outputs_of_the_real_digits_model(calib, held_out):
    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(str(DIGITS / "model.onnx"), providers=["CPUExecutionProvider"])

    def logits(images: np.ndarray) -> list[np.ndarray]:
        return [session.run(None, {"x": image[None]})[0] for image in images]

    stats = [tensor_stats("x", list(calib)), tensor_stats("logits", logits(calib))]
    reference = [s for s in stats if s is not None]
    same, shifted = DriftMonitor(reference), DriftMonitor(reference)
    for image, out in zip(held_out, logits(held_out), strict=True):
        same.observe("x", image)
        same.observe("logits", out)
    moved = held_out + 0.5 * reference[0].std
    for image, out in zip(moved, logits(moved), strict=True):
        shifted.observe("x", image)
        shifted.observe("logits", out)

    assert set(same.verdicts()) == {"x", "logits"}
    assert same.verdict() is not DriftVerdict.DRIFT
    assert shifted.verdicts()["x"] is DriftVerdict.DRIFT
    assert shifted.verdict() is DriftVerdict.DRIFT


def test_no_verdict_until_enough_values_from_enough_requests(reference, held_out):
    config = DriftConfig(min_values=500, min_samples=10)
    monitor = DriftMonitor([reference], config)
    per_image = held_out[0].size  # 64 values

    for image in held_out[:9]:
        monitor.observe("x", image)
    assert monitor.observed("x") == 9 * per_image  # 576 values, but only 9 requests
    assert monitor.psi("x") is None
    assert monitor.verdicts() == {}
    assert monitor.verdict() is None

    monitor.observe("x", held_out[9])
    assert monitor.psi("x") is not None

    monitor.reset()
    assert monitor.observed("x") == 0
    assert monitor.psi("x") is None


def test_a_large_tensor_is_subsampled_to_the_cap():
    rng = np.random.default_rng(3)
    stats = tensor_stats("image", [rng.normal(size=(224, 224, 3)) for _ in range(4)])
    assert stats is not None
    monitor = DriftMonitor([stats], DriftConfig(max_values_per_sample=4096, min_samples=1))

    monitor.observe("image", rng.normal(size=(224, 224, 3)).astype(np.float32))

    assert monitor.observed("image") == 4096
    psi = monitor.psi("image")
    assert psi is not None
    assert psi < 0.1


def test_thresholds_and_the_worst_verdict():
    config = DriftConfig()
    assert [config.verdict(v) for v in (0.0, 0.0999, 0.1, 0.2499, 0.25, 3.0)] == [
        DriftVerdict.OK,
        DriftVerdict.OK,
        DriftVerdict.WARN,
        DriftVerdict.WARN,
        DriftVerdict.DRIFT,
        DriftVerdict.DRIFT,
    ]
    assert worst_verdict([DriftVerdict.OK, DriftVerdict.DRIFT, DriftVerdict.WARN]) is DriftVerdict.DRIFT
    assert worst_verdict([DriftVerdict.OK, DriftVerdict.WARN]) is DriftVerdict.WARN
    assert worst_verdict([]) is None
    with pytest.raises(ValueError, match="warn_psi"):
        DriftConfig(warn_psi=0.3, drift_psi=0.2)


def test_malformed_reference_statistics_are_skipped_not_raised(caplog):
    broken = TensorStats(
        name="x", count=1, mean=0, std=0, min=0, max=1, bin_edges=[0.0, 1.0], bin_fractions=[0.5, 0.5]
    )
    with caplog.at_level(logging.WARNING, logger="agent.drift"):
        monitor = DriftMonitor([broken])
    assert monitor.names == []
    assert "malformed" in caplog.text


# --- windows -------------------------------------------------------------------------------


def test_a_window_reports_counts_percentiles_drift_and_times(reference, held_out):
    clock, wall = FakeClock(), FakeClock(1_700_000_000.0)
    recorder = WindowRecorder([reference], 60.0, model="digits:1", first_seq=41, clock=clock, wall=wall)
    latencies = np.random.default_rng(0).lognormal(np.log(3e-3), 0.4, held_out.shape[0])
    for i, (image, latency) in enumerate(zip(held_out, latencies, strict=True)):
        recorder.record("digits:1", float(latency), ok=i % 50 != 0, inputs={"x": image[None]})

    clock.now += 59.0
    assert not recorder.due()
    clock.now += 1.0
    wall.now += 60.0
    assert recorder.due()
    window = recorder.close_window()

    served = np.array([lat for i, lat in enumerate(latencies) if i % 50 != 0])
    assert window.seq == 41
    assert window.model == "digits:1"
    assert window.requests == held_out.shape[0]
    assert window.errors == len(range(0, held_out.shape[0], 50))
    assert window.window_s == 60.0
    assert window.started_at == "2023-11-14T22:13:20.000+00:00"
    assert window.ended_at == "2023-11-14T22:14:20.000+00:00"
    for q, figure in ((50, window.p50_ms), (95, window.p95_ms), (99, window.p99_ms)):
        exact_ms = np.percentile(served, q, method="inverted_cdf") * 1e3
        assert figure == pytest.approx(exact_ms, rel=0.051)
    assert window.psi is not None
    assert set(window.psi) == {"x"}
    assert window.psi["x"] < 0.1
    assert window.drift == "ok"

    # the next window starts empty and numbers on
    assert not recorder.due()
    clock.now += 60.0
    idle = recorder.close_window()
    assert (idle.seq, idle.requests, idle.errors, idle.p50_ms, idle.drift, idle.psi) == (
        42,
        0,
        0,
        None,
        None,
        {},
    )


def test_a_window_of_shifted_inputs_says_drift(reference, held_out):
    recorder = WindowRecorder([reference], 60.0, model="digits:1", clock=FakeClock())
    for image in held_out:
        recorder.record("digits:1", 0.002, ok=True, inputs={"x": image + 0.5 * reference.std})

    window = recorder.close_window()

    assert window.drift == "drift"
    assert window.psi is not None
    assert window.psi["x"] >= 0.25


def test_a_window_never_mixes_models(reference, held_out):
    clock = FakeClock()
    recorder = WindowRecorder([reference], 60.0, first_seq=1, clock=clock, wall=FakeClock(0.0))
    for image in held_out[:30]:
        recorder.record("digits:1", 0.001, ok=True, inputs={"x": image})
    clock.now += 10
    recorder.set_reference("digits:2", [reference])  # swapped mid-window
    assert recorder.model == "digits:2"
    for image in held_out[30:70]:
        recorder.record("digits:2", 0.004, ok=True, inputs={"x": image + 0.5 * reference.std})
    recorder.record("digits:1", 0.001, ok=False)  # in flight on the old model during the swap
    for image in held_out[70:100]:
        recorder.record("digits:2", 0.004, ok=True, inputs={"x": image + 0.5 * reference.std})

    assert recorder.due()  # closed windows wait, although the 60 s are not up
    windows = []
    while recorder.due():
        windows.append(recorder.close_window())
    clock.now += 60
    assert recorder.due()
    windows.append(recorder.close_window())

    got = [(w.seq, w.model, w.requests, w.errors) for w in windows]
    assert got == [
        (1, "digits:1", 30, 0),
        (2, "digits:2", 40, 0),
        (3, "digits:1", 1, 1),
        (4, "digits:2", 30, 0),
    ]
    assert windows[0].window_s == 10.0
    assert windows[0].p99_ms == pytest.approx(1.0, rel=0.05)
    assert windows[1].p50_ms == pytest.approx(4.0, rel=0.05)
    assert windows[0].drift == "ok"  # the reference came with the constructor, for the first model
    assert windows[1].drift == "drift"
    assert windows[2].drift is None  # one failed request: no drift figures at all
    assert windows[3].drift == "drift"


def test_record_from_many_threads_counts_every_request(reference, held_out):
    recorder = WindowRecorder([reference], 60.0, model="digits:1", clock=FakeClock())
    threads, per_thread = 8, 500
    start = threading.Barrier(threads)

    def serve(worker: int) -> None:
        start.wait()
        for i in range(per_thread):
            image = held_out[(worker * per_thread + i) % len(held_out)]
            recorder.record("digits:1", 0.001 + worker * 1e-4, ok=i % 10 != 0, inputs={"x": image})

    workers = [threading.Thread(target=serve, args=(w,)) for w in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()

    window = recorder.close_window()
    assert window.requests == threads * per_thread
    assert window.errors == threads * per_thread // 10
    assert window.drift == "ok"
    assert 1.0 <= window.p50_ms <= 1.8


def test_windows_travel_through_the_wire_schema(reference, held_out):
    recorder = WindowRecorder([reference], 60.0, model="digits:1", clock=FakeClock())
    for image in held_out:
        recorder.record("digits:1", 0.002, ok=True, inputs={"x": image})
    payload = json.dumps(recorder.close_window().model_dump(mode="json", exclude_none=True))

    figures = Telemetry.model_validate(json.loads(payload)).figures()  # as the server reads it

    assert figures["model"] == "digits:1"
    assert figures["requests"] == held_out.shape[0]
    assert set(figures["psi"]) == {"x"}
    # a window from an agent that knows none of the new fields still validates
    assert Telemetry.model_validate({"window_s": 60, "requests": 3}).figures() == {
        "window_s": 60.0,
        "requests": 3,
        "errors": 0,
    }


# --- offline buffer ------------------------------------------------------------------------


def test_the_buffer_keeps_order_across_a_restart(tmp_path):
    buffer = TelemetryBuffer(tmp_path)
    seqs = [buffer.append({"window": i}) for i in range(40)]
    assert seqs == list(range(40))
    buffer.ack(0)
    buffer.ack(2)

    restarted = TelemetryBuffer(tmp_path)

    kept = [1, *range(3, 40)]
    assert restarted.pending() == [(i, {"window": i}) for i in kept]
    assert restarted.pending(limit=2) == [(1, {"window": 1}), (3, {"window": 3})]
    assert restarted.append({"window": 40}) == 40
    assert [seq for seq, _ in restarted.pending()] == [*kept, 40]
    assert not list(tmp_path.glob(".*.tmp"))  # no temp file left behind


def test_sequence_numbers_keep_increasing_after_everything_was_acked(tmp_path):
    buffer = TelemetryBuffer(tmp_path)
    for i in range(3):
        buffer.ack(buffer.append({"window": i}))
    assert buffer.pending() == []

    restarted = TelemetryBuffer(tmp_path)

    assert restarted.next_seq == 3
    assert restarted.append({"window": 3}) == 3


def test_a_full_buffer_drops_the_oldest_and_counts(tmp_path, caplog):
    buffer = TelemetryBuffer(tmp_path, max_windows=3)
    with caplog.at_level(logging.WARNING, logger="agent.telemetry"):
        for i in range(5):
            buffer.append({"window": i})

    assert [w["window"] for _, w in buffer.pending()] == [2, 3, 4]
    assert buffer.dropped == 2
    assert len(list(tmp_path.glob("*.json"))) == 3
    assert "dropped window 0" in caplog.text

    smaller = TelemetryBuffer(tmp_path, max_windows=2)  # restarted with a lower bound
    assert [seq for seq, _ in smaller.pending()] == [3, 4]


def test_a_corrupt_window_file_is_skipped_with_a_warning(tmp_path, caplog):
    buffer = TelemetryBuffer(tmp_path)
    for i in range(4):
        buffer.append({"window": i})
    (tmp_path / f"{1:020d}.json").write_bytes(b'{"window": 1, "requ')  # cut short
    (tmp_path / f"{2:020d}.json").write_bytes(b"[1, 2]")  # valid JSON, not a window
    (tmp_path / ".abc.tmp").write_bytes(b"{")  # a write a crash interrupted
    (tmp_path / "next_seq").write_bytes(b"\xff\xfe")

    with caplog.at_level(logging.WARNING, logger="agent.telemetry"):
        restarted = TelemetryBuffer(tmp_path)
        pending = restarted.pending()

    assert pending == [(0, {"window": 0}), (3, {"window": 3})]
    assert "unreadable" in caplog.text
    assert not (tmp_path / ".abc.tmp").exists()
    assert restarted.append({"window": 4}) == 4  # numbering continues from the windows on disk
    assert [seq for seq, _ in restarted.pending()] == [0, 3, 4]


def test_ack_of_an_unknown_window_is_ignored(tmp_path):
    buffer = TelemetryBuffer(tmp_path)
    seq = buffer.append({"window": 0})
    buffer.ack(seq + 100)
    buffer.ack(seq)
    buffer.ack(seq)
    assert buffer.pending() == []
    assert len(buffer) == 0
