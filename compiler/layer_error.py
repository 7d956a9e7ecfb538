"""Per-layer quantization error of a Q/DQ ONNX artifact, as onnxruntime's qdq_loss_debug does.

Both the float graph and the quantized one are run with every intermediate tensor exposed;
each quantized tensor's signal-to-quantization-noise ratio (SQNR, dB; lower is worse) is
measured where it is quantized (``qdq_db``: the rounding at that Q/DQ pair alone) and against
the float model (``model_db``: all the error accumulated up to that point).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
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
        if not match.get("pre_qdq") or not match.get("post_qdq") or tensor not in shapes:
            continue
        node = producers.get(tensor)
        shape = shapes[tensor]
        floats = match.get("float")
        found.append(
            LayerError(
                tensor=tensor,
                producer=node.name if node is not None else "",
                op=node.op_type if node is not None else "input",
                qdq_db=channel_sqnr(match["pre_qdq"], match["post_qdq"], shape),
                model_db=channel_sqnr(floats, match["post_qdq"], shape) if floats else None,
            )
        )
    return sorted(found, key=lambda e: e.qdq_db)


def _shapes(model: onnx.ModelProto) -> dict[str, list[int]]:
    values = [*model.graph.input, *model.graph.value_info, *model.graph.output]
    return {
        v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
        for v in values
        if all(d.HasField("dim_value") for d in v.type.tensor_type.shape.dim)
    }


def channel_sqnr(reference: list[np.ndarray], test: list[np.ndarray], shape: list[int]) -> float:
    """Mean over channels (axis 1) of each channel's SQNR in dB, each capped at 60 dB.

    A tensor-wide SQNR hides the damage an outlier channel does: its energy dominates both
    the signal and the noise, while every other channel rounds to zero. Per channel, the
    crushed channels show up. Channels that are zero in the reference are skipped.
    """
    ref = np.stack([np.asarray(r, np.float64).reshape(shape) for r in reference])
    out = np.stack([np.asarray(t, np.float64).reshape(shape) for t in test])
    if len(shape) >= 2:  # [samples, batch, channels, ...] -> [channels, everything else]
        ref = np.moveaxis(ref, 2, 0).reshape(ref.shape[2], -1)
        out = np.moveaxis(out, 2, 0).reshape(out.shape[2], -1)
    else:  # a scalar or a vector: one channel
        ref, out = ref.reshape(1, -1), out.reshape(1, -1)
    signal = np.linalg.norm(ref, axis=1)
    noise = np.maximum(np.linalg.norm(ref - out, axis=1), np.finfo(np.float64).eps)
    live = signal > 0
    if not live.any():
        return float("inf")
    per_channel = np.minimum(20 * np.log10(signal[live] / noise[live]), SQNR_CEILING_DB)
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
