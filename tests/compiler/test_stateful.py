"""Stateful models (state in, state out) are calibrated and verified over sequences of steps
that carry the state, not over single steps from the zeros a data file holds."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from compiler.build import BuildRequest, build
from compiler.runtime import OnnxRuntimeRunner
from compiler.stateful import CarriedState, Sequences, StatePair, find_sequences, parse_states, run_carrying
from compiler.tensors import SampleSet
from compiler.verify import compare, gate_failures, run_samples
from device_profiles import load_profile
from edgec.errors import OptionError
from edgec.manifest import OutputKind, Precision, TargetFormat, TensorSpec
from tests._cli import run_edgec

STEPS = 24
RNG = np.random.default_rng(11)
W = (RNG.standard_normal((4, 8)) * 0.6).astype(np.float32)
U = (np.linalg.qr(RNG.standard_normal((8, 8)))[0] * 0.95).astype(np.float32)  # the state matters
V = (RNG.standard_normal((8, 3)) * 0.8).astype(np.float32)
PAIR = (StatePair("state", "state_out"),)


def rnn_model(path: Path, u: np.ndarray = U) -> Path:
    """``x`` [1,4], ``state`` [1,8] -> ``state_out = tanh(x W + state U)``, ``y = state_out V``."""
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["xw"], name="input_proj"),
        helper.make_node("MatMul", ["state", "U"], ["su"], name="recurrent"),
        helper.make_node("Add", ["xw", "su"], ["pre"], name="sum"),
        helper.make_node("Tanh", ["pre"], ["state_out"], name="tanh"),
        helper.make_node("MatMul", ["state_out", "V"], ["y"], name="head"),
    ]
    graph = helper.make_graph(
        nodes,
        "rnn",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4]),
            helper.make_tensor_value_info("state", TensorProto.FLOAT, [1, 8]),
        ],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3]),
            helper.make_tensor_value_info("state_out", TensorProto.FLOAT, [1, 8]),
        ],
        [numpy_helper.from_array(W, "W"), numpy_helper.from_array(u, "U"), numpy_helper.from_array(V, "V")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
    return path


def steps(count: int = STEPS, seed: int = 0) -> np.ndarray:
    """A slowly varying input signal, one [1,4] row per step."""
    t = np.arange(count, dtype=np.float32)[:, None]
    phase = np.random.default_rng(seed).uniform(0, 6, size=(1, 4)).astype(np.float32)
    return (np.sin(0.3 * t + phase) + 0.5).astype(np.float32).reshape(count, 1, 4)


def hand_loop(xs: np.ndarray, length: int | None = None, u: np.ndarray = U) -> tuple[np.ndarray, np.ndarray]:
    """The states each step is fed and its outputs ``y``, in numpy, zeros at each sequence start."""
    fed, ys = [], []
    state = np.zeros((1, 8), np.float32)
    for i, x in enumerate(xs):
        if length is not None and i % length == 0:
            state = np.zeros((1, 8), np.float32)
        fed.append(state)
        state = np.tanh(x @ W + state @ u).astype(np.float32)
        ys.append(state @ V)
    return np.stack(fed), np.stack(ys)


def _spec(name: str, shape: list[int], dtype: str = "float32") -> TensorSpec:
    return TensorSpec(name=name, shape=shape, dtype=dtype)


@pytest.mark.parametrize(
    ("state_in", "state_out"),
    [
        ("state", "stateN"),
        ("h0", "hn"),
        ("c0", "cn"),
        ("hidden_in", "hidden_out"),
        ("past_key", "present_key"),
        ("past_key_values.0.key", "present.0.key"),
    ],
)
def test_state_pairs_are_found_by_name(state_in, state_out):
    inputs = [_spec("audio", [1, 512]), _spec(state_in, [2, 1, 128])]
    outputs = [_spec("prob", [1, 1]), _spec(state_out, [-1, -1, -1])]  # shape inference left it open
    found = find_sequences(inputs, outputs, {})
    assert found is not None
    assert found.pairs == (StatePair(state_in, state_out),)


def test_names_that_pair_but_shapes_that_do_not_are_no_state():
    inputs = [_spec("x", [1, 4]), _spec("state", [1, 8])]
    assert find_sequences(inputs, [_spec("stateN", [1, 16])], {}) is None
    assert find_sequences(inputs, [_spec("stateN", [1, 8], "float16")], {}) is None


def test_an_image_to_image_model_is_not_stateful():
    """``img_in`` -> ``img_out`` pairs by name, but a model whose every input would be a state
    has no data input: it is a denoiser, not a recurrent model."""
    assert find_sequences([_spec("img_in", [1, 3, 8, 8])], [_spec("img_out", [1, 3, 8, 8])], {}) is None


def test_state_option_replaces_what_names_suggest():
    inputs = [_spec("x", [1, 4]), _spec("mem", [1, 8]), _spec("state", [1, 8])]
    outputs = [_spec("y", [1, 3]), _spec("mem_next_step", [1, 8]), _spec("stateN", [1, 8])]
    found = find_sequences(inputs, outputs, {"mem": "mem_next_step"}, 5)
    assert found == Sequences((StatePair("mem", "mem_next_step"),), 5)


@pytest.mark.parametrize(
    ("given", "length", "message"),
    [
        (
            {"hidden": "state_out"},
            None,
            r"'hidden' is not an input of the model; its inputs are 'x', 'state'",
        ),
        (
            {"state": "h_out"},
            None,
            r"'h_out' is not an output of the model; its outputs are 'y', 'state_out'",
        ),
        ({"state": "y"}, None, r"the input is float32 \[1, 8\], the output float32 \[1, 3\]"),
        ({}, 0, "--sequence-length must be at least 1"),
    ],
)
def test_state_options_that_do_not_fit_the_model_are_refused(given, length, message):
    inputs = [_spec("x", [1, 4]), _spec("state", [1, 8])]
    outputs = [_spec("y", [1, 3]), _spec("state_out", [1, 8])]
    with pytest.raises(OptionError, match=message):
        find_sequences(inputs, outputs, given, length)


def test_naming_every_input_a_state_is_refused():
    inputs = [_spec("x", [1, 4]), _spec("state", [1, 8])]
    outputs = [_spec("x_next", [1, 4]), _spec("state_out", [1, 8])]
    with pytest.raises(OptionError, match="names every input of the model as a state"):
        find_sequences(inputs, outputs, {"x": "x_next", "state": "state_out"})


def test_sequence_length_on_a_stateless_model_is_refused():
    with pytest.raises(OptionError, match="--sequence-length is for stateful models"):
        find_sequences([_spec("x", [1, 4])], [_spec("y", [1, 3])], {}, 8)


@pytest.mark.parametrize(
    ("specs", "message"),
    [(["state"], "is not INPUT=OUTPUT"), (["a=b", "a=c"], "twice"), (["a=z", "b=z"], "same output")],
)
def test_parse_states(specs, message):
    assert parse_states(["h0=hn", " c0 = cn "]) == {"h0": "hn", "c0": "cn"}
    with pytest.raises(OptionError, match=message):
        parse_states(specs)


def test_carried_state_restarts_at_each_sequence(tmp_path):
    """Every 5 steps the state is taken from the data again (zeros here): the states fed and
    the outputs are the hand-run loop's, resetting at 0, 5, 10..."""
    runner = OnnxRuntimeRunner(rnn_model(tmp_path / "rnn.onnx"))
    xs = steps(12)
    samples = SampleSet("eval", {"x": xs, "state": np.zeros((12, 1, 8), np.float32)})
    outputs, fed = run_carrying(runner, samples, Sequences(PAIR, 5))
    states, ys = hand_loop(xs, length=5)
    np.testing.assert_allclose(fed.arrays["state"], states, atol=1e-6)
    np.testing.assert_allclose(np.stack([o["y"] for o in outputs]), ys, atol=1e-5)
    assert not fed.arrays["state"][[0, 5, 10]].any()
    assert fed.arrays["state"][[1, 6, 11]].any()
    assert (
        Sequences(PAIR, 5)
        .describe(12)
        .startswith("stateful: verified over 3 sequences of 5 steps (the last of 2)")
    )


def test_an_artifact_whose_error_grows_with_steps_is_caught(tmp_path):
    """A candidate with a 10% different recurrence matches the source exactly on single steps
    from zero state (what a stateless check measures), and drifts over the sequence."""
    source = OnnxRuntimeRunner(rnn_model(tmp_path / "rnn.onnx"))
    drifting = OnnxRuntimeRunner(rnn_model(tmp_path / "drift.onnx", u=U * 1.1))
    samples = SampleSet("eval", {"x": steps(), "state": np.zeros((STEPS, 1, 8), np.float32)})
    kinds = {"y": OutputKind.REGRESSION, "state_out": OutputKind.DENSE}
    gate = load_profile("x86-64-cpu").gates[Precision.FP16]

    single = compare(run_samples(source, samples), run_samples(drifting, samples), None, kinds)
    assert single.max_abs_err == 0.0
    assert not gate_failures(single, gate)

    sequences = Sequences(PAIR)
    reference, fed = run_carrying(source, samples, sequences)
    candidate = run_samples(CarriedState(drifting, sequences), fed)
    carried = compare(reference, candidate, None, kinds)
    assert gate_failures(carried, gate)
    errors = [float(np.abs(r["y"] - c["y"]).max()) for r, c in zip(reference, candidate, strict=True)]
    assert errors[0] == 0.0
    assert min(errors[1:]) > 0.0
    assert max(errors[STEPS // 2 :]) > max(errors[:2])  # it builds up over the steps


def _data(path: Path, xs: np.ndarray, with_state: bool = True) -> Path:
    arrays = {"x": xs}
    if with_state:
        arrays["state"] = np.zeros((len(xs), 1, 8), np.float32)
    np.savez(path, **arrays)
    return path


def _build(tmp_path: Path, precision: Precision, **options: object) -> tuple[dict, Path]:
    model = rnn_model(tmp_path / "rnn.onnx")
    request = BuildRequest(
        model=model,
        targets=["x86-64-cpu"],
        out=tmp_path / f"out-{precision.value}-{len(list(tmp_path.glob('out-*')))}",
        format=TargetFormat.ONNX,
        precision=precision,
        calibration=_data(tmp_path / "calibration.npz", steps(48, seed=1)),
        eval=_data(tmp_path / "eval.npz", steps(seed=2), with_state=False),
        cache=None,
        **options,  # type: ignore[arg-type]
    )
    bundle = build(request).bundles[0]
    assert bundle.path is not None, bundle.error
    return bundle.model_dump(mode="json"), Path(bundle.path)


def test_build_verifies_over_the_sequence_and_golden_steps_hold_the_carried_state(tmp_path):
    """The eval file leaves the state out: the sequence starts from zeros, the reference is
    the hand-run loop, and each golden step holds the state it was fed (so a device's
    single-step self-test reproduces the reference)."""
    report, bundle = _build(tmp_path, Precision.FP32)
    states, ys = hand_loop(steps(seed=2))
    with np.load(bundle / "golden.npz") as golden:
        np.testing.assert_allclose(golden["inputs/state"], states[: len(golden["inputs/state"])], atol=1e-6)
        np.testing.assert_allclose(golden["outputs/y"], ys[: len(golden["outputs/y"])], atol=1e-5)
        assert golden["inputs/state"][1:].any()
    assert report["metrics"]["samples"] == STEPS
    assert any(
        n.startswith(f"stateful: verified over 1 sequence of {STEPS} steps") and "state_out -> state" in n
        for n in report["notes"]
    )
    saved = json.loads((bundle / "report.json").read_text())
    assert saved["notes"] == report["notes"]


def _state_scale(bundle: Path) -> float:
    """The scale of the QuantizeLinear the int8 artifact puts on its ``state`` input."""
    model = onnx.load(str(bundle / "model.onnx"))
    values = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            values[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    (quantize,) = [n for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == "state"]
    return float(values[quantize.input[1]])


def test_int8_calibrates_the_state_input_on_the_states_the_source_carries(tmp_path):
    """The calibration file holds zeros in ``state``. Over the sequence, the state input's
    int8 range is the one the float model carries; run sample by sample (sequence length 1)
    it is calibrated on the zeros, and the artifact misses the gate once the state is carried."""
    report, bundle = _build(tmp_path, Precision.INT8)
    carried, _ = hand_loop(steps(48, seed=1))
    expected = (max(float(carried.max()), 0.0) - min(float(carried.min()), 0.0)) / 255
    assert _state_scale(bundle) == pytest.approx(expected, rel=0.02)
    assert not report["gate_failures"]
    assert report["metrics"]["samples"] == STEPS

    # the figures are the artifact's own run over the sequence, not steps fed the source's states
    sequences = Sequences(PAIR)
    zeros = SampleSet("eval", {"x": steps(seed=2), "state": np.zeros((STEPS, 1, 8), np.float32)})
    reference, fed = run_carrying(OnnxRuntimeRunner(tmp_path / "rnn.onnx"), zeros, sequences)
    artifact = OnnxRuntimeRunner(bundle / "model.onnx")
    kinds = {"y": OutputKind.REGRESSION, "state_out": OutputKind.DENSE}
    free = compare(reference, run_samples(CarriedState(artifact, sequences), fed), None, kinds)
    forced = compare(reference, run_samples(artifact, fed), None, kinds)
    assert report["metrics"]["max_abs_err"] == pytest.approx(free.max_abs_err, rel=1e-6)
    assert report["metrics"]["max_abs_err"] != pytest.approx(forced.max_abs_err, rel=1e-3)

    _, alone = _build(tmp_path, Precision.INT8, sequence_length=1, ignore_gates=True)
    assert _state_scale(alone) != pytest.approx(expected, rel=0.5)  # calibrated on the zeros
    candidate = run_samples(CarriedState(OnnxRuntimeRunner(alone / "model.onnx"), sequences), fed)
    assert gate_failures(
        compare(reference, candidate, None, kinds), load_profile("x86-64-cpu").gates[Precision.INT8]
    )


def test_cli_state_naming_no_input_is_a_one_line_option_error(tmp_path):
    model = rnn_model(tmp_path / "rnn.onnx")
    result = run_edgec(
        "build", model, "--target", "x86-64-cpu", "--format", "onnx", "--precision", "fp32",
        "--state", "hidden=state_out", "--out", tmp_path / "out", "--no-cache",
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if not line.startswith("[")]  # not progress
    assert errors == [
        "edgec: error: --state hidden=state_out: 'hidden' is not an input of the model; "
        "its inputs are 'x', 'state'"
    ]
    assert not (tmp_path / "out").exists()


def test_cli_builds_a_stateful_model_over_sequences(tmp_path):
    model = rnn_model(tmp_path / "rnn.onnx")
    data = _data(tmp_path / "eval.npz", steps(seed=2), with_state=False)
    result = run_edgec(
        "build", model, "--target", "x86-64-cpu", "--format", "onnx", "--precision", "fp32",
        "--eval", data, "--state", "state=state_out", "--sequence-length", "8",
        "--out", tmp_path / "out", "--no-cache", "--json",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    (bundle,) = result.json()["bundles"]
    assert "stateful: verified over 3 sequences of 8 steps, state carried step to step" in " ".join(
        bundle["notes"]
    )
