"""Graph-level precision changes shared by the ONNX-based backends (ONNX Runtime, TensorRT)."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto

from compiler._capture import captured_output
from compiler.backends import CompileOptions
from compiler.runtime import first_line
from edgec.errors import ConversionError, OptionError, QuantizedSourceError
from edgec.manifest import Precision

__all__ = ["refuse_quantized", "to_dynamic_int8", "to_fp16", "to_int8"]

logger = logging.getLogger(__name__)
_METHODS = {"minmax": "MinMax", "entropy": "Entropy", "percentile": "Percentile"}
PER_CHANNEL_OPSET = 13  # DequantizeLinear's ``axis`` (per-channel scales) exists from opset 13
# Ops that only a quantized graph holds: static Q/DQ, dynamic quantization, integer kernels.
_QUANTIZED_OPS = frozenset(
    "QuantizeLinear DequantizeLinear DynamicQuantizeLinear DynamicQuantizeLSTM "
    "DynamicQuantizeMatMul MatMulInteger ConvInteger MatMulIntegerToFloat QAttention "
    "QGemm QuantizeBFP DequantizeBFP".split()
)


def quantized_ops(model: onnx.ModelProto) -> list[str]:
    """The quantized op types in the graph (its subgraphs included), sorted."""
    found: set[str] = set()
    graphs = [model.graph]
    while graphs:
        graph = graphs.pop()
        for node in graph.node:
            if node.op_type in _QUANTIZED_OPS or node.op_type.startswith("QLinear"):
                found.add(node.op_type)
            graphs.extend(a.g for a in node.attribute if a.type == onnx.AttributeProto.GRAPH)
            graphs.extend(g for a in node.attribute for g in a.graphs)
    return sorted(found)


def refuse_quantized(model: onnx.ModelProto, precision: Precision) -> None:
    """Raise ``QuantizedSourceError`` when ``model`` is already quantized: quantizing its
    float parts again breaks on the integer tensors, and fp16 breaks its quantize ops."""
    ops = quantized_ops(model)
    if ops:
        raise QuantizedSourceError(
            f"the source model is already quantized ({', '.join(ops)}), so it cannot be built at "
            f"{precision.value}: give the float model it was made from, or build it at fp32",
            ops,
        )


class _CalibrationReader:
    """onnxruntime.quantization's data reader: one feed per ``get_next`` call."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]) -> None:
        self._feeds = iter(feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._feeds, None)


def to_fp16(source: Path, target: Path) -> list[str]:
    """Convert to float16 with float32 inputs and outputs; returns notes for the report."""
    from onnxconverter_common import float16

    model = onnx.load(str(source))
    refuse_quantized(model, Precision.FP16)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            converted = float16.convert_float_to_float16(model, keep_io_types=True)
    except Exception as e:
        raise ConversionError(f"fp16 conversion failed: {first_line(e)}") from e
    _retarget_float_casts(converted)
    onnx.save(converted, str(target))
    truncated = sum("truncated" in str(w.message) for w in caught)
    if truncated:
        return [f"{truncated} weight value(s) outside float16's range were clamped"]
    return []


def _retarget_float_casts(model: onnx.ModelProto) -> None:
    """Make inner ``Cast(to=float)`` nodes cast to float16, as the converter typed their outputs.

    onnxconverter-common retypes a Cast's output to float16 but leaves ``to=FLOAT`` (an
    int64 -> float cast feeding an fp16 MatMul, say), which onnxruntime rejects.
    """
    fp16_tensors = {
        vi.name for vi in model.graph.value_info if vi.type.tensor_type.elem_type == TensorProto.FLOAT16
    }
    for node in model.graph.node:
        if node.op_type != "Cast" or node.output[0] not in fp16_tensors:
            continue
        for attr in node.attribute:
            if attr.name == "to" and attr.i == TensorProto.FLOAT:
                attr.i = TensorProto.FLOAT16


def _opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)


def per_channel_source(source: Path, workdir: Path) -> tuple[Path, bool, list[str]]:
    """A graph that can carry per-channel Q/DQ: ``source`` itself at opset 13 or later, else
    upgraded to opset 13 with onnx's version converter. Returns the graph, whether it can
    take per-channel scales (False when the upgrade failed: quantize per tensor) and notes."""
    from onnx import version_converter

    model = onnx.load(str(source))
    opset = _opset(model)
    if opset >= PER_CHANNEL_OPSET:
        return source, True, []
    try:
        upgraded = version_converter.convert_version(model, PER_CHANNEL_OPSET)
        onnx.checker.check_model(upgraded)
    except Exception as e:  # the converter raises its own untyped errors
        logger.info("opset %d -> %d failed: %s", opset, PER_CHANNEL_OPSET, first_line(e))
        return (
            source,
            False,
            [
                f"opset {opset} cannot carry per-channel int8 scales and upgrading it to opset "
                f"{PER_CHANNEL_OPSET} failed ({first_line(e)}): weights quantized per tensor"
            ],
        )
    target = workdir / f"opset{PER_CHANNEL_OPSET}.onnx"
    onnx.save(upgraded, str(target))
    return target, True, [f"upgraded from opset {opset} to {PER_CHANNEL_OPSET} for per-channel int8"]


def to_int8(
    source: Path, target: Path, options: CompileOptions, workdir: Path, tensorrt: bool = False
) -> list[str]:
    """Static int8 QDQ as ``options.int8`` says: symmetric int8 weights (per channel by
    default), activation ranges from the calibration set, chosen nodes left in float.
    TensorRT takes only symmetric activations (zero point 0). A graph older than opset 13
    is upgraded first (per-channel Q/DQ needs it). Returns notes for the report."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if options.calibration is None:
        raise OptionError("int8 needs calibration data: pass --calibration FILE.npz|DIR")
    refuse_quantized(onnx.load(str(source)), Precision.INT8)
    config = options.int8
    notes: list[str] = []
    per_channel = config.per_channel
    if per_channel:
        source, per_channel, notes = per_channel_source(source, workdir)
    preprocessed = workdir / "int8-pre.onnx"
    try:
        quant_pre_process(str(source), str(preprocessed), skip_optimization=True, skip_symbolic_shape=True)
        with captured_output():  # the entropy and percentile calibrators print progress
            quantize_static(
                str(preprocessed),
                str(target),
                _CalibrationReader(list(options.calibration)),
                quant_format=QuantFormat.QDQ,
                per_channel=per_channel,
                activation_type=QuantType.QInt8,
                weight_type=QuantType.QInt8,
                calibrate_method=CalibrationMethod[_METHODS[config.calibration_method]],
                nodes_to_exclude=list(config.float_nodes),
                extra_options={
                    "ActivationSymmetric": config.symmetric_activations or tensorrt,
                    "WeightSymmetric": True,
                    "CalibMovingAverage": False,
                },
            )
    except Exception as e:
        raise ConversionError(f"int8 quantization failed: {first_line(e)}") from e
    return notes


def to_dynamic_int8(source: Path, target: Path, workdir: Path) -> None:
    """int8 weights, activations quantized on the fly by the runtime: no calibration data."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    refuse_quantized(onnx.load(str(source)), Precision.DYNAMIC)
    preprocessed = workdir / "dynamic-pre.onnx"
    try:
        quant_pre_process(str(source), str(preprocessed), skip_optimization=True, skip_symbolic_shape=True)
        quantize_dynamic(str(preprocessed), str(target), per_channel=True, weight_type=QuantType.QInt8)
    except Exception as e:
        raise ConversionError(f"dynamic quantization failed: {first_line(e)}") from e
