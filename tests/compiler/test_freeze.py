"""``--freeze NAME=VALUE``: an input a deployment fixes becomes a constant, and the control
flow and shape arithmetic it decides are folded out of the prepared graph."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from compiler.freeze import parse_freeze
from compiler.prepare import graph_nodes, prepare
from compiler.tensors import load_samples
from edgec.errors import FreezeSpecError
from edgec.manifest import read_manifest
from tests._cli import run_edgec

RNG = np.random.default_rng(3)


def _weights(name: str, shape: tuple[int, ...]) -> onnx.TensorProto:
    return numpy_helper.from_array((RNG.standard_normal(shape) * 0.3).astype(np.float32), name)


def _save(graph: onnx.GraphProto, path: Path, opset: int = 17) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
    return path


def vad_model(path: Path, nested: bool = False) -> Path:
    """A stateful audio model shaped like Silero-VAD: ``x`` float [1,64], ``state`` float
    [2,1,16], ``sr`` int64 scalar. ``If(sr == 16000)`` picks the projection: the then-branch
    reads the outer ``W16`` and the outer ``x``, the else-branch has its own initializer.
    Outputs ``prob`` [1,16] and ``state_out`` [2,1,16]. With ``nested``, the then-branch holds
    a second ``If(sr > 8000)`` that reads a tensor the outer branch made."""
    sixteen = numpy_helper.from_array(np.array(16000, np.int64), "sixteen")
    eight = numpy_helper.from_array(np.array(8000, np.int64), "eight")
    then_nodes = [helper.make_node("MatMul", ["x", "W16"], ["h16"], name="then/matmul")]
    then_out = "h16"
    if nested:
        inner_then = helper.make_graph(
            [helper.make_node("Relu", ["h16"], ["h_relu"], name="inner/relu")],
            "inner_then",
            [],
            [helper.make_tensor_value_info("h_relu", TensorProto.FLOAT, [1, 16])],
        )
        inner_else = helper.make_graph(
            [helper.make_node("Neg", ["h16"], ["h_neg"], name="inner/neg")],
            "inner_else",
            [],
            [helper.make_tensor_value_info("h_neg", TensorProto.FLOAT, [1, 16])],
        )
        then_nodes += [
            helper.make_node("Greater", ["sr", "eight"], ["wide"], name="then/greater"),
            helper.make_node(
                "If", ["wide"], ["h_inner"], then_branch=inner_then, else_branch=inner_else, name="then/if"
            ),
        ]
        then_out = "h_inner"
    then_branch = helper.make_graph(
        then_nodes, "then", [], [helper.make_tensor_value_info(then_out, TensorProto.FLOAT, [1, 16])]
    )
    else_branch = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W8"], ["h8"], name="else/matmul")],
        "else",
        [],
        [helper.make_tensor_value_info("h8", TensorProto.FLOAT, [1, 16])],
        initializer=[_weights("W8", (64, 16))],
    )
    nodes = [
        helper.make_node("Equal", ["sr", "sixteen"], ["is16k"], name="rate/equal"),
        helper.make_node(
            "If", ["is16k"], ["h"], then_branch=then_branch, else_branch=else_branch, name="rate/if"
        ),
        helper.make_node("Sigmoid", ["h"], ["prob"], name="head/sigmoid"),
        helper.make_node("Add", ["state", "h"], ["state_sum"], name="state/add"),
        helper.make_node("Tanh", ["state_sum"], ["state_out"], name="state/tanh"),
    ]
    graph = helper.make_graph(
        nodes,
        "vad",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64]),
            helper.make_tensor_value_info("state", TensorProto.FLOAT, [2, 1, 16]),
            helper.make_tensor_value_info("sr", TensorProto.INT64, []),
        ],
        [
            helper.make_tensor_value_info("prob", TensorProto.FLOAT, [1, 16]),
            helper.make_tensor_value_info("state_out", TensorProto.FLOAT, [2, 1, 16]),
        ],
        initializer=[sixteen, eight, _weights("W16", (64, 16))],
    )
    return _save(graph, path)


def reshape_model(path: Path) -> Path:
    """``x`` float [1,6] reshaped by a shape computed from the int64 input ``dims`` [2]
    through Shape, Sub, Gather, Unsqueeze and Concat (as exporters write it)."""
    one = numpy_helper.from_array(np.array([1], np.int64), "one")
    zero = numpy_helper.from_array(np.array(0, np.int64), "zero")
    first = numpy_helper.from_array(np.array(1, np.int64), "first")
    axes = numpy_helper.from_array(np.array([0], np.int64), "axes")
    nodes = [
        helper.make_node("Shape", ["dims"], ["rank"], name="shape"),
        helper.make_node("Sub", ["rank", "one"], ["batch"], name="sub"),
        helper.make_node("Gather", ["dims", "zero"], ["d0"], axis=0, name="gather0"),
        helper.make_node("Gather", ["dims", "first"], ["d1"], axis=0, name="gather1"),
        helper.make_node("Unsqueeze", ["d0", "axes"], ["d0_1d"], name="unsqueeze0"),
        helper.make_node("Unsqueeze", ["d1", "axes"], ["d1_1d"], name="unsqueeze1"),
        helper.make_node("Concat", ["batch", "d0_1d", "d1_1d"], ["target"], axis=0, name="concat"),
        helper.make_node("Reshape", ["x", "target"], ["y"], name="reshape"),
    ]
    graph = helper.make_graph(
        nodes,
        "reshape",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 6]),
            helper.make_tensor_value_info("dims", TensorProto.INT64, [2]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "H", "W"])],
        initializer=[one, zero, first, axes],
    )
    return _save(graph, path)


def _vad_feeds(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "x": rng.standard_normal((1, 64)).astype(np.float32),
        "state": rng.standard_normal((2, 1, 16)).astype(np.float32),
    }


def _run(path: Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)


def _ops(path: Path) -> list[str]:
    return [node.op_type for node in graph_nodes(onnx.load(str(path)))]


@pytest.mark.parametrize("rate", [16000, 8000])
def test_if_on_a_frozen_rate_is_replaced_by_its_branch(tmp_path, rate):
    source = vad_model(tmp_path / "vad.onnx")
    prepared = prepare(source, {}, tmp_path, freeze={"sr": str(rate)})
    assert "If" not in _ops(prepared.path)
    assert [t.name for t in prepared.inputs] == ["x", "state"]
    assert prepared.frozen["sr"].dtype == np.int64
    assert prepared.frozen["sr"].shape == ()
    assert {t.name: t.shape for t in prepared.outputs} == {"prob": [1, 16], "state_out": [2, 1, 16]}
    for seed in range(3):
        feeds = _vad_feeds(seed)
        before = _run(source, {**feeds, "sr": np.array(rate, np.int64)})
        after = _run(prepared.path, feeds)
        for a, b in zip(before, after, strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-6)


def test_frozen_stateful_model_matches_over_a_sequence_of_steps(tmp_path):
    source = vad_model(tmp_path / "vad.onnx")
    prepared = prepare(source, {}, tmp_path, freeze={"sr": "16000"})
    rate = np.array(16000, np.int64)
    state_a = state_b = np.zeros((2, 1, 16), np.float32)
    for step in range(6):
        x = _vad_feeds(step)["x"]
        prob_a, state_a = _run(source, {"x": x, "state": state_a, "sr": rate})
        prob_b, state_b = _run(prepared.path, {"x": x, "state": state_b})
        np.testing.assert_allclose(prob_a, prob_b, rtol=1e-6)
        np.testing.assert_allclose(state_a, state_b, rtol=1e-6)


def two_output_model(path: Path) -> Path:
    """``If(flag)`` with two outputs: the then-branch gives one tensor as both (so the If's
    outputs cannot both take its name), the else-branch a constant it holds and its copy."""
    spec = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 4]) for n in ("t", "t")]
    then_branch = helper.make_graph([helper.make_node("Identity", ["x"], ["t"])], "then", [], spec)
    ones = numpy_helper.from_array(np.ones((1, 4), np.float32))
    else_branch = helper.make_graph(
        [helper.make_node("Constant", [], ["c"], value=ones), helper.make_node("Neg", ["c"], ["d"])],
        "else",
        [],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 4]) for n in ("c", "d")],
    )
    graph = helper.make_graph(
        [
            helper.make_node("If", ["flag"], ["p", "q"], then_branch=then_branch, else_branch=else_branch),
            helper.make_node("Mul", ["p", "x"], ["px"]),
            helper.make_node("Add", ["px", "q"], ["y"]),
        ],
        "two",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4]),
            helper.make_tensor_value_info("flag", TensorProto.BOOL, [1]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
    )
    return _save(graph, path)


@pytest.mark.parametrize("flag", ["true", "false"])
def test_branch_outputs_are_wired_to_every_if_output(tmp_path, flag):
    source = two_output_model(tmp_path / "two.onnx")
    prepared = prepare(source, {}, tmp_path, freeze={"flag": flag})
    assert "If" not in _ops(prepared.path)
    x = np.arange(4, dtype=np.float32).reshape(1, 4)
    # onnx's reference evaluator: onnxruntime 1.32 gets the source wrong when a branch
    # gives one tensor as two outputs (it reuses the buffer); the folded graph it runs right
    before = ReferenceEvaluator(str(source)).run(None, {"x": x, "flag": np.array([flag == "true"])})
    np.testing.assert_array_equal(before[0], _run(prepared.path, {"x": x})[0])


@pytest.mark.parametrize("rate", [16000, 12000, 8000])
def test_nested_if_reading_outer_tensors_is_inlined(tmp_path, rate):
    source = vad_model(tmp_path / "vad.onnx", nested=True)
    prepared = prepare(source, {}, tmp_path, freeze={"sr": str(rate)})
    assert "If" not in _ops(prepared.path)
    feeds = _vad_feeds(1)
    before = _run(source, {**feeds, "sr": np.array(rate, np.int64)})
    for a, b in zip(before, _run(prepared.path, feeds), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6)


def test_without_freeze_the_if_stays(tmp_path):
    prepared = prepare(vad_model(tmp_path / "vad.onnx"), {}, tmp_path)
    assert "If" in _ops(prepared.path)
    assert [t.name for t in prepared.inputs] == ["x", "state", "sr"]
    assert prepared.frozen == {}


def test_data_holding_a_frozen_input_is_used_without_it(tmp_path, caplog):
    prepared = prepare(vad_model(tmp_path / "vad.onnx"), {}, tmp_path, freeze={"sr": "16000"})
    data = tmp_path / "data.npz"
    np.savez(
        data,
        x=np.zeros((3, 1, 64), np.float32),
        state=np.zeros((3, 2, 1, 16), np.float32),
        sr=np.full((3,), 16000, np.int64),
    )
    samples = load_samples(data, prepared.inputs, "calibration", frozen=prepared.frozen)
    assert sorted(samples.arrays) == ["state", "x"]
    assert "ignoring 'sr': frozen by --freeze" in caplog.text


def test_shape_arithmetic_on_a_frozen_input_is_folded(tmp_path):
    source = reshape_model(tmp_path / "reshape.onnx")
    prepared = prepare(source, {}, tmp_path, freeze={"dims": "2,3"})
    assert _ops(prepared.path) == ["Reshape"]
    assert [t.name for t in prepared.inputs] == ["x"]
    assert prepared.outputs[0].shape == [1, 2, 3]  # static now: shape inference sees the constant
    x = np.arange(6, dtype=np.float32).reshape(1, 6)
    np.testing.assert_array_equal(_run(prepared.path, {"x": x})[0], x.reshape(1, 2, 3))


def test_a_dynamic_axis_of_a_frozen_input_takes_the_value_count(tmp_path):
    model = onnx.load(str(reshape_model(tmp_path / "reshape.onnx")))
    dim = model.graph.input[1].type.tensor_type.shape.dim[0]
    dim.dim_param = "D"  # dims: int64 [D]
    onnx.save(model, str(tmp_path / "dynamic.onnx"))
    prepared = prepare(tmp_path / "dynamic.onnx", {}, tmp_path, freeze={"dims": "3,2"})
    assert prepared.frozen["dims"].shape == (2,)
    assert prepared.outputs[0].shape == [1, 3, 2]


@pytest.mark.parametrize(
    ("freeze", "message"),
    [
        ({"rate": "16000"}, r"'rate', which the model does not have; its inputs are 'x', 'state', 'sr'"),
        ({"sr": "16000,8000"}, r"2 value\(s\), the input 'sr' of shape \[\] takes 1"),
        ({"sr": "16k"}, r"'16k' is not a int64 value"),
        ({"sr": "1.5"}, r"'1.5' is not a int64 value"),
        ({"sr": "99999999999999999999"}, "is not a int64 value"),
        ({"x": "1", "state": "0", "sr": "16000"}, "leaves the model no input"),
    ],
)
def test_freeze_that_does_not_fit_the_model_is_refused(tmp_path, freeze, message):
    with pytest.raises(FreezeSpecError, match=message):
        prepare(vad_model(tmp_path / "vad.onnx"), {}, tmp_path, freeze=freeze)


def test_parse_freeze():
    assert parse_freeze(["sr=16000", " w = 0.5,1 "]) == {"sr": "16000", "w": "0.5,1"}
    for bad in (["sr"], ["sr="], ["=1"], ["sr=1", "sr=2"]):
        with pytest.raises(FreezeSpecError):
            parse_freeze(bad)


def test_cli_onnx_build_with_freeze_records_it(tmp_path):
    source = vad_model(tmp_path / "vad.onnx")
    out = tmp_path / "out"
    result = run_edgec(
        "build", source, "-t", "x86-64-cpu", "--format", "onnx", "--precision", "fp32",
        "--freeze", "sr=16000", "--out", out, "--json",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    (bundle,) = [b["path"] for b in result.json()["bundles"]]
    manifest = json.loads((Path(bundle) / "manifest.json").read_text())
    assert read_manifest(Path(bundle)).frozen_inputs[0].values == [16000]
    assert [t["name"] for t in manifest["inputs"]] == ["x", "state"]
    assert manifest["frozen_inputs"] == [{"name": "sr", "dtype": "int64", "shape": [], "values": [16000]}]
    assert "If" not in _ops(Path(bundle) / manifest["model_file"])


@pytest.mark.parametrize(
    ("spec", "message"),
    [("sr", "bad --freeze 'sr'"), ("rate=1", "does not have"), ("sr=abc", "'abc' is not a int64 value")],
)
def test_cli_bad_freeze_exits_2(tmp_path, spec, message):
    source = vad_model(tmp_path / "vad.onnx")
    result = run_edgec(
        "build", source, "-t", "x86-64-cpu", "--format", "onnx", "--freeze", spec, "--out", tmp_path / "o"
    )
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()[-1]) > 0
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_cli_tflite_build_needs_the_rate_frozen(tmp_path):
    pytest.importorskip("onnx2tf")
    source = vad_model(tmp_path / "vad.onnx")
    common = ("build", source, "-t", "x86-64-cpu", "--format", "tflite", "--precision", "fp32", "--json")
    refused = run_edgec(*common, "--out", tmp_path / "a")
    assert refused.returncode == 3, refused.stderr
    assert "If" in refused.json()["bundles"][0]["error"]
    built = run_edgec(*common, "--freeze", "sr=16000", "--out", tmp_path / "b")
    assert built.returncode == 0, built.stderr + built.stdout
    assert built.json()["bundles"][0]["status"] == "ok"
