"""Per-layer quantization error of a Q/DQ ONNX artifact, as onnxruntime's qdq_loss_debug does.

Both the float graph and the quantized one are run with every intermediate tensor exposed;
each quantized tensor's signal-to-quantization-noise ratio (SQNR, dB; lower is worse) is
measured where it is quantized (``qdq_db``: the rounding at that Q/DQ pair alone) and against
the float model (``model_db``: all the error accumulated up to that point). ``drop_db`` is how
much of the model's SQNR is lost on the way to the tensor from the nearest measured tensors
before it (``inputs``): where a node amplifies its input's rounding (a folded BatchNorm
channel with weights of 127 and a bias of 1974 whose ReLU6 output stays in [0, 6] turned a
37 dB input into 3 dB), the rounding there looks harmless and the drop does not.
The mixed-precision search ranks by the drop and keeps the tensor and its inputs in float.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from compiler._capture import captured_output
from compiler.tensors import SampleSet

__all__ = ["LayerError", "layer_errors", "nodes_touching"]

logger = logging.getLogger(__name__)
SAMPLES = 16
SQNR_CEILING_DB = 60.0  # past int8's ~48 dB a channel is as good as exact: cap, so one perfect
# channel cannot outweigh the crushed ones in the mean
INT8_SQNR_DB = 48.0  # what rounding a well-spread tensor to 8 bits gives (6 dB per bit)


@dataclass(frozen=True)
class LayerError:
    tensor: str
    producer: str  # node that computes the tensor in the float graph ("" for graph inputs)
    op: str
    qdq_db: float
    model_db: float | None
    drop_db: float | None = None  # model SQNR (whole tensor) lost between ``inputs`` and this tensor
    inputs: tuple[str, ...] = ()  # the nearest measured tensors it is computed from

    @property
    def harm_db(self) -> float:
        """How much this tensor hurts, in dB (higher is worse): the SQNR the model loses on the
        way to it (for a graph input, below what int8 rounding gives); where that was not
        measured, its own rounding's SQNR below int8's."""
        return self.drop_db if self.drop_db is not None else max(0.0, INT8_SQNR_DB - self.qdq_db)

    def as_dict(self) -> dict[str, object]:
        return {
            "tensor": self.tensor,
            "producer": self.producer,
            "op": self.op,
            "qdq_sqnr_db": round(self.qdq_db, 2),
            "model_sqnr_db": None if self.model_db is None else round(self.model_db, 2),
            "drop_db": None if self.drop_db is None else round(self.drop_db, 2),
        }


class _Reader:
    def __init__(self, samples: SampleSet) -> None:
        self._feeds = iter(list(samples.head(SAMPLES)))

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._feeds, None)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self._feeds


def layer_errors(float_model: Path, qdq_model: Path, samples: SampleSet, workdir: Path) -> list[LayerError]:
    """Every quantized activation's error, the most harmful first (``LayerError.harm_db``)."""
    from onnxruntime.quantization.qdq_loss_debug import (
        collect_activations,
        create_activation_matching,
        modify_model_output_intermediate_tensors,
    )

    float_aug, qdq_aug = workdir / "float-aug.onnx", workdir / "qdq-aug.onnx"
    with captured_output():
        modify_model_output_intermediate_tensors(str(float_model), str(float_aug))
        modify_model_output_intermediate_tensors(str(qdq_model), str(qdq_aug))
        float_acts = collect_activations(str(float_aug), _Reader(samples))
        qdq_acts = collect_activations(str(qdq_aug), _Reader(samples))
    matched = create_activation_matching(qdq_acts, float_acts)
    model = onnx.load(str(float_model))
    shapes = _shapes(model)
    producers = {out: node for node in model.graph.node for out in node.output}
    constants = {init.name: onnx.numpy_helper.to_array(init) for init in model.graph.initializer}
    # tensor -> (qdq_db, model_db per channel, model SQNR over the whole tensor)
    measured: dict[str, tuple[float, float | None, float | None]] = {}
    for tensor, match in matched.items():
        if not match.get("pre_qdq") or not match.get("post_qdq"):
            continue
        shape = shapes.get(tensor)
        pre = _activated(match["pre_qdq"], producers.get(tensor), constants)
        qdq_db = channel_sqnr(pre, match["post_qdq"], shape)
        if qdq_db is None:  # not a float tensor, or nothing comparable in it
            continue
        floats = match.get("float")
        model_db = channel_sqnr(floats, match["post_qdq"], shape) if floats else None
        whole = tensor_sqnr(floats, match["post_qdq"]) if floats else None
        measured[tensor] = (qdq_db, model_db, whole)
    weights = {init.name for init in model.graph.initializer}
    found = []
    for tensor, (qdq_db, model_db, whole) in measured.items():
        node = producers.get(tensor)
        inputs = _measured_inputs(tensor, producers, weights, measured)
        before = [w for i in inputs if (w := measured[i][2]) is not None]
        start = min(before) if before else INT8_SQNR_DB  # a graph input: what int8 rounding gives
        drop = None if whole is None else max(0.0, start - whole)
        found.append(
            LayerError(
                tensor=tensor,
                producer=node.name if node is not None else "",
                op=node.op_type if node is not None else "input",
                qdq_db=qdq_db,
                model_db=model_db,
                drop_db=drop,
                inputs=inputs,
            )
        )
    return sorted(found, key=lambda e: (-e.harm_db, e.qdq_db))


def _activated(
    values: Sequence[object], node: onnx.NodeProto | None, constants: dict[str, np.ndarray]
) -> Sequence[object]:
    """``values`` through ``node`` when it is a ReLU or a Clip the quantizer fused into the
    Q/DQ pair: the Q/DQ then sees the values before the activation, and its clipping to the
    activation's range is the activation's work, not rounding error."""
    if node is None or node.op_type not in ("Relu", "Clip"):
        return values
    low, high = (0.0, None) if node.op_type == "Relu" else _clip_bounds(node, constants)
    if low is None and high is None:
        return values
    return [np.clip(v, low, high) if isinstance(v, np.ndarray) and v.dtype.kind == "f" else v for v in values]


def _clip_bounds(node: onnx.NodeProto, constants: dict[str, np.ndarray]) -> tuple[float | None, float | None]:
    bounds: list[float | None] = [None, None]
    for index, name in enumerate(node.input[1:3]):
        if name in constants and constants[name].size == 1:
            bounds[index] = float(constants[name].reshape(()))
    for attribute in node.attribute:  # opset < 11 keeps them as attributes
        if attribute.name in ("min", "max"):
            bounds[0 if attribute.name == "min" else 1] = float(attribute.f)
    return bounds[0], bounds[1]


def _measured_inputs(
    tensor: str,
    producers: dict[str, onnx.NodeProto],
    weights: set[str],
    measured: Mapping[str, object],
) -> tuple[str, ...]:
    """The nearest measured tensors ``tensor`` is computed from, walking back through tensors
    that were not measured (an activation the quantizer fused away)."""
    found: dict[str, None] = {}
    node = producers.get(tensor)
    pending = [i for i in node.input if i and i not in weights] if node is not None else []
    seen: set[str] = set()
    while pending:
        name = pending.pop()
        if name in seen:
            continue
        seen.add(name)
        if name in measured:
            found[name] = None
        elif (producer := producers.get(name)) is not None:
            pending.extend(i for i in producer.input if i and i not in weights)
    return tuple(found)


def _shapes(model: onnx.ModelProto) -> dict[str, list[int | None]]:
    """Each tensor's declared shape, None for a dimension that is not a fixed size."""
    values = [*model.graph.input, *model.graph.value_info, *model.graph.output]
    return {
        v.name: [d.dim_value if d.dim_value > 0 else None for d in v.type.tensor_type.shape.dim]
        for v in values
        if v.type.HasField("tensor_type") and v.type.tensor_type.HasField("shape")
    }


def _as_declared(value: np.ndarray, shape: list[int | None] | None) -> np.ndarray:
    """``value`` (onnxruntime's debug outputs are flattened) in its declared shape, when the
    declaration fits it (at most one dimension not fixed); else as it came."""
    if shape is None or sum(d is None for d in shape) > 1:
        return value
    try:
        return value.reshape([-1 if d is None else d for d in shape])
    except ValueError:  # a stale declaration (a scalar that holds 4800 values): not trusted
        return value


def _channels(value: np.ndarray) -> np.ndarray:
    """One row per channel (axis 1 of a [batch, channels, ...] tensor); a scalar or a vector
    is one channel."""
    if value.ndim >= 2:
        return np.moveaxis(value, 1, 0).reshape(value.shape[1], -1)
    return value.reshape(1, -1)


def channel_sqnr(
    reference: Sequence[object], test: Sequence[object], shape: list[int | None] | None = None
) -> float | None:
    """Mean over channels (axis 1) of each channel's SQNR in dB, each capped at 60 dB; None
    when the tensor is not a float tensor (integer indices, shapes, sequences) or no sample
    of it can be compared.

    A tensor-wide SQNR hides the damage an outlier channel does: its energy dominates both
    the signal and the noise, while every other channel rounds to zero. Per channel, the
    crushed channels show up. Channels that are zero in the reference are skipped. Each
    sample is taken with its own shape (a sequence length may change from one to the next);
    a sample whose two versions differ in shape, or hold non-finite values, is left out.
    ``shape`` is the tensor's declared shape, used where it fits the values.
    """
    signal: dict[int, float] = {}
    noise: dict[int, float] = {}
    for ref_value, test_value in zip(reference, test, strict=False):
        if not isinstance(ref_value, np.ndarray | np.generic) or not isinstance(
            test_value, np.ndarray | np.generic
        ):
            return None  # a sequence or a map: no channels to measure
        if ref_value.dtype.kind != "f" or test_value.dtype.kind != "f":
            return None
        if np.shape(ref_value) != np.shape(test_value):
            continue
        ref = _channels(_as_declared(np.asarray(ref_value, np.float64), shape))
        out = _channels(_as_declared(np.asarray(test_value, np.float64), shape))
        if not (np.isfinite(ref).all() and np.isfinite(out).all()):
            continue
        for channel, (r, t) in enumerate(zip(ref, out, strict=True)):
            signal[channel] = signal.get(channel, 0.0) + float(np.sum(r * r))
            noise[channel] = noise.get(channel, 0.0) + float(np.sum((r - t) ** 2))
    if not signal:
        return None
    live = [c for c, energy in signal.items() if energy > 0]
    if not live:
        return float("inf")
    eps = np.finfo(np.float64).eps
    per_channel = [min(10 * np.log10(signal[c] / max(noise[c], eps * eps)), SQNR_CEILING_DB) for c in live]
    return float(np.mean(per_channel))


def tensor_sqnr(reference: Sequence[object], test: Sequence[object]) -> float | None:
    """SQNR in dB over every value of every sample (samples of differing shapes or with
    non-finite values left out); None for non-float tensors or nothing to compare."""
    signal = noise = 0.0
    for ref_value, test_value in zip(reference, test, strict=False):
        if not isinstance(ref_value, np.ndarray) or not isinstance(test_value, np.ndarray):
            return None
        if ref_value.dtype.kind != "f" or test_value.dtype.kind != "f":
            return None
        if ref_value.shape != test_value.shape:
            continue
        ref, out = ref_value.astype(np.float64), test_value.astype(np.float64)
        if not (np.isfinite(ref).all() and np.isfinite(out).all()):
            continue
        signal += float(np.sum(ref * ref))
        noise += float(np.sum((ref - out) ** 2))
    if signal == 0.0:
        return None
    eps = np.finfo(np.float64).eps
    return min(float(10 * np.log10(signal / max(noise, eps * eps))), SQNR_CEILING_DB)


# Ops whose output carries its input's range (an outlier passes straight through them).
_PASS_THROUGH = frozenset(
    "Relu Clip MaxPool Reshape Flatten Transpose Squeeze Unsqueeze Identity Concat Split Slice "
    "Pad Resize DepthToSpace SpaceToDepth".split()
)


def nodes_touching(model: onnx.ModelProto, tensors: list[str]) -> tuple[str, ...]:
    """The nodes to keep in float so these tensors stay unquantized: each tensor's producer
    and consumers, and across range-preserving ops (ReLU, pooling, reshapes), forwards and
    backwards, the tensors that carry the same values, since they would be quantized there."""
    producers = {out: node for node in model.graph.node for out in node.output}
    weights = {init.name for init in model.graph.initializer}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    chosen: dict[str, None] = {}
    pending, seen = list(tensors), set()
    while pending:
        tensor = pending.pop()
        if tensor in seen:
            continue
        seen.add(tensor)
        producer = producers.get(tensor)
        if producer is not None:
            chosen[producer.name] = None
            if producer.op_type in _PASS_THROUGH:  # its input holds the same values
                pending.extend(n for n in producer.input if n not in weights)
        for node in consumers.get(tensor, []):
            chosen[node.name] = None
            if node.op_type in _PASS_THROUGH:
                pending.extend(node.output)
    return tuple(chosen)
