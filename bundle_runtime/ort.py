"""onnxruntime sessions opened the way a bundle says: the one session factory.

``session_options`` turns a manifest's ``runtime_config`` (onnxruntime session config
entries, such as ``session.x64quantprecision``) and a thread count into ``SessionOptions``;
``OrtSession`` opens a model file with them on the CPU provider. The compiler verifies
artifacts and the agent serves bundles through these, so the build measures the session
the device runs. onnxruntime is imported lazily: a TFLite-only device need not have it.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from bundle_runtime.errors import ArtifactLoadError, RuntimeNotInstalledError, first_line

__all__ = ["OrtSession", "session_options"]

logger = logging.getLogger(__name__)
PROVIDERS = ["CPUExecutionProvider"]


def _ort() -> Any:
    try:
        import onnxruntime
    except ImportError as e:
        raise RuntimeNotInstalledError("onnxruntime is not installed") from e
    return onnxruntime


def session_options(runtime_config: Mapping[str, str], *, threads: int | None = None) -> Any:
    """onnxruntime ``SessionOptions`` with ``runtime_config``'s entries, quiet (errors only).

    ``threads`` fixes the intra-op thread count and runs ops one at a time (a device serving
    requests from several threads); ``None`` leaves onnxruntime's defaults.
    """
    ort = _ort()
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    for key, value in runtime_config.items():
        options.add_session_config_entry(key, value)
    return options


class OrtSession:
    """An onnxruntime CPU session over one model file; ``run`` takes and gives arrays keyed
    by the model's own tensor names. Raises ``ArtifactLoadError`` when it cannot load."""

    def __init__(self, path: Path, runtime_config: Mapping[str, str], *, threads: int | None = None) -> None:
        ort = _ort()
        options = session_options(runtime_config, threads=threads)
        try:
            self._session = ort.InferenceSession(str(path), options, providers=PROVIDERS)
        except Exception as e:  # onnxruntime raises its own untyped errors
            raise ArtifactLoadError(f"onnxruntime cannot load {path.name}: {first_line(e)}") from e
        self.input_names = [i.name for i in self._session.get_inputs()]
        self.output_names = [o.name for o in self._session.get_outputs()]

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        values = self._session.run(self.output_names, dict(feeds))
        return dict(zip(self.output_names, values, strict=True))
