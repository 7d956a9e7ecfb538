"""Which tensors the int8 mixed-precision search keeps in float: the ones where the model
loses the most SQNR, with the inputs their node amplifies.

Reproduces what the deep-sort re-identification network (a real MobileNetV2 with folded
BatchNorm) does: one channel of a 1x1 convolution has weights of ~127 and a bias of ~-1974
that cancel, and its ReLU6 output stays in [0, 6]. The rounding of the convolution's *input*
looks harmless there (37 dB) and so does its own output's; the convolution turns it into 3 dB.
Ranked by rounding error alone, the search kept the wrong tensors in float and missed the
gate at cosine 0.937 after 10 tries; ranked by the SQNR lost, it passes at 0.991.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

from compiler.layer_error import layer_errors, nodes_touching
from compiler.tensors import SampleSet

from .models import cancelling_model

rng = np.random.default_rng(7)
CHANNELS = 8


def _model(path: Path) -> None:
    cancelling_model(path, stem_and_tail=False)


class _Reader(CalibrationDataReader):
    def __init__(self, samples: np.ndarray) -> None:
        self._feeds = iter([{"x": s[None]} for s in samples])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._feeds, None)


def _cosine(float_model: Path, int8_model: Path, samples: np.ndarray) -> float:
    a = ort.InferenceSession(str(float_model), providers=["CPUExecutionProvider"])
    b = ort.InferenceSession(str(int8_model), providers=["CPUExecutionProvider"])
    ref = np.concatenate([a.run(None, {"x": s[None]})[0].ravel() for s in samples])
    got = np.concatenate([b.run(None, {"x": s[None]})[0].ravel() for s in samples])
    return float(ref @ got / np.linalg.norm(ref) / np.linalg.norm(got))


def test_amplifying_node_ranks_first_with_its_input(tmp_path):
    samples = rng.normal(0, 1, (32, 4, 8, 8)).astype(np.float32)
    source = tmp_path / "model.onnx"
    _model(source)
    qdq = tmp_path / "int8.onnx"
    quantize_static(str(source), str(qdq), _Reader(samples), quant_format=QuantFormat.QDQ, per_channel=True)

    errors = layer_errors(source, qdq, SampleSet("calibration", {"x": samples[:, None]}), tmp_path)

    worst = errors[0]
    assert worst.tensor == "z"  # the ReLU6 output of the amplifying convolution
    assert worst.inputs == ("y",)  # ... computed from the rounded projection
    assert worst.drop_db is not None
    assert worst.drop_db > 10.0
    # its own rounding is not what hurts: the ReLU6's clipping is not counted as error
    assert worst.qdq_db > 20.0

    # keeping the tensor and the input its node amplifies in float repairs the model;
    # the tensor alone does not
    model = onnx.load(source)
    alone, grouped = tmp_path / "alone.onnx", tmp_path / "grouped.onnx"
    for path, tensors in ((alone, ["z"]), (grouped, ["z", "y"])):
        excluded = list(nodes_touching(model, tensors))
        quantize_static(
            str(source), str(path), _Reader(samples), quant_format=QuantFormat.QDQ, per_channel=True,
            nodes_to_exclude=excluded,
        )  # fmt: skip
    everything = _cosine(source, qdq, samples)
    assert _cosine(source, grouped, samples) > max(0.999, everything)
    assert _cosine(source, alone, samples) < _cosine(source, grouped, samples)


def test_int16_activations_for_onnxruntime(tmp_path):
    """The last int8 configuration the ONNX search tries before mixed precision: int16
    activations in com.microsoft Q/DQ (onnxruntime has no int16 kernels and computes between
    them in float), int8 weights. MediaPipe's face detector passes with it (box cosine over
    its confident anchors 0.9993) where every 8-bit configuration ended at 0.74."""
    from compiler.backends import CompileOptions, Int8Config
    from compiler.backends._quantize import to_int8
    from edgec.manifest import Precision

    samples = rng.normal(0, 1, (32, 4, 8, 8)).astype(np.float32)
    source = tmp_path / "model.onnx"
    _model(source)
    calibration = SampleSet("calibration", {"x": samples[:, None]})
    cosines = {}
    for wide in (False, True):
        target = tmp_path / f"int{16 if wide else 8}.onnx"
        options = CompileOptions(Precision.INT8, calibration, Int8Config(int16_activations=wide))
        notes = to_int8(source, target, options, tmp_path, x86=True)
        graph = onnx.load(target).graph
        quantizers = [n for n in graph.node if n.op_type == "QuantizeLinear"]
        assert quantizers
        assert {n.domain for n in quantizers} == ({"com.microsoft"} if wide else {""})
        zero_points = {i.name: i.data_type for i in graph.initializer if i.name.endswith("zero_point")}
        activation_zero = zero_points[quantizers[0].input[2]]
        assert activation_zero == (TensorProto.INT16 if wide else TensorProto.UINT8)
        assert any("int16 activations" in note for note in notes) == wide
        cosines[wide] = _cosine(source, target, samples)
    assert cosines[True] > cosines[False] + 0.02  # the amplified input rounding is 256 times finer
