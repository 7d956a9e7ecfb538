"""Per-layer quantization error of a Q/DQ ONNX artifact, as onnxruntime's qdq_loss_debug does.

Both the float graph and the quantized one are run with every intermediate tensor exposed;
each quantized tensor's signal-to-quantization-noise ratio (SQNR, dB; lower is worse) is
measured where it is quantized (``qdq_db``: the rounding at that Q/DQ pair alone) and against
the float model (``model_db``: all the error accumulated up to that point).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
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


@dataclass(frozen=True)
class LayerError:
    tensor: str
    producer: str  # node that computes the tensor in the float graph ("" for graph inputs)
    op: str
    qdq_db: float
    model_db: float | None

    def as_dict(self) -> dict[str, object]:
        return {
            "tensor": self.tensor,
            "producer": self.producer,
            "op": self.op,
            "qdq_sqnr_db": round(self.qdq_db, 2),
            "model_sqnr_db": None if self.model_db is None else round(self.model_db, 2),
        }


class _Reader:
    def __init__(self, samples: SampleSet) -> None:
        self._feeds = iter(list(samples.head(SAMPLES)))

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._feeds, None)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self._feeds


def layer_errors(float_model: Path, qdq_model: Path, samples: SampleSet, workdir: Path) -> list[LayerError]:
    """Every quantized activation's error, worst (lowest SQNR) first."""
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
    found = []
    for tensor, match in matched.items():
        if not match.get("pre_qdq") or not match.get("post_qdq"):
            continue
        shape = shapes.get(tensor)
        qdq_db = channel_sqnr(match["pre_qdq"], match["post_qdq"], shape)
        if qdq_db is None:  # not a float tensor, or nothing comparable in it
            continue
        floats = match.get("float")
        node = producers.get(tensor)
        found.append(
            LayerError(
                tensor=tensor,
                producer=node.name if node is not None else "",
                op=node.op_type if node is not None else "input",
                qdq_db=qdq_db,
                model_db=channel_sqnr(floats, match["post_qdq"], shape) if floats else None,
            )
        )
    return sorted(found, key=lambda e: e.qdq_db)


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
