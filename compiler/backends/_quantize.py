"""int8 graph changes shared by the ONNX-based backends (ONNX Runtime, TensorRT); fp16 is in
``_fp16``."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx

from compiler._capture import captured_output
from compiler.backends import CompileOptions
from compiler.backends._ort_x86 import CHANNEL_BLOCK, narrow_convs, seven_bit_overrides
from compiler.runtime import first_line
from edgec.errors import ConversionError, OptionError, QuantizedSourceError
from edgec.manifest import Precision

__all__ = ["refuse_quantized", "to_dynamic_int8", "to_int8"]

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
    source: Path,
    target: Path,
    options: CompileOptions,
    workdir: Path,
    *,
    tensorrt: bool = False,
    x86: bool = False,
) -> list[str]:
    """Static int8 QDQ as ``options.int8`` says: symmetric int8 weights (per channel by
    default), activation ranges from the calibration set, chosen nodes left in float.
    TensorRT takes only symmetric int8 activations (zero point 0). For onnxruntime on an
    ``x86`` CPU, activations are uint8 and GEMM weights 7-bit unless the configuration asks
    for 8 (see ``_ort_x86``). A graph older than opset 13 is upgraded first (per-channel Q/DQ
    needs it). Returns notes for the report."""
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
    wide = config.int16_activations and not tensorrt  # A16W8: Q/DQ in the com.microsoft domain
    for_x86 = x86 and not tensorrt and not wide
    float_nodes, narrow = list(config.float_nodes), []
    try:
        quant_pre_process(str(source), str(preprocessed), skip_optimization=True, skip_symbolic_shape=True)
        overrides: dict[str, list[dict[str, object]]] = {}
        if for_x86:
            model = onnx.load(str(preprocessed), load_external_data=False)
            narrow = [n for n in narrow_convs(model) if n not in float_nodes]
            float_nodes += narrow
            if config.x86_fast_weights:
                overrides = seven_bit_overrides(model, per_channel, tuple(float_nodes))
        with captured_output():  # the entropy and percentile calibrators print progress
            quantize_static(
                str(preprocessed),
                str(target),
                _CalibrationReader(list(options.calibration)),
                quant_format=QuantFormat.QDQ,
                per_channel=per_channel,
                activation_type=QuantType.QInt16
                if wide
                else QuantType.QUInt8
                if for_x86
                else QuantType.QInt8,
                weight_type=QuantType.QInt8,
                calibrate_method=CalibrationMethod[_METHODS[config.calibration_method]],
                nodes_to_exclude=float_nodes,
                extra_options={
                    "ActivationSymmetric": config.symmetric_activations or tensorrt,
                    "WeightSymmetric": True,
                    "CalibMovingAverage": False,
                    "TensorQuantOverrides": overrides,
                    "UseQDQContribOps": wide,
                },
            )
    except Exception as e:
        raise ConversionError(f"int8 quantization failed: {first_line(e)}") from e
    if wide:
        notes.append(
            "int16 activations, int8 weights: onnxruntime has no int16 kernels and computes between "
            "the Q/DQ pairs in float (int8's size, not its speed)"
        )
    if for_x86:
        weights = f"{len(overrides)} GEMM weight tensor(s) in 7 bits" if overrides else "8-bit weights"
        notes.append(f"x86: uint8 activations, {weights}")
    if narrow:
        notes.append(
            f"x86: kept in float, fewer than {CHANNEL_BLOCK} input channels (faster than int8 there): "
            + ", ".join(narrow)
        )
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
