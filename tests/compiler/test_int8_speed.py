"""int8 that onnxruntime runs fast on x86: every node fused into an integer kernel, GEMM weights
that cannot saturate without the slow exact kernels, and ``--precision auto`` choosing by
measured latency where the profile asks for it. No timed assertions: the mechanisms are
checked (the optimized graph, the weights, which trial auto takes)."""

from __future__ import annotations

import json
import platform
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from compiler.backends import CompileOptions, Int8Config
from compiler.backends._ort_x86 import SAFE_WEIGHT_MAX, gemm_weights, saturation_free
from compiler.backends._quantize import to_int8
from compiler.backends.ort import BACKEND
from compiler.prepare import prepare
from compiler.runtime import ORT_SESSION_CONFIG
from compiler.search import Trial, best
from compiler.tensors import SampleSet
from device_profiles import load_profile
from edgec.manifest import Precision
from tests.conftest import DIGITS, ROOT, run_edgec

X86_HOST = platform.machine().lower() in {"x86_64", "amd64"}
PROFILES = ROOT / "device_profiles" / "data"


def _conv(name: str, x: str, out: str, cin: int, cout: int, rng, group: int = 1, k: int = 1):
    w = rng.standard_normal((cout, cin // group, k, k)).astype(np.float32) * 0.3
    b = rng.standard_normal(cout).astype(np.float32) * 0.1
    node = helper.make_node(
        "Conv", [x, f"{name}.w", f"{name}.b"], [out], name=name, group=group, pads=[k // 2] * 4
    )
    return node, [numpy_helper.from_array(w, f"{name}.w"), numpy_helper.from_array(b, f"{name}.b")]


def _inverted_residual(path: Path, channels: int = 8) -> Path:
    """A stem conv over ``channels`` input channels, then a MobileNetV2-style block whose input
    fans out to the block and to the residual Add (the shape that left nodes in float), then
    pooling and a Gemm classifier."""
    rng = np.random.default_rng(0)
    stem, expand, depthwise, project, head = (
        _conv("stem", "x", "t0", channels, 16, rng),
        _conv("expand", "t", "e0", 16, 48, rng),
        _conv("depthwise", "e", "d0", 48, 48, rng, group=48, k=3),
        _conv("project", "d", "p", 48, 16, rng),
        _conv("head", "s", "h0", 16, 32, rng),
    )
    nodes = [
        stem[0],
        helper.make_node("Relu", ["t0"], ["t"], name="stem_relu"),
        expand[0],
        helper.make_node("Relu", ["e0"], ["e"], name="expand_relu"),
        depthwise[0],
        helper.make_node("Relu", ["d0"], ["d"], name="depthwise_relu"),
        project[0],
        helper.make_node("Add", ["t", "p"], ["s"], name="residual"),
        head[0],
        helper.make_node("Relu", ["h0"], ["h"], name="head_relu"),
        helper.make_node("GlobalAveragePool", ["h"], ["g"], name="pool"),
        helper.make_node("Flatten", ["g"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "fc.w", "fc.b"], ["logits"], name="fc", transB=1),
    ]
    inits = [i for _, weights in (stem, expand, depthwise, project, head) for i in weights]
    inits += [
        numpy_helper.from_array(rng.standard_normal((10, 32)).astype(np.float32) * 0.3, "fc.w"),
        numpy_helper.from_array(np.zeros(10, np.float32), "fc.b"),
    ]
    graph = helper.make_graph(
        nodes,
        "block",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, channels, 12, 12])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 10])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def _calibration(count: int = 16, channels: int = 8) -> SampleSet:
    rng = np.random.default_rng(1)
    data = rng.standard_normal((count, 1, channels, 12, 12)).astype(np.float32)
    return SampleSet("calibration", {"x": data})


DEFAULT = Int8Config()


def _quantized(tmp_path: Path, x86: bool, config: Int8Config = DEFAULT) -> Path:
    source = _inverted_residual(tmp_path / "block.onnx")
    target = tmp_path / f"int8-{x86}-{config.x86_fast_weights}.onnx"
    options = CompileOptions(Precision.INT8, _calibration(), config)
    to_int8(source, target, options, tmp_path, x86=x86)
    return target


def _optimized_ops(model: Path, tmp_path: Path, config: dict[str, str] | None = None) -> Counter[str]:
    """The op types onnxruntime's CPU provider runs after its graph optimizations."""
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    options.log_severity_level = 3
    for key, value in (config or {}).items():
        options.add_session_config_entry(key, value)
    ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    return Counter(n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node)


def _int8_weights(model: Path) -> dict[str, np.ndarray]:
    loaded = onnx.load(str(model))
    tensors = {t.name: t for t in loaded.graph.initializer}
    return {node.name: numpy_helper.to_array(tensors[w]) for node, w, _ in gemm_weights(loaded)}


# --------------------------------------------------------------------------- fusion


def test_every_conv_and_add_of_a_residual_block_fuses_into_integer_kernels(tmp_path):
    ops = _optimized_ops(_quantized(tmp_path, x86=True), tmp_path)
    assert ops["QLinearConv"] == 5
    assert ops["QLinearAdd"] == 1
    assert ops["QGemm"] == 1
    # nothing left as DequantizeLinear -> float op -> QuantizeLinear: one Q in, one DQ out
    assert ops["Conv"] == ops["Add"] == ops["Gemm"] == 0
    assert ops["QuantizeLinear"] == ops["DequantizeLinear"] == 1


@pytest.mark.skipif(not X86_HOST, reason="onnxruntime converts int8 activations to uint8 on x86 only")
def test_int8_activations_leave_the_residual_branch_in_float_on_x86(tmp_path):
    """Why the x86 graph quantizes activations to uint8: with int8 ones, the tensor that fans
    out to the block and to the Add keeps its int8 Q/DQ pair, and every node touching it
    stays a float op between DequantizeLinear and QuantizeLinear."""
    ops = _optimized_ops(_quantized(tmp_path, x86=False), tmp_path)
    assert ops["Add"] == 1
    assert ops["Conv"] >= 2  # the stem, whose output fans out, and the expand conv reading it


def test_an_rgb_stem_conv_stays_in_float_on_x86(tmp_path):
    """Three input channels: the fast int8 convolution reads them 4 at a time, its fallback
    is slower than float, so the stem is left in float and the rest is integer."""
    source = _inverted_residual(tmp_path / "rgb.onnx", channels=3)
    target = tmp_path / "rgb-int8.onnx"
    options = CompileOptions(Precision.INT8, _calibration(channels=3))
    notes = to_int8(source, target, options, tmp_path, x86=True)
    assert any("kept in float" in n and "stem" in n for n in notes)
    ops = _optimized_ops(target, tmp_path)
    assert ops["Conv"] == 1  # the stem, reading the float input: no QuantizeLinear before it
    assert ops["QLinearConv"] == 4
    assert ops["QLinearAdd"] == 1
    stem = next(n for n in onnx.load(str(target)).graph.node if n.name == "stem")
    assert stem.input[0] == "x"


# --------------------------------------------------------------------------- saturation


def test_gemm_weights_are_seven_bit_and_depthwise_keep_eight(tmp_path):
    model = _quantized(tmp_path, x86=True)
    weights = _int8_weights(model)
    assert set(weights) == {"stem", "expand", "project", "head", "fc"}  # not the depthwise conv
    assert all(int(np.abs(w.astype(np.int16)).max()) == SAFE_WEIGHT_MAX for w in weights.values())
    loaded = onnx.load(str(model))
    depthwise = next(t for t in loaded.graph.initializer if t.name == "depthwise.w_quantized")
    assert int(np.abs(numpy_helper.to_array(depthwise).astype(np.int16)).max()) == 127
    assert saturation_free(loaded)


def test_eight_bit_weights_are_not_saturation_free(tmp_path):
    model = _quantized(tmp_path, x86=True, config=Int8Config(x86_fast_weights=False))
    assert max(int(np.abs(w.astype(np.int16)).max()) for w in _int8_weights(model).values()) == 127
    assert not saturation_free(onnx.load(str(model)))


def test_arm_targets_keep_int8_activations_and_eight_bit_weights(tmp_path):
    model = onnx.load(str(_quantized(tmp_path, x86=False)))
    types = {t.name: t.data_type for t in model.graph.initializer}
    activations = [n.input[2] for n in model.graph.node if n.op_type == "QuantizeLinear"]
    assert activations
    assert {types[zero_point] for zero_point in activations} == {TensorProto.INT8}
    assert not saturation_free(model)


def test_the_precision_override_is_recorded_only_where_weights_could_saturate(tmp_path):
    """The manifest's ``session.x64quantprecision`` moves every weight outside [-64, 64] to
    slow u8u8 kernels; a saturation-free x86 graph runs without it, an ARM one keeps it."""
    prepared = prepare(_inverted_residual(tmp_path / "block.onnx"), {}, tmp_path)
    recorded = {}
    for name, config in [
        ("x86-64-cpu", Int8Config()),
        ("x86-64-cpu", Int8Config(x86_fast_weights=False)),
        ("raspberry-pi-4", Int8Config()),
    ]:
        folder = tmp_path / f"{name}-{config.x86_fast_weights}"
        folder.mkdir()
        options = CompileOptions(Precision.INT8, _calibration(), config)
        artifact = BACKEND.compile(prepared, load_profile(name), options, folder)
        recorded[name, config.x86_fast_weights] = artifact.runtime_config
    assert recorded["x86-64-cpu", True] == {}
    assert recorded["x86-64-cpu", False] == dict(ORT_SESSION_CONFIG)
    assert recorded["raspberry-pi-4", True] == dict(ORT_SESSION_CONFIG)


@pytest.mark.skipif(not X86_HOST, reason="session.x64quantprecision only acts on x86")
def test_the_override_would_turn_eight_bit_weights_to_u8u8(tmp_path):
    """What the override costs: onnxruntime rewrites int8 GEMM weights outside [-64, 64] to
    uint8 (u8u8 kernels); 7-bit ones it leaves as int8 (u8s8 kernels)."""

    def uint8_weights(model: Path) -> int:
        _optimized_ops(model, tmp_path, dict(ORT_SESSION_CONFIG))
        optimized = onnx.load(str(tmp_path / "optimized.onnx"))
        return sum(t.data_type == TensorProto.UINT8 and len(t.dims) > 1 for t in optimized.graph.initializer)

    assert uint8_weights(_quantized(tmp_path, x86=True, config=Int8Config(x86_fast_weights=False))) > 0
    fast = _quantized(tmp_path, x86=True)
    depthwise = 1  # 8-bit: converted too, but never needs the override (32-bit accumulation)
    assert uint8_weights(fast) == depthwise


# --------------------------------------------------------------------------- auto, objective latency


def _trial(precision: Precision, size: int, latency_ms: float | None) -> Trial:
    return Trial(precision, None, None, size, None, [], None, latency_ms=latency_ms)  # type: ignore[arg-type]


def test_best_takes_the_fastest_timed_trial_not_the_smallest():
    trials = [
        _trial(Precision.INT8, 100, 9.0),
        _trial(Precision.FP16, 200, 12.0),
        _trial(Precision.FP32, 400, 4.0),
    ]
    assert best(trials).precision is Precision.FP32
    untimed = [_trial(t.precision, t.size_bytes, None) for t in trials]
    assert best(untimed).precision is Precision.INT8  # objective size: the smallest


def _profile(tmp_path: Path, source: str, objective: str) -> Path:
    text = (PROFILES / f"{source}.toml").read_text()
    assert 'objective = "size"' in text or "objective" not in text
    text = text.replace(f'id = "{source}"', f'id = "{source}-{objective}"')
    if "objective" in text:
        text = text.replace('objective = "size"', f'objective = "{objective}"')
    else:
        text = text.replace("default_precision", f'objective = "{objective}"\ndefault_precision', 1)
    path = tmp_path / f"{source}-{objective}.toml"
    path.write_text(text)
    return path


def _auto(tmp_path: Path, profile: Path, fmt: str = "onnx") -> dict:
    result = run_edgec(
        "build",
        DIGITS / "model.onnx",
        "--target",
        profile,
        "--format",
        fmt,
        "--precision",
        "auto",
        "--calibration",
        DIGITS / "calib.npz",
        "--eval",
        DIGITS / "eval.npz",
        "--json",
        "--out",
        tmp_path / "out",
    )
    assert result.returncode == 0, result.stderr
    (bundle,) = result.json()["bundles"]
    return bundle


@pytest.mark.skipif(not X86_HOST, reason="the x86-64 profile is the target only on an x86-64 host")
def test_auto_with_objective_latency_times_every_passing_precision_and_takes_the_fastest(tmp_path):
    bundle = _auto(tmp_path, _profile(tmp_path, "x86-64-cpu", "latency"))
    timed = [step for step in bundle["search"] if step["latency_ms"] is not None]
    assert {step["precision"] for step in timed} == {"int8", "fp16", "fp32"}
    assert all(step["passed"] for step in timed)
    fastest = min(timed, key=lambda step: step["latency_ms"])
    (chosen,) = [step for step in bundle["search"] if step["chosen"]]
    assert chosen == fastest
    assert bundle["precision"] == fastest["precision"]
    (note,) = [n for n in bundle["notes"] if "objective latency" in n]
    for step in timed:  # the figures are in the build notes
        assert f"{step['configuration']} {step['latency_ms']:.2f} ms" in note
    report = json.loads((Path(bundle["path"]) / "report.json").read_text())
    assert report["search"] == bundle["search"]


@pytest.mark.skipif(not X86_HOST, reason="on an arm64 host the Raspberry Pi profile would be timed")
def test_objective_latency_off_the_target_takes_the_smallest_and_says_why(tmp_path):
    bundle = _auto(tmp_path, _profile(tmp_path, "raspberry-pi-4", "latency"))
    assert bundle["precision"] == "int8"
    assert all(step["latency_ms"] is None for step in bundle["search"])
    (note,) = [n for n in bundle["notes"] if "precision auto" in n]
    assert "smallest" in note
    assert "objective latency, not timed: this host is" in note
