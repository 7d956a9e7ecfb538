"""int8 and fp16 on graphs as real exporters write them: old opsets, already-quantized
sources, tensors that are scalars, integers or change shape per sample, converter failures
in the middle of a search."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from compiler.backends import BackendSpec, CompileOptions, Int8Config
from compiler.backends._fp16 import to_fp16
from compiler.backends._quantize import to_int8
from compiler.layer_error import channel_sqnr, layer_errors
from compiler.runtime import OnnxRuntimeRunner, first_line
from compiler.tensors import SampleSet
from edgec.errors import ConversionError, QuantizedSourceError
from edgec.manifest import Precision, TargetFormat


def _save(path: Path, nodes, inputs, outputs, initializer=(), opset=17, value_info=()) -> Path:
    graph = helper.make_graph(
        nodes, "g", inputs, outputs, initializer=list(initializer), value_info=list(value_info)
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 7
    onnx.save(model, str(path))
    return path


def _ragged_model(path: Path, stale_value_info: bool) -> Path:
    """``x`` [1,8]: ``pos`` = the positive values of x (a length that changes per sample),
    ``s`` = sum(pos * pos) (a scalar), ``mask`` (bool), out = (x * W) * s. With
    ``stale_value_info`` the graph declares ``h`` a scalar, as stale exporter metadata does."""
    w = numpy_helper.from_array(np.linspace(0.5, 2.0, 8, dtype=np.float32).reshape(1, 8), "W")
    zero = numpy_helper.from_array(np.zeros((1, 8), np.float32), "zero")
    nodes = [
        helper.make_node("Greater", ["x", "zero"], ["mask"], name="mask"),
        helper.make_node("Flatten", ["x"], ["flat_x"], axis=0, name="flat_x"),
        helper.make_node("Flatten", ["mask"], ["flat_mask"], axis=0, name="flat_mask"),
        helper.make_node("Squeeze", ["flat_x"], ["vx"], name="vx"),
        helper.make_node("Squeeze", ["flat_mask"], ["vmask"], name="vmask"),
        helper.make_node("Compress", ["vx", "vmask"], ["pos"], axis=0, name="pos"),
        helper.make_node("Mul", ["pos", "pos"], ["sq"], name="sq"),
        helper.make_node("ReduceSum", ["sq"], ["s"], keepdims=0, name="s"),
        helper.make_node("Mul", ["x", "W"], ["h"], name="h"),
        helper.make_node("Mul", ["h", "s"], ["out"], name="out"),
    ]
    stale = [helper.make_tensor_value_info("h", TensorProto.FLOAT, [])] if stale_value_info else []
    return _save(
        path,
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 8])],
        [w, zero],
        value_info=stale,
    )


def _samples(count: int, shape: tuple[int, ...], seed: int = 0) -> SampleSet:
    rng = np.random.default_rng(seed)
    return SampleSet("calibration", {"x": rng.standard_normal((count, *shape)).astype(np.float32)})


def test_layer_error_measures_scalars_ragged_tensors_and_skips_integers(tmp_path):
    clean = _ragged_model(tmp_path / "clean.onnx", stale_value_info=False)
    stale = _ragged_model(tmp_path / "stale.onnx", stale_value_info=True)
    calibration = _samples(16, (1, 8))
    qdq = tmp_path / "qdq.onnx"
    to_int8(clean, qdq, CompileOptions(Precision.INT8, calibration), tmp_path)
    # the old code reshaped each tensor to its declared shape: "cannot reshape array of
    # size 8 into shape ()"
    found = {e.tensor: e for e in layer_errors(stale, qdq, calibration, tmp_path)}
    assert "h" in found  # its declared shape is wrong: measured with its real one
    assert "s" in found  # a scalar
    assert "pos" in found  # its length changes with the sample
    assert all(np.isfinite(e.qdq_db) for e in found.values())
    assert "mask" not in found


def test_channel_sqnr_takes_each_sample_with_its_own_shape():
    rng = np.random.default_rng(1)
    reference = [rng.standard_normal((1, 3, n)) for n in (4, 7, 2)]
    noisy = [r + 1e-3 for r in reference]
    assert channel_sqnr(reference, noisy) == pytest.approx(
        float(
            np.mean(
                [
                    min(
                        10
                        * np.log10(
                            sum(np.sum(r[0, c] ** 2) for r in reference)
                            / sum(r[0, c].size * 1e-6 for r in reference)
                        ),
                        60,
                    )
                    for c in range(3)
                ]
            )
        ),
        rel=1e-6,
    )
    assert channel_sqnr([np.float32(2.0) * np.ones(())], [np.ones(())]) == pytest.approx(20 * np.log10(2))


def test_channel_sqnr_skips_integer_and_sequence_tensors():
    ints = [np.arange(6).reshape(2, 3)]
    assert channel_sqnr(ints, ints) is None
    sequence = [[np.ones((2, 3), np.float32)]]
    assert channel_sqnr(sequence, sequence) is None


def _conv_model(path: Path, opset: int) -> Path:
    rng = np.random.default_rng(2)
    w = numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "W")
    nodes = [
        helper.make_node("Conv", ["x", "W"], ["c"], pads=[1, 1, 1, 1], name="conv"),
        helper.make_node("Relu", ["c"], ["y"], name="relu"),
    ]
    return _save(
        path,
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])],
        [w],
        opset=opset,
    )


def test_int8_of_an_opset_11_model_loads_in_onnxruntime(tmp_path):
    source = _conv_model(tmp_path / "old.onnx", opset=11)
    target = tmp_path / "int8.onnx"
    notes = to_int8(source, target, CompileOptions(Precision.INT8, _samples(8, (1, 3, 8, 8))), tmp_path)
    # the old code wrote per-channel DequantizeLinear(axis=...) into an opset 11 graph:
    # "Unrecognized attribute: axis for operator DequantizeLinear"
    runner = OnnxRuntimeRunner(target)
    x = _samples(1, (1, 3, 8, 8)).sample(0)
    assert runner.run(x)["y"].shape == (1, 4, 8, 8)
    assert any("opset 11 to 13" in n for n in notes)
    axes = [
        a.i for n in onnx.load(str(target)).graph.node if n.op_type == "DequantizeLinear" for a in n.attribute
    ]
    assert 0 in axes  # the weights are still per channel


def _dynamically_quantized_model(path: Path) -> Path:
    """What ``quantize_dynamic`` leaves: DynamicQuantizeLinear feeding MatMulInteger."""
    w = numpy_helper.from_array(np.ones((4, 2), np.int8), "W")
    wz = numpy_helper.from_array(np.zeros((), np.int8), "W_zero")
    nodes = [
        helper.make_node("DynamicQuantizeLinear", ["x"], ["xq", "x_scale", "x_zero"], name="dq"),
        helper.make_node("MatMulInteger", ["xq", "W", "x_zero", "W_zero"], ["acc"], name="mm"),
        helper.make_node("Cast", ["acc"], ["accf"], to=TensorProto.FLOAT, name="cast"),
        helper.make_node("Mul", ["accf", "x_scale"], ["y"], name="scale"),
    ]
    return _save(
        path,
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])],
        [w, wz],
    )


def test_int8_of_an_already_quantized_model_is_refused_with_what_was_found(tmp_path):
    source = _dynamically_quantized_model(tmp_path / "q.onnx")
    options = CompileOptions(Precision.INT8, _samples(4, (1, 4)))
    with pytest.raises(QuantizedSourceError) as caught:
        to_int8(source, tmp_path / "int8.onnx", options, tmp_path)
    assert caught.value.ops == ["DynamicQuantizeLinear", "MatMulInteger"]
    message = str(caught.value)
    assert "\n" not in message
    assert "float model" in message
    assert "fp32" in message


def test_fp16_of_an_already_quantized_model_is_refused(tmp_path):
    source = _dynamically_quantized_model(tmp_path / "q.onnx")
    with pytest.raises(QuantizedSourceError, match="already quantized"):
        to_fp16(source, tmp_path / "fp16.onnx")


def test_a_converter_failure_mid_search_is_recorded_and_the_search_goes_on(monkeypatch):
    from compiler import search as search_mod

    configs = (
        Int8Config(per_channel=False),
        Int8Config(int16_activations=True),
        Int8Config(symmetric_activations=True),
    )
    spec = BackendSpec(
        TargetFormat.TFLITE, "x", (Precision.INT8,), (), "", "model.tflite", int8_search=configs
    )
    prepared = SimpleNamespace(inputs=[], outputs=[])
    ctx = SimpleNamespace(
        backend=SimpleNamespace(spec=spec), prepared=prepared, workdir=Path("."), progress=lambda _: None
    )

    def fake_trial(ctx, precision, config=None, fp32_nodes=()):
        if config.int16_activations:
            raise ConversionError("Quantization to 16x8-bit not yet supported for op: 'PRELU'.")
        return search_mod.Trial(
            precision, config, SimpleNamespace(notes=[]), 10, None, ["top-1 0.5 < 0.97"], None
        )

    monkeypatch.setattr(search_mod, "trial", fake_trial)
    trail = [fake_trial(ctx, Precision.INT8, Int8Config())]
    search_mod._search_int8(ctx, trail)
    assert [t.config.label() for t in trail[1:]] == [c.label() for c in configs]  # all tried
    failed = trail[2]
    assert not failed.converted
    assert not failed.passed
    assert "16x8-bit not yet supported for op: 'PRELU'" in failed.failures[0]
    assert failed.as_dict(False)["failures"] == failed.failures
    assert search_mod.best(trail).converted


def test_first_line_keeps_the_reason_at_the_end_of_a_long_onnxruntime_error():
    inputs = ", ".join(f'"t_{i}_quantized": tensor(int8)' for i in range(40))
    error = RuntimeError(
        "[ONNXRuntimeError] : 10 : INVALID_GRAPH : Load model from /tmp/x/model.onnx failed:This is an "
        f'invalid model. In Node, ("t_1001_DequantizeLinear", DequantizeLinear, "", -1) : ({inputs}) '
        '-> ("t_1001": tensor(float),) , '
        "Error Unrecognized attribute: axis for operator DequantizeLinear\nmore"
    )
    line = first_line(error)
    assert line.startswith("[ONNXRuntimeError] : 10 : INVALID_GRAPH")
    assert line.endswith("Unrecognized attribute: axis for operator DequantizeLinear")
    assert len(line) < 450
    assert first_line(RuntimeError("short\nsecond")) == "short"


def test_mixed_precision_does_not_try_the_same_float_nodes_twice(monkeypatch):
    from compiler import search as search_mod
    from compiler.layer_error import LayerError

    spec = BackendSpec(TargetFormat.ONNX, "x", (Precision.INT8,), (), "", "model.onnx", mixed_precision=True)
    ctx = SimpleNamespace(
        backend=SimpleNamespace(spec=spec),
        prepared=SimpleNamespace(model=onnx.ModelProto()),
        progress=lambda _: None,
    )
    tried: list[tuple[str, ...]] = []

    def fake_trial(ctx, precision, config=None, fp32_nodes=()):
        tried.append(config.float_nodes)
        return search_mod.Trial(precision, config, SimpleNamespace(notes=[]), 10, None, ["missed"], None)

    # a head whose sigmoid and its output are one tensor apart: both keep the same nodes in float
    errors = [LayerError(f"t{i}", f"n{i}", "Mul", 10.0 + i, None) for i in range(8)]
    monkeypatch.setattr(search_mod, "trial", fake_trial)
    monkeypatch.setattr(
        search_mod, "with_layer_errors", lambda ctx, t: dataclasses.replace(t, layer_errors=errors)
    )
    monkeypatch.setattr(search_mod, "nodes_touching", lambda model, tensors: ("head", *tensors[2:]))
    trail = [fake_trial(ctx, Precision.INT8, Int8Config())]
    search_mod._search_int8(ctx, trail)
    mixed = tried[1:]
    assert len(mixed) == len(set(mixed))
    assert mixed == [("head",), ("head", "t2", "t3")]
