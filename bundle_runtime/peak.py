"""An artifact's peak memory in its runtime, measured in a child process.

``measure_peak`` starts ``python -m bundle_runtime.peak`` with the artifact's path, format and
tensor specs on its standard input. The child imports the runtime through this package (the
``open_artifact`` the device serves with), reads its resident set (the baseline), resets the
resident set's high-water mark (Linux: ``5`` written to ``/proc/self/clear_refs`` resets
``VmHWM``), opens the artifact and runs inference on zeros at the artifact's batch, then reads
the high-water mark again: the peak is the mark less the baseline. Where ``/proc`` is missing
(macOS), ``ru_maxrss`` before and after stands in for it; the record says which was used.

The child is bounded by a timeout; a format with no runtime here (CoreML, TensorRT) is not
measured, and ``MemoryNotMeasuredError`` says why: no figure is ever made up.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import resource
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from bundle_runtime.errors import first_line
from bundle_runtime.runner import SESSIONS
from edgec.errors import EdgecError
from edgec.manifest import MemoryPeak, TargetFormat, TensorSpec

__all__ = ["DEFAULT_TIMEOUT_S", "MemoryNotMeasuredError", "measure_peak"]

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 120.0
RUNS = 2  # the first run allocates the runtime's buffers, the second reuses them
MAX_REPLY_BYTES = 64 << 10
_RUNTIME_MODULES = {TargetFormat.ONNX: "onnxruntime", TargetFormat.TFLITE: "ai_edge_litert.interpreter"}
_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


class MemoryNotMeasuredError(EdgecError):
    """The artifact's peak memory could not be measured here; ``str()`` says why, in one line."""


def batch_of(inputs: Sequence[TensorSpec]) -> int:
    """The batch the artifact runs at: its first input's leading dimension, 1 where dynamic."""
    if not inputs:
        return 1
    shape = inputs[0].source_shape if inputs[0].source_shape is not None else inputs[0].shape
    return shape[0] if shape and shape[0] > 0 else 1


def measure_peak(
    path: Path,
    fmt: TargetFormat,
    inputs: Sequence[TensorSpec],
    outputs: Sequence[TensorSpec],
    runtime_config: Mapping[str, str],
    *,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> MemoryPeak:
    """Peak memory of loading ``path`` and running it at its batch, over the runtime's baseline.
    Raises ``MemoryNotMeasuredError`` (one line) where it cannot be measured here."""
    if fmt not in SESSIONS:
        raise MemoryNotMeasuredError(f"not measured here: {fmt.value} artifacts have no runtime on this host")
    request = {
        "path": str(path),
        "format": fmt.value,
        "inputs": [s.model_dump(mode="json") for s in inputs],
        "outputs": [s.model_dump(mode="json") for s in outputs],
        "runtime_config": dict(runtime_config),
        "batch": batch_of(inputs),
    }
    try:
        done = subprocess.run(
            [sys.executable, "-m", "bundle_runtime.peak"],
            input=json.dumps(request).encode(),
            capture_output=True,
            timeout=timeout_s,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise MemoryNotMeasuredError(
            f"not measured: loading and running {path.name} took over {timeout_s:.0f} s"
        ) from None
    except OSError as e:
        raise MemoryNotMeasuredError(f"not measured: cannot start {sys.executable}: {e.strerror}") from e
    lines = done.stdout[-MAX_REPLY_BYTES:].decode("utf-8", "replace").strip().splitlines()
    try:
        reply = json.loads(lines[-1]) if lines else {}
    except ValueError:
        reply = {}
    if done.returncode != 0 or "error" in reply or "peak_bytes" not in reply:
        stderr = done.stderr[-MAX_REPLY_BYTES:].decode("utf-8", "replace").strip().splitlines()
        why = reply.get("error") or (stderr[-1] if stderr else f"exit status {done.returncode}")
        raise MemoryNotMeasuredError(f"not measured: {why}")
    return MemoryPeak.model_validate(reply)


# -- the child ---------------------------------------------------------------------------------
def _status_bytes(field: str) -> int | None:
    """``VmRSS``/``VmHWM`` of this process from ``/proc/self/status``, in bytes."""
    try:
        text = _STATUS.read_text(encoding="ascii")
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    return None


def _maxrss_bytes() -> int:
    usage = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return usage if sys.platform == "darwin" else usage * 1024  # macOS says bytes, Linux KiB


def _reset_high_water_mark() -> bool:
    try:
        with _CLEAR_REFS.open("w", encoding="ascii") as f:
            f.write("5")
    except OSError:
        return False
    return True


def _zeros(spec: TensorSpec, batch: int) -> Any:
    import numpy as np

    shape = list(spec.source_shape if spec.source_shape is not None else spec.shape)
    shape = [batch if i == 0 and d < 1 else max(d, 1) for i, d in enumerate(shape)]
    quantized = spec.scale is not None and spec.zero_point is not None
    return np.zeros(shape, np.float32 if quantized else np.dtype(spec.dtype))  # a port quantizes floats


def _measure(request: dict[str, Any]) -> dict[str, Any]:
    from bundle_runtime.runner import open_artifact

    fmt = TargetFormat(request["format"])
    importlib.import_module(_RUNTIME_MODULES[fmt])  # the runtime's own code is the baseline
    inputs = [TensorSpec.model_validate(s) for s in request["inputs"]]
    outputs = [TensorSpec.model_validate(s) for s in request["outputs"]]
    feeds = {s.name: _zeros(s, request["batch"]) for s in inputs}
    baseline = _status_bytes("VmRSS")
    if baseline is not None and _reset_high_water_mark():
        method = "VmHWM"
    else:  # no /proc (macOS) or no reset: the process's maximum resident set, before and after
        baseline, method = _maxrss_bytes(), "ru_maxrss"
    runner = open_artifact(
        Path(request["path"]), fmt, inputs, outputs, runtime_config=request["runtime_config"]
    )
    for _ in range(RUNS):
        runner.run(feeds)
    high = _status_bytes("VmHWM") if method == "VmHWM" else _maxrss_bytes()
    assert high is not None
    return {
        "peak_bytes": max(high - baseline, 0),
        "baseline_bytes": baseline,
        "method": method,
        "batch": request["batch"],
    }


def main() -> int:
    try:
        reply = _measure(json.loads(sys.stdin.read()))
    except Exception as e:  # the parent reports it as "not measured", never as a figure
        reply = {"error": f"{type(e).__name__}: {first_line(e)}"}
    sys.stdout.write(json.dumps(reply) + "\n")
    return 0 if "error" not in reply else 1


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    sys.exit(main())
