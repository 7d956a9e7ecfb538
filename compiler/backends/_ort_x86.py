"""What onnxruntime's x86 int8 kernels need from a Q/DQ graph to be fast and exact.

onnxruntime runs a quantized convolution, MatMul or Gemm on x86 as a u8s8 GEMM: uint8
activations times int8 weights. Three things decide its speed and its exactness:

- **uint8 activations.** The CPU provider converts int8 activations to uint8 when it loads
  a graph, but not where one Q/DQ pair feeds several nodes (a residual branch): those nodes
  then stay as DequantizeLinear -> float op -> QuantizeLinear. Quantizing activations to
  uint8 in the first place lets every node fuse (QLinearConv, QLinearAdd, ...).
- **7-bit weights.** Without VNNI, the u8s8 kernels multiply pairs with ``vpmaddubsw``, whose
  16-bit sums saturate once a pair of products passes 32,767 (255 x 127 x 2 does). With every
  GEMM weight in [-64, 64] no pair can (255 x 64 x 2 = 32,640), on any x86 CPU. Otherwise the
  session needs ``session.x64quantprecision=1``, which moves every weight outside that range
  to exact u8u8 kernels, slower everywhere, VNNI CPUs included. Depthwise convolutions keep
  8-bit weights: their kernels accumulate each product in 32 bits and cannot saturate.
- **Narrow convolutions stay in float.** The fast int8 convolution takes input channels in
  multiples of 4; an image stem (1 or 3 channels) falls back to im2col and a GEMM over 9 or 27
  values, slower than the float convolution (MobileNetV2's stem: 0.39 ms int8, 0.27 ms float).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import onnx
from onnx import numpy_helper

__all__ = ["SAFE_WEIGHT_MAX", "gemm_weights", "narrow_convs", "saturation_free", "seven_bit_overrides"]

logger = logging.getLogger(__name__)
SAFE_WEIGHT_MAX = 64  # |int8 weight| <= 64: no u8s8 pair sum passes int16 (onnxruntime's own test)
_GEMM_OPS = frozenset({"Conv", "MatMul", "Gemm"})
CHANNEL_BLOCK = 4  # the fast int8 convolution reads input channels 4 at a time


def _attr(node: onnx.NodeProto, name: str, default: int) -> int:
    return next((a.i for a in node.attribute if a.name == name), default)


def _depthwise(node: onnx.NodeProto, weight_dims: list[int]) -> bool:
    """One input channel per group: a per-channel kernel that accumulates in 32 bits."""
    return _attr(node, "group", 1) > 1 and len(weight_dims) > 1 and weight_dims[1] == 1


def gemm_weights(model: onnx.ModelProto) -> Iterator[tuple[onnx.NodeProto, str, int]]:
    """The constant weights onnxruntime runs as u8s8 GEMMs on x86: ``(node, tensor, channel
    axis)`` for each non-depthwise Conv's weight and each MatMul's or Gemm's constant B.
    The float graph's initializers or, in a Q/DQ graph, the int8 tensors their
    DequantizeLinear nodes read."""
    dims = {t.name: list(t.dims) for t in model.graph.initializer}
    dequantized = {n.output[0]: n.input[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    for node in model.graph.node:
        if node.op_type not in _GEMM_OPS or len(node.input) < 2:
            continue
        weight = dequantized.get(node.input[1], node.input[1])
        if weight not in dims:
            continue  # computed at run time: an activation, quantized to uint8
        if node.op_type == "Conv" and _depthwise(node, dims[weight]):
            continue
        axis = 0 if node.op_type == "Conv" or _attr(node, "transB", 0) else 1
        yield node, weight, axis


def narrow_convs(model: onnx.ModelProto) -> list[str]:
    """The convolutions of the float ``model`` (depthwise ones aside) with fewer input channels
    per group than the fast int8 kernel reads at once: faster left in float."""
    return [
        node.name
        for node, weight, _ in gemm_weights(model)
        if node.op_type == "Conv" and _weight_dims(model, weight)[1] < CHANNEL_BLOCK
    ]


def _weight_dims(model: onnx.ModelProto, name: str) -> list[int]:
    return next(list(t.dims) for t in model.graph.initializer if t.name == name)


def seven_bit_overrides(
    model: onnx.ModelProto, per_channel: bool, float_nodes: tuple[str, ...]
) -> dict[str, list[dict[str, object]]]:
    """onnxruntime.quantization ``TensorQuantOverrides`` that quantize the GEMM weights of the
    float ``model`` to 7 bits ([-64, 64]); every other tensor keeps 8 bits."""
    found: dict[str, list[dict[str, object]]] = {}
    for node, weight, axis in gemm_weights(model):
        if node.name not in float_nodes:
            found[weight] = [{"reduce_range": True, "axis": axis} if per_channel else {"reduce_range": True}]
    return found


def saturation_free(model: onnx.ModelProto) -> bool:
    """Whether every int8 GEMM weight of the Q/DQ ``model`` lies in [-64, 64], so onnxruntime's
    u8s8 kernels are exact on every x86 CPU without ``session.x64quantprecision``."""
    tensors = {t.name: t for t in model.graph.initializer}
    for node, weight, _ in gemm_weights(model):
        tensor = tensors[weight]
        if tensor.data_type != onnx.TensorProto.INT8:
            continue  # a float weight (a node kept in float) or a uint8 one: no u8s8 kernel
        values = numpy_helper.to_array(tensor)
        if values.size and int(abs(values.astype("int16")).max()) > SAFE_WEIGHT_MAX:
            logger.info("%s: int8 weights outside [-64, 64], u8s8 kernels could saturate", node.name)
            return False
    return True
