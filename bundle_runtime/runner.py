"""An artifact opened in its runtime that speaks the source model's tensors.

``open_artifact`` opens the artifact of a format with its session (``SESSIONS``: onnxruntime
for ONNX, LiteRT for TFLite), checks that the runtime's tensor names are the ones the
tensor specs name, and returns an ``ArtifactRunner``: ``run`` takes source-layout arrays
keyed by the source's names, converts them with ``TensorPort`` (layout, int8 scaling), runs
the session and converts its outputs back. The compiler verifies artifacts with it and the
agent serves bundles with it: the figures in a bundle come from the code the device runs.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

from bundle_runtime.errors import ArtifactLoadError, UnsupportedFormatError
from bundle_runtime.litert import LiteRtSession
from bundle_runtime.ort import OrtSession
from bundle_runtime.ports import TensorPort
from edgec.manifest import TargetFormat, TensorSpec

__all__ = ["SESSIONS", "ArtifactRunner", "Session", "open_artifact"]

logger = logging.getLogger(__name__)


class Session(Protocol):
    """A runtime session: feeds keyed by the runtime's names in, its outputs out."""

    input_names: list[str]
    output_names: list[str]

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]: ...


SESSIONS: Mapping[TargetFormat, type[OrtSession] | type[LiteRtSession]] = {
    TargetFormat.ONNX: OrtSession,
    TargetFormat.TFLITE: LiteRtSession,
}


def _check_names(path: Path, kind: str, have: Sequence[str], ports: Sequence[TensorPort]) -> None:
    want = [p.key for p in ports]
    if sorted(have) != sorted(want):
        raise ArtifactLoadError(
            f"{path.name}'s {kind} {sorted(have)} do not match the manifest's {sorted(want)}"
        )


class ArtifactRunner:
    """A session and the ports of its inputs and outputs; ``run`` speaks the source's tensors."""

    def __init__(
        self, path: Path, session: Session, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec]
    ) -> None:
        self.inputs = [TensorPort.of(s) for s in inputs]
        self.outputs = [TensorPort.of(s) for s in outputs]
        _check_names(path, "inputs", session.input_names, self.inputs)
        _check_names(path, "outputs", session.output_names, self.outputs)
        self._session = session

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Source-layout arrays keyed by the source's input names -> its outputs, likewise."""
        results = self._session.run({p.key: p.to_artifact(feeds[p.name]) for p in self.inputs})
        return {p.name: p.to_source(results[p.key]) for p in self.outputs}


def open_artifact(
    path: Path,
    fmt: TargetFormat,
    inputs: Sequence[TensorSpec],
    outputs: Sequence[TensorSpec],
    *,
    runtime_config: Mapping[str, str] | None = None,
    threads: int | None = None,
) -> ArtifactRunner:
    """Open the ``fmt`` artifact at ``path`` whose tensors ``inputs``/``outputs`` describe (a
    manifest's, or the compiler's ``Artifact``'s), with the session settings the bundle records.

    Raises ``UnsupportedFormatError`` (no runtime here for ``fmt``), ``RuntimeNotInstalledError``
    or ``ArtifactLoadError`` (the runtime cannot load it, or its tensors differ from the specs).
    """
    if fmt not in SESSIONS:
        runs = ", ".join(f.value for f in SESSIONS)
        raise UnsupportedFormatError(f"{fmt.value} artifacts have no runtime here (runs {runs})")
    session = SESSIONS[fmt](path, runtime_config or {}, threads=threads)
    return ArtifactRunner(path, session, inputs, outputs)
