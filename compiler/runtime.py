"""Running a model: the one small interface verification uses for every runtime.

Sessions come from ``bundle_runtime``, the code the agent serves bundles with: an artifact
is verified in the session the device opens (``bundle_runtime.open_artifact``); this module
adds the compiler's error types and the session settings int8 ONNX artifacts record.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

import numpy as np

from bundle_runtime import ArtifactLoadError, ArtifactRunner, OrtSession, first_line, open_artifact
from edgec.errors import BuildError, ConversionError
from edgec.manifest import TargetFormat, TensorSpec

__all__ = [
    "ORT_SESSION_CONFIG",
    "OnnxRuntimeRunner",
    "Runner",
    "RuntimeUnavailableError",
    "first_line",
    "open_for_verification",
]

logger = logging.getLogger(__name__)


class RuntimeUnavailableError(BuildError):
    """The artifact's runtime cannot run on this machine (CoreML off macOS, TensorRT with no
    GPU); ``str()`` says why. The bundle is then reported as unverified, never as passed (the
    search catches it where the runtime is opened; it is a ``BuildError`` only by fault)."""


class Runner(Protocol):
    """Runs one sample: a feed of named arrays in, named arrays out."""

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...


# Session settings an int8 model with 8-bit GEMM weights needs for faithful results on x86;
# recorded in the manifest so the agent opens its session the same way. Without VNNI,
# onnxruntime's fast u8s8 kernels saturate 16-bit intermediates and can wreck such a model's
# output; this moves every weight outside [-64, 64] to exact but slower u8u8 kernels, on
# every x86 CPU, VNNI included (no effect on ARM). Models whose GEMM weights are 7-bit do not
# need it (compiler/backends/_ort_x86.py).
ORT_SESSION_CONFIG: Mapping[str, str] = {"session.x64quantprecision": "1"}


class OnnxRuntimeRunner(OrtSession):
    """An onnxruntime CPU session over a model file (a source, a prepared graph, a stand-in),
    opened with ``config`` through ``bundle_runtime``'s session factory."""

    def __init__(self, path: Path, config: Mapping[str, str] = ORT_SESSION_CONFIG) -> None:
        try:
            super().__init__(path, config)
        except ArtifactLoadError as e:
            raise ConversionError(str(e)) from e


def open_for_verification(
    path: Path,
    fmt: TargetFormat,
    inputs: list[TensorSpec],
    outputs: list[TensorSpec],
    runtime_config: Mapping[str, str],
    *,
    threads: int | None = None,
) -> ArtifactRunner:
    """The artifact as the agent opens it (``bundle_runtime.open_artifact``), taking and giving
    the source's tensors; a runtime that cannot load it fails the target (``ConversionError``)."""
    try:
        return open_artifact(path, fmt, inputs, outputs, runtime_config=runtime_config, threads=threads)
    except ArtifactLoadError as e:
        raise ConversionError(str(e)) from e
