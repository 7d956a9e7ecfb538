"""fp16 that survives overflow: the error is seen as a float16 device would see it, the nodes
that cause it are found and kept in float32, and TFLite, which cannot keep ops in float32,
falls back to fp32 and says why."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from compiler.backends._fp16 import FP16_MAX, StorageTwinRunner, node_errors, to_fp16
from compiler.runtime import OnnxRuntimeRunner
from compiler.tensors import SampleSet
from edgec.errors import OptionError
from tests.conftest import run_edgec

STEPS, WIDTH, CLASSES = 16, 64, 10


def _layer_norm_model(path: Path) -> Path:
    """A projection into the hundreds, then a layer norm written out as exporters write it
    (``Pow(d, 2)``, ``ReduceMean``): the squares reach ~1e6, past float16's 65504, so on a
    float16 device the variance is inf, the normalized values 0 and every step predicts the
    bias's class."""
    rng = np.random.default_rng(0)
    weights = [
        numpy_helper.from_array((rng.standard_normal((WIDTH, WIDTH)) * 25).astype(np.float32), "w1"),
        numpy_helper.from_array(rng.standard_normal((WIDTH, CLASSES)).astype(np.float32), "w2"),
        numpy_helper.from_array(rng.standard_normal(CLASSES).astype(np.float32), "b"),
        numpy_helper.from_array(np.array(2.0, np.float32), "two"),
        numpy_helper.from_array(np.array(1e-5, np.float32), "eps"),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"], name="proj"),
        helper.make_node("ReduceMean", ["h"], ["mean"], name="mean", axes=[-1]),
        helper.make_node("Sub", ["h", "mean"], ["d"], name="center"),
        helper.make_node("Pow", ["d", "two"], ["sq"], name="square"),
        helper.make_node("ReduceMean", ["sq"], ["var"], name="variance", axes=[-1]),
        helper.make_node("Add", ["var", "eps"], ["var_eps"], name="add_eps"),
        helper.make_node("Sqrt", ["var_eps"], ["std"], name="std"),
        helper.make_node("Div", ["d", "std"], ["n"], name="normalize"),
        helper.make_node("MatMul", ["n", "w2"], ["logits"], name="head"),
        helper.make_node("Add", ["logits", "b"], ["y"], name="bias"),
    ]
    graph = helper.make_graph(
        nodes,
        "layer_norm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, STEPS, WIDTH])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, STEPS, CLASSES])],
        weights,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def _samples(count: int, seed: int) -> SampleSet:
    x = np.random.default_rng(seed).standard_normal((count, 1, STEPS, WIDTH)).astype(np.float32)
    return SampleSet("eval", {"x": x})


def _data(path: Path, samples: SampleSet) -> Path:
    np.savez(path, **samples.arrays)
    return path


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a64, b64 = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a64 @ b64 / (np.linalg.norm(a64) * np.linalg.norm(b64)))


def _build(model: Path, out: Path, fmt: str, *args: str | Path):
    return run_edgec(
        "build",
        model,
        "--target",
        "x86-64-cpu",
        "--format",
        fmt,
        "--precision",
        "fp16",
        "--calibration",
        _data(out / "calib.npz", _samples(16, 1)),
        "--eval",
        _data(out / "eval.npz", _samples(16, 2)),
        "--json",
        "--out",
        out / "bundles",
        *args,
    )


@pytest.fixture(scope="module")
def layer_norm(tmp_path_factory) -> Path:
    return _layer_norm_model(tmp_path_factory.mktemp("fp16") / "layer_norm.onnx")


def test_float16_overflow_is_seen_as_a_float16_device_sees_it(layer_norm, tmp_path):
    half = tmp_path / "fp16.onnx"
    to_fp16(layer_norm, half)
    feed = _samples(1, 3).sample(0)
    reference = OnnxRuntimeRunner(layer_norm).run(feed)["y"]
    # onnxruntime's CPU provider computes the fp16 graph in float32: the overflow hides
    assert _cosine(reference, OnnxRuntimeRunner(half).run(feed)["y"]) > 0.9999
    # stored in float16 between nodes, as a GPU or an ARMv8.2 CPU does, the output is wrecked
    assert _cosine(reference, StorageTwinRunner(half, tmp_path).run(feed)["y"]) < 0.5


def test_tensors_past_float16_range_rank_first(layer_norm, tmp_path):
    errors = node_errors(layer_norm, _samples(8, 1), tmp_path)
    overflowing = [e for e in errors if e.overflows]
    assert {e.tensor for e in overflowing} >= {"sq", "var"}
    assert errors[: len(overflowing)] == overflowing
    square = next(e for e in errors if e.tensor == "sq")
    assert square.producer == "square"
    assert square.max_abs > FP16_MAX
    assert square.added_db > 100  # finite inputs, inf output: this node is where it breaks
    normalize = next(e for e in errors if e.tensor == "n")
    assert normalize.added_db == 0.0  # a victim of the overflow upstream, not its cause


def test_kept_nodes_keep_their_weights_in_float32(layer_norm, tmp_path):
    kept = tmp_path / "kept.onnx"
    notes = to_fp16(layer_norm, kept, ("square", "variance", "add_eps", "std"))
    assert notes == ["4 node(s) kept in float32: square, variance, add_eps, std"]
    weights = {w.name: w.data_type for w in onnx.load(str(kept)).graph.initializer}
    assert weights["w1"] == TensorProto.FLOAT16  # the rest is still float16
    assert weights["two"] == TensorProto.FLOAT  # the kept Pow's exponent stays float32
    feed = _samples(1, 3).sample(0)
    reference = OnnxRuntimeRunner(layer_norm).run(feed)["y"]
    assert _cosine(reference, StorageTwinRunner(kept, tmp_path).run(feed)["y"]) > 0.9999


def _softmax_model(path: Path) -> Path:
    """A softmax written out: ``e = Exp(logits)`` read by both ``ReduceSum`` and ``Div``.
    Logits past 11.1 make ``e`` overflow float16."""
    w = (np.random.default_rng(0).standard_normal((WIDTH, CLASSES)) * 2).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["logits"], name="proj"),
        helper.make_node("Exp", ["logits"], ["e"], name="exp"),
        helper.make_node("ReduceSum", ["e", "axes"], ["s"], name="sum", keepdims=1),
        helper.make_node("Div", ["e", "s"], ["y"], name="norm"),
    ]
    graph = helper.make_graph(
        nodes,
        "softmax",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, STEPS, WIDTH])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, STEPS, CLASSES])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.array([-1], np.int64), "axes")],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))
    return path


def test_a_tensor_between_two_kept_nodes_never_passes_through_float16(tmp_path):
    source = _softmax_model(tmp_path / "softmax.onnx")
    kept = tmp_path / "kept.onnx"
    to_fp16(source, kept, ("exp", "sum", "norm"))
    model = onnx.load(str(kept))
    producers = {out: n for n in model.graph.node for out in n.output}
    for name in ("sum", "norm"):  # onnxconverter-common alone casts e to float16 and back here
        node = next(n for n in model.graph.node if n.name == name)
        assert producers[node.input[0]].name == "exp"
    feed = _samples(1, 3).sample(0)
    reference = OnnxRuntimeRunner(source).run(feed)["y"]
    w = numpy_helper.to_array(onnx.load(str(source)).graph.initializer[0])
    assert np.exp(feed["x"] @ w).max() > FP16_MAX  # e overflows float16 on this sample
    found = StorageTwinRunner(kept, tmp_path).run(feed)["y"]
    assert np.isfinite(found).all()
    assert _cosine(reference, found) > 0.9999


def test_a_weight_shared_by_a_kept_and_a_converted_node_is_split(tmp_path):
    scale = numpy_helper.from_array(np.full((4,), 3.0, np.float32), "scale")
    nodes = [
        helper.make_node("Mul", ["x", "scale"], ["a"], name="kept"),
        helper.make_node("Mul", ["a", "scale"], ["y"], name="converted"),
    ]
    graph = helper.make_graph(
        nodes,
        "shared",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        [scale],
    )
    source = tmp_path / "shared.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(source))
    target = tmp_path / "fp16.onnx"
    to_fp16(source, target, ("kept",))
    x = np.arange(4, dtype=np.float32)[None]
    assert np.allclose(OnnxRuntimeRunner(target).run({"x": x})["y"], x * 9)


def test_an_unknown_node_to_keep_is_refused(layer_norm, tmp_path):
    with pytest.raises(OptionError, match="no node named 'nope'"):
        to_fp16(layer_norm, tmp_path / "x.onnx", ("nope",))


def test_fp16_misses_the_gate_alone_and_the_search_keeps_the_overflowing_nodes(layer_norm, tmp_path):
    alone = _build(layer_norm, tmp_path, "onnx", "--ignore-gates")
    assert alone.returncode == 0, alone.stderr
    (plain,) = alone.json()["bundles"]
    assert plain["gate_failures"]  # without the search, fp16 misses: every step argmaxes the bias

    result = _build(layer_norm, tmp_path, "onnx", "--force")
    assert result.returncode == 0, result.stderr
    (bundle,) = result.json()["bundles"]
    assert bundle["status"] == "ok"
    assert bundle["precision"] == "fp16"
    trail = bundle["search"]
    assert trail[0]["configuration"] == "fp16"
    assert not trail[0]["passed"]
    (chosen,) = [t for t in trail if t["chosen"]]
    assert chosen["passed"]
    assert chosen["configuration"] == f"fp16 ({len(chosen['float_nodes'])} nodes fp32)"
    assert {"square", "variance"} <= set(chosen["float_nodes"])
    assert len(chosen["float_nodes"]) <= 5  # the layer norm's tail, not the whole graph
    report = json.loads((Path(bundle["path"]) / "report.json").read_text())
    notes = " ".join(report["notes"])
    assert "kept in float32: " in notes
    assert "sq (Pow, max |x|" in notes  # which tensor overflowed, and by how much
    model = onnx.load(str(Path(bundle["path"]) / "model.onnx"))
    assert any(w.data_type == TensorProto.FLOAT16 for w in model.graph.initializer)


def _big_weight_model(path: Path) -> Path:
    """A projection whose weights (~1e5) are past float16's range: float16 clamps them."""
    w = (np.random.default_rng(0).standard_normal((WIDTH, CLASSES)) * 1e5).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="project")],
        "big_weights",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, STEPS, WIDTH])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, STEPS, CLASSES])],
        [numpy_helper.from_array(w, "w")],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))
    return path


def test_a_kept_node_that_makes_an_output_is_not_rounded_through_float16(tmp_path):
    source = _big_weight_model(tmp_path / "big.onnx")
    kept = tmp_path / "kept.onnx"
    to_fp16(source, kept, ("project",))
    feed = _samples(1, 3).sample(0)
    reference = OnnxRuntimeRunner(source).run(feed)["y"]
    assert np.abs(reference).max() > FP16_MAX
    assert np.allclose(StorageTwinRunner(kept, tmp_path).run(feed)["y"], reference, rtol=1e-6)


def test_onnx_fp16_that_only_fp32_can_hold_says_so(tmp_path):
    result = _build(_big_weight_model(tmp_path / "big.onnx"), tmp_path, "onnx")
    assert result.returncode != 0
    (bundle,) = result.json()["bundles"]
    assert "leave float16's range" in bundle["error"]
    assert "build it at fp32" in bundle["error"]


@pytest.mark.slow
def test_tflite_fp16_that_misses_falls_back_to_fp32_with_the_reason(tmp_path):
    result = _build(_big_weight_model(tmp_path / "big.onnx"), tmp_path, "tflite")
    assert result.returncode == 0, result.stderr
    (bundle,) = result.json()["bundles"]
    assert [(t["configuration"], t["passed"]) for t in bundle["search"]] == [("fp16", False), ("fp32", True)]
    assert bundle["precision"] == "fp32"
    notes = " ".join(bundle["notes"])
    assert "tflite fp16 cannot keep chosen ops in float32" in notes
    assert "so fp32 was built: it met the gate" in notes
