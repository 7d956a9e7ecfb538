"""The LiteRT (TFLite) interpreter behind the same small session interface as onnxruntime.

``LiteRtSession`` opens a ``.tflite`` file with its signature runner, runs one invoke on
zeros while stderr is quiet (the first invoke creates the XNNPACK delegate and announces
it), and then runs one invoke at a time: the interpreter is not thread-safe.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from bundle_runtime._quiet import quiet_stderr
from bundle_runtime.errors import ArtifactLoadError, RuntimeNotInstalledError, first_line

__all__ = ["LiteRtSession"]

logger = logging.getLogger(__name__)


class LiteRtSession:
    """LiteRT's signature runner over one model file; ``run`` takes and gives arrays keyed by
    the signature's names. ``runtime_config`` is accepted for the common interface (TFLite
    bundles record none). Raises ``ArtifactLoadError`` when it cannot load or run."""

    def __init__(self, path: Path, runtime_config: Mapping[str, str], *, threads: int | None = None) -> None:
        try:
            from ai_edge_litert.interpreter import Interpreter
        except ImportError as e:
            raise RuntimeNotInstalledError("ai-edge-litert is not installed") from e
        if runtime_config:
            logger.warning("LiteRT takes no session settings; ignoring %s", sorted(runtime_config))
        try:
            with quiet_stderr():
                self._interpreter = Interpreter(model_path=str(path), num_threads=threads or 1)
                self._runner = self._interpreter.get_signature_runner()
        except Exception as e:  # LiteRT raises ValueError/RuntimeError with its own text
            raise ArtifactLoadError(f"LiteRT cannot load {path.name}: {first_line(e)}") from e
        details: dict[str, Any] = self._runner.get_input_details()
        self.input_names = list(details)
        self.output_names = list(self._runner.get_output_details())
        self._lock = threading.Lock()
        zeros = {
            key: np.zeros([max(int(d), 1) for d in t["shape"]], t["dtype"]) for key, t in details.items()
        }
        try:
            with quiet_stderr():
                self._runner(**zeros)
        except Exception as e:
            raise ArtifactLoadError(f"LiteRT cannot run {path.name}: {first_line(e)}") from e

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        with self._lock:
            results: dict[str, np.ndarray] = self._runner(**feeds)
            return results
