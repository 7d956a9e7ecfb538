"""Shadow evaluation (agent.shadow) with real onnxruntime sessions of real digits bundles.

The releases give the digits network a second output, ``features`` (the 64 ReLU features
before the last layer, a dense output), so that agreement is measured per output:

- 1.0.0  the sample, with ``features``;
- 2.0.0  the same, its class ``NEVER`` never predicted (its logit lowered by 1,000): it
         disagrees on the top-1 class exactly where 1.0.0 predicts ``NEVER``, and its
         features are 1.0.0's.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import helper

from agent._shadow_child import CandidateProcess
from agent._shadow_judge import Judge
from agent.runtime import RuntimeModel, load_bundle
from agent.serving import InferenceServer
from agent.shadow import (
    ShadowBusyError,
    ShadowFigures,
    ShadowMismatchError,
    ShadowPlan,
    ShadowRun,
    ShadowTap,
)
from agent.slot import ModelSlot
from edgec.errors import OptionError
from edgec.manifest import Manifest, OutputKind
from localfleet.releases import build_digits
from tests._cli import DIGITS
from tests.agent.test_serving import Client, infer_document

NEVER = 7  # the class 2.0.0 never predicts


def every_request(**plan: Any) -> ShadowPlan:
    """A plan that runs every request on the candidate, with a whole core: none is skipped."""
    return ShadowPlan(sample=1.0, cpu_budget=1.0, **plan)


def with_features(model: onnx.ModelProto) -> onnx.ModelProto:
    """The digits network with a second output: the features its last layer reads."""
    graph = model.graph
    gemm = graph.node[-1]
    assert (gemm.op_type, gemm.output[0]) == ("Gemm", "logits"), "the digits sample changed"
    graph.node.append(helper.make_node("Identity", [gemm.input[0]], ["features"], name="features"))
    graph.output.append(helper.make_tensor_value_info("features", onnx.TensorProto.FLOAT, ["N", 64]))
    return model


def never_class(model: onnx.ModelProto, cls: int) -> onnx.ModelProto:
    """``model`` with class ``cls``'s logit lowered by 1,000: an input it would have taken
    goes to its second choice, every other answer stays."""
    bias_name = next(n for n in model.graph.node if n.output[0] == "logits").input[2]
    bias = next(i for i in model.graph.initializer if i.name == bias_name)
    values = onnx.numpy_helper.to_array(bias).copy()
    values[cls] -= 1000.0
    bias.CopyFrom(onnx.numpy_helper.from_array(values, bias_name))
    return model


@pytest.fixture(scope="module")
def bundles(tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("shadow-bundles")
    found = {}
    for version, change in (("1.0.0", None), ("2.0.0", NEVER)):
        model = with_features(onnx.load(str(DIGITS / "model.onnx")))
        if change is not None:
            model = never_class(model, change)
        onnx.checker.check_model(model)
        source = out / f"model-{version}.onnx"
        onnx.save(model, str(source))
        found[version] = build_digits(source, version, out / "bundles", DIGITS / "eval.npz")
    manifest = load_bundle(found["1.0.0"]).manifest
    kinds = {o.name: o.kind for o in manifest.outputs}
    assert kinds == {"logits": OutputKind.CLASSIFICATION, "features": OutputKind.DENSE}, kinds
    return found


@pytest.fixture(scope="module")
def serving(bundles) -> RuntimeModel:
    return load_bundle(bundles["1.0.0"])


@pytest.fixture(scope="module")
def inputs() -> list[np.ndarray]:
    with np.load(DIGITS / "eval.npz") as data:
        return [x[None] for x in data["x"][:300]]


def serve(model: RuntimeModel, x: np.ndarray) -> tuple[float, dict[str, np.ndarray]]:
    started = time.perf_counter()
    outputs = model.infer({"x": x})
    return time.perf_counter() - started, outputs


def offer_all(run: ShadowRun | ShadowTap, model: RuntimeModel, inputs: list[np.ndarray]) -> None:
    for x in inputs:
        infer_s, outputs = serve(model, x)
        run.offer(model.manifest.version, infer_s, True, {"x": x}, outputs)


class Sleepy:
    """A candidate that takes ``seconds`` of sleep before each answer of a real model."""

    def __init__(self, model: RuntimeModel, seconds: float) -> None:
        self.model = model
        self.manifest: Manifest = model.manifest
        self.seconds = seconds

    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        time.sleep(self.seconds)
        return self.model.infer(inputs)

    def close(self) -> None:
        pass


class Busy(Sleepy):
    """A candidate that spins the CPU for ``seconds`` before each answer of a real model."""

    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        until = time.thread_time() + self.seconds
        while time.thread_time() < until:
            pass
        return self.model.infer(inputs)


def test_a_plan_needs_an_end_and_sane_shares() -> None:
    with pytest.raises(OptionError, match="duration or a request count"):
        ShadowPlan()
    for bad in ({"sample": 0.0}, {"sample": 1.5}, {"cpu_budget": 0.0}, {"window_s": 0}, {"queue": 0}):
        with pytest.raises(OptionError):
            ShadowPlan(requests=1, **bad)  # type: ignore[arg-type]
    with pytest.raises(OptionError, match="request count"):
        ShadowPlan(requests=0)


def test_the_same_model_agrees_on_every_request(bundles, serving, inputs) -> None:
    candidate = load_bundle(bundles["1.0.0"])
    run = ShadowRun(candidate, serving.manifest, every_request(requests=len(inputs), queue=len(inputs)))
    offer_all(run, serving, inputs)
    figures = run.wait()
    run.close()
    assert figures.done
    assert figures.reason == "requests"
    assert (figures.offered, figures.sampled, figures.compared) == (len(inputs),) * 3
    assert (figures.dropped, figures.over_budget, figures.errors) == (0, 0, 0)
    assert figures.agreement == 1.0
    assert figures.outputs == {"logits": 1.0, "features": 1.0}
    assert figures.release == figures.serving == "digits:1.0.0"
    for name in ("p50_ms", "p95_ms", "p99_ms", "serving_p50_ms", "serving_p95_ms", "serving_p99_ms"):
        assert 0.0 < getattr(figures, name) < 1000.0, name
    assert figures.p50_ms <= figures.p95_ms <= figures.p99_ms
    assert figures.as_dict()["outputs"] == {"logits": 1.0, "features": 1.0}
    assert candidate.infer({"x": inputs[0]})  # the run leaves its candidate open


def test_agreement_is_the_share_of_requests_whose_top_class_is_kept(bundles, serving, inputs) -> None:
    top = np.array([serving.infer({"x": x})["logits"].argmax() for x in inputs])
    expected = float(np.mean(top != NEVER))
    assert 0.8 < expected < 0.97, "the eval set should hold about 10 % of class NEVER"
    candidate = load_bundle(bundles["2.0.0"])
    run = ShadowRun(candidate, serving.manifest, every_request(requests=len(inputs), queue=len(inputs)))
    offer_all(run, serving, inputs)
    figures = run.wait()
    assert figures.compared == len(inputs)
    assert figures.agreement == pytest.approx(expected, abs=1e-12)
    assert figures.outputs["logits"] == pytest.approx(expected, abs=1e-12)
    assert figures.outputs["features"] == 1.0  # the change is after the features
    assert figures.release == "digits:2.0.0"
    assert figures.serving == "digits:1.0.0"


def test_one_request_in_ten_is_sampled_the_same_way_each_time(bundles, serving, inputs) -> None:
    picked = []
    for _ in range(2):
        candidate = load_bundle(bundles["2.0.0"])
        run = ShadowRun(candidate, serving.manifest, ShadowPlan(requests=30, cpu_budget=1.0, queue=300))
        offer_all(run, serving, inputs)
        figures = run.wait()
        assert (figures.offered, figures.sampled, figures.compared) == (300, 30, 30)
        picked.append(figures.agreement)
    assert picked[0] == picked[1]  # the same thirty requests


@pytest.mark.parametrize("where", ["in its process", "in a thread"])
def test_a_failing_candidate_is_counted_and_ends_a_request_plan(bundles, serving, inputs, where) -> None:
    candidate = load_bundle(bundles["2.0.0"])
    run = ShadowRun(
        candidate if where == "in its process" else Sleepy(candidate, 0.0),
        serving.manifest,
        every_request(requests=5),
    )
    infer_s, outputs = serve(serving, inputs[0])
    for _ in range(5):  # inputs of a shape the candidate refuses: its infer raises
        run.offer("1.0.0", infer_s, True, {"x": np.zeros((1, 3), np.float32)}, outputs)
    figures = run.wait()
    run.close()
    assert figures.reason == "requests"
    assert (figures.errors, figures.compared, figures.agreement) == (5, 0, None)
    assert figures.last_error is not None
    assert "shape" in figures.last_error, figures.last_error
    assert figures.outputs == {}
    assert figures.p50_ms is None


def test_offers_never_wait_for_a_slow_candidate(bundles, serving, inputs) -> None:
    run = ShadowRun(
        Sleepy(load_bundle(bundles["2.0.0"]), 1.0),
        serving.manifest,
        ShadowPlan(duration_s=60, sample=1.0, queue=4),
    )
    infer_s, outputs = serve(serving, inputs[0])
    started = time.perf_counter()
    for _ in range(1000):
        run.offer("1.0.0", infer_s, True, {"x": inputs[0]}, outputs)
    offering = time.perf_counter() - started
    assert offering < 0.5, f"1000 offers took {offering:.3f} s"
    figures = run.figures()
    assert figures.sampled == 1000
    assert figures.dropped >= 1000 - 4 - 1  # the queue's four, and one the candidate may hold
    started = time.perf_counter()
    run.close()
    assert time.perf_counter() - started < 5.0
    figures = run.figures()
    assert figures.done
    assert figures.reason == "stopped"
    assert figures.compared <= 1


def test_requests_of_another_model_and_failed_answers_are_not_sampled(bundles, serving, inputs) -> None:
    run = ShadowRun(load_bundle(bundles["2.0.0"]), serving.manifest, ShadowPlan(duration_s=60, sample=1.0))
    infer_s, outputs = serve(serving, inputs[0])
    run.offer("0.9.0", infer_s, True, {"x": inputs[0]}, outputs)  # answered by a model swapped out
    run.offer("1.0.0", infer_s, False, {"x": inputs[0]}, None)  # the serving model failed
    run.close()
    figures = run.figures()
    assert (figures.offered, figures.sampled) == (1, 0)


def test_the_candidate_keeps_to_its_cpu_budget(bundles, serving, inputs) -> None:
    busy_s, budget, duration = 0.02, 0.25, 2.0
    plan = ShadowPlan(duration_s=duration, sample=1.0, cpu_budget=budget, window_s=duration)
    run = ShadowRun(Busy(load_bundle(bundles["2.0.0"]), busy_s), serving.manifest, plan)
    infer_s, outputs = serve(serving, inputs[0])
    while not run.done:
        run.offer("1.0.0", infer_s, True, {"x": inputs[0]}, outputs)
        time.sleep(0.002)
    figures = run.figures()
    assert figures.over_budget > 0
    # a quarter of a core for 2 s is 25 requests of 20 ms (one more may start at the budget's edge)
    assert 1 <= figures.compared <= budget * duration / busy_s + 2, figures


def test_the_candidate_in_its_process_keeps_to_its_cpu_budget(bundles, serving, inputs) -> None:
    # 500 requests/s against a twentieth of a core (50 ms of CPU a second): most are skipped
    plan = ShadowPlan(duration_s=4.0, sample=1.0, cpu_budget=0.05, queue=300)
    run = ShadowRun(load_bundle(bundles["2.0.0"]), serving.manifest, plan)
    fed = 0
    while not run.done:
        offer_all(run, serving, inputs[fed % 300 : fed % 300 + 10])
        fed += 10
        time.sleep(0.02)
    figures = run.wait()
    assert figures.reason == "duration"
    assert figures.compared >= 1, figures
    assert figures.over_budget > figures.compared, figures
    assert figures.compared + figures.over_budget + figures.dropped <= figures.sampled, figures


def shadow_children(release: str) -> list[multiprocessing.process.BaseProcess]:
    return [p for p in multiprocessing.active_children() if p.name == f"shadow {release}"]


def test_a_candidate_process_that_dies_ends_the_run_and_serving_goes_on(bundles, serving, inputs) -> None:
    tap = ShadowTap()
    run = ShadowRun(load_bundle(bundles["2.0.0"]), serving.manifest, every_request(duration_s=60, queue=300))
    tap.attach(run)
    until = time.monotonic() + 30.0
    while run.figures().compared < 10 and time.monotonic() < until:
        offer_all(tap, serving, inputs[:10])
        time.sleep(0.02)
    assert run.figures().compared >= 10
    (child,) = shadow_children("digits:2.0.0")
    assert child.pid is not None
    os.kill(child.pid, signal.SIGKILL)  # as a runtime's segfault would end it
    started = time.perf_counter()
    offer_all(tap, serving, inputs)  # the request path neither waits nor raises
    figures = run.wait()
    assert time.perf_counter() - started < 10.0
    assert figures.done
    assert figures.reason == "failed"
    assert figures.last_error is not None
    assert "ended unexpectedly" in figures.last_error, figures.last_error
    offer_all(tap, serving, inputs[:10])  # the ended run takes no more
    assert run.figures().offered == figures.offered
    run.close()
    tap.detach(run)
    assert not shadow_children("digits:2.0.0")
    again = ShadowRun(load_bundle(bundles["2.0.0"]), serving.manifest, every_request(requests=5))
    tap.attach(again)
    offer_all(tap, serving, inputs[:5])
    assert again.wait().compared == 5
    again.close()
    tap.detach(again)


def test_windows_are_handed_over_and_add_up_to_the_totals(bundles, serving, inputs) -> None:
    windows: list[ShadowFigures] = []

    def on_window(window: ShadowFigures) -> None:
        windows.append(window)
        if len(windows) == 1:
            raise RuntimeError("a broken callback does not end the run")

    plan = ShadowPlan(duration_s=1.5, sample=0.5, window_s=0.3, queue=64)
    run = ShadowRun(load_bundle(bundles["2.0.0"]), serving.manifest, plan, on_window=on_window)
    fed = 0
    while fed < 1000 and not run.done:
        offer_all(run, serving, inputs[fed % 300 : fed % 300 + 10])
        fed += 10
        time.sleep(0.01)
    totals = run.wait()
    assert totals.reason == "duration"
    assert len(windows) >= 3, windows
    assert windows[-1].done
    assert windows[-1].reason == "duration"
    assert not any(w.done for w in windows[:-1])
    for field in ("offered", "sampled", "compared", "dropped", "errors"):
        assert sum(getattr(w, field) for w in windows) == getattr(totals, field), field
    assert totals.compared > 0
    assert totals.offered <= fed
    assert all(w.started_at < w.ended_at for w in windows)
    assert windows[0].started_at == totals.started_at
    assert windows[-1].ended_at == totals.ended_at


def test_the_child_is_fed_once_a_tick_and_a_stop_counts_every_sampled_request(
    bundles, serving, inputs, monkeypatch
) -> None:
    """The serving process's feeder wakes once a tick while requests are sampled, not once a
    request; what it holds when the run stops is still run and counted."""
    batches: list[int] = []
    send = CandidateProcess.send

    def counted(self: CandidateProcess, batch: list[Any]) -> None:
        batches.append(len(batch))
        send(self, batch)

    monkeypatch.setattr(CandidateProcess, "send", counted)
    plan = ShadowPlan(duration_s=60, sample=1.0, cpu_budget=1.0, queue=64)
    run = ShadowRun(load_bundle(bundles["2.0.0"]), serving.manifest, plan)
    started = time.monotonic()
    for i in range(50):  # 2 requests every 20 ms: 100 sampled a second for 1 s
        offer_all(run, serving, inputs[2 * i : 2 * i + 2])
        time.sleep(max(0.0, started + 0.02 * (i + 1) - time.monotonic()))
    elapsed = time.monotonic() - started
    run.close()
    figures = run.figures()
    assert figures.reason == "stopped"
    assert (figures.offered, figures.sampled, figures.compared, figures.dropped) == (100, 100, 100, 0)
    assert sum(batches) == 100
    # one batch each 100 ms tick (plus the first request's and the stop's); fed every 15 ms,
    # as before, it was one every 20 ms here, each request pair
    assert len(batches) <= elapsed / 0.1 + 3, (elapsed, batches)


def test_a_duration_ends_a_run_without_traffic_and_a_stop_event_ends_a_wait(bundles, serving) -> None:
    candidate = load_bundle(bundles["2.0.0"])
    started = time.perf_counter()
    figures = ShadowRun(candidate, serving.manifest, ShadowPlan(duration_s=0.3)).wait()
    assert figures.reason == "duration"
    assert figures.offered == 0
    assert figures.agreement is None
    assert time.perf_counter() - started < 10.0
    stop = threading.Event()
    run = ShadowRun(candidate, serving.manifest, ShadowPlan(requests=10))
    threading.Timer(0.2, stop.set).start()
    figures = run.wait(stop)
    assert figures.done
    assert figures.reason == "stopped"


def test_the_tap_holds_one_run_and_feeds_it(bundles, serving, inputs) -> None:
    tap = ShadowTap()
    offer_all(tap, serving, inputs[:3])  # nothing attached: nothing happens
    candidate = load_bundle(bundles["2.0.0"])
    run = ShadowRun(candidate, serving.manifest, every_request(requests=3))
    other = ShadowRun(candidate, serving.manifest, every_request(requests=3))
    tap.attach(run)
    with pytest.raises(ShadowBusyError, match=r"digits:2\.0\.0"):
        tap.attach(other)
    offer_all(tap, serving, inputs[:3])
    assert run.wait().compared == 3
    assert tap.run is run
    tap.detach(other)  # not the attached one: nothing changes
    assert tap.run is run
    tap.detach(run)
    assert tap.run is None
    tap.attach(other)
    other.close()
    run.close()


def test_a_candidate_with_no_output_in_common_is_refused(bundles, serving) -> None:
    candidate = load_bundle(bundles["2.0.0"])
    renamed = serving.manifest.model_copy(
        update={
            "outputs": [o.model_copy(update={"name": f"other_{o.name}"}) for o in serving.manifest.outputs]
        }
    )
    with pytest.raises(ShadowMismatchError, match="shares no output"):
        ShadowRun(candidate, renamed, ShadowPlan(requests=1))


def test_requests_through_the_inference_api_reach_the_run(bundles, serving, inputs) -> None:
    """The v2 server hands the tap each answered request with the model's own inference time."""
    slot = ModelSlot()
    slot.swap(load_bundle(bundles["1.0.0"]))
    tap = ShadowTap()
    seen: list[tuple[str, float]] = []

    def on_request(version: str, latency_s: float, *_: object) -> None:
        seen.append(("request", latency_s))

    def on_infer(
        version: str,
        infer_s: float,
        ok: bool,
        inputs: Mapping[str, np.ndarray],
        outputs: Mapping[str, np.ndarray] | None,
    ) -> None:
        seen.append(("infer", infer_s))
        tap.offer(version, infer_s, ok, inputs, outputs)

    run = ShadowRun(load_bundle(bundles["2.0.0"]), serving.manifest, every_request(requests=20, queue=20))
    tap.attach(run)
    with InferenceServer(slot, on_request=on_request, on_infer=on_infer) as server:
        client = Client(server.port)
        for x in inputs[:20]:
            status, answer = client.post("/v2/models/digits/infer", infer_document(x))
            assert status == 200
            assert answer["model_version"] == "1.0.0"
        client.close()
        figures = run.wait()
    assert figures.compared == 20
    assert figures.serving_p50_ms is not None
    assert [kind for kind, _ in seen] == ["request", "infer"] * 20
    for (_, latency_s), (_, infer_s) in zip(seen[::2], seen[1::2], strict=True):
        assert 0.0 < infer_s <= latency_s  # the model's time alone, within the request's


def judged(manifest: Manifest, gate: dict[str, float] | None = None) -> Judge:
    """A judge of outputs of every kind, for the thresholds of ``manifest`` (or ``gate``)."""
    spec = manifest.outputs[0]
    outputs = [
        spec.model_copy(update={"name": "emb", "shape": [1, 8], "kind": OutputKind.DENSE}),
        spec.model_copy(update={"name": "steps", "shape": [1, 6, 4], "kind": OutputKind.SEQUENCE}),
        spec.model_copy(update={"name": "score", "shape": [1, 1], "kind": OutputKind.REGRESSION}),
        spec.model_copy(
            update={"name": "ids", "shape": [1, 5], "dtype": "int64", "kind": OutputKind.SEQUENCE}
        ),
    ]
    verification = manifest.verification
    if gate is not None:
        verification = verification.model_copy(update={"gate": gate})
    typed = manifest.model_copy(update={"outputs": outputs, "verification": verification})
    return Judge(typed, typed)


def test_each_kind_agrees_by_its_gate_threshold_on_one_request(serving) -> None:
    """fp32 digits gate: dense cosine >= 0.9999, per-step agreement >= 0.999, error over the
    scale <= 0.001; integers equal."""
    judge = judged(serving.manifest)
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(1, 8)).astype(np.float32)
    steps = rng.normal(size=(1, 6, 4)).astype(np.float32)
    ids = np.arange(5)[None]
    reference = {"emb": emb, "steps": steps, "score": np.array([[5.0]], np.float32), "ids": ids}
    assert judge.agreement(reference, dict(reference)) == dict.fromkeys(reference, True)
    near = {"emb": emb * 1.5, "steps": steps + 0.01, "score": np.array([[5.004]], np.float32)}
    assert judge.agreement(reference, {**reference, **near}) == dict.fromkeys(reference, True)
    flipped = steps.copy()
    flipped[0, 2] = -flipped[0, 2]  # one step of six changes its argmax (unless it was tied)
    other_ids = ids.copy()
    other_ids[0, 4] = 9
    far = {
        "emb": emb + rng.normal(size=(1, 8)).astype(np.float32),
        "steps": flipped,
        "score": np.array([[5.1]], np.float32),  # 2 % of the scale
        "ids": other_ids,
    }
    assert judge.agreement(reference, far) == dict.fromkeys(reference, False)
    wrong_size = {**reference, "emb": np.zeros((1, 9), np.float32)}
    assert judge.agreement(reference, wrong_size) == dict.fromkeys(reference, False)


def test_a_manifest_without_kind_thresholds_takes_the_gate_defaults(serving) -> None:
    judge = judged(serving.manifest, {"min_cosine": 0.5, "min_top1_agreement": 0.9})
    assert judge.thresholds[OutputKind.DENSE] == {"min_cosine": 0.5}
    assert judge.thresholds[OutputKind.REGRESSION] == {"max_rel_err": 0.5}
    assert judge.thresholds[OutputKind.SEQUENCE] == {"min_sequence_agreement": 0.9}
    with pytest.raises(ShadowMismatchError, match="no gate thresholds"):
        judged(serving.manifest, {"max_artifact_bytes": 1.0})
