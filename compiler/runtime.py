"""Running a model: the one small interface verification uses for every runtime."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

import numpy as np

from edgec.errors import BuildError, ConversionError

__all__ = ["ORT_SESSION_CONFIG", "OnnxRuntimeRunner", "Runner", "RuntimeUnavailableError", "first_line"]

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


class OnnxRuntimeRunner:
    """An onnxruntime CPU session over a model file, opened with ``config`` (the session
    settings its bundle records, so the build verifies what the device runs)."""

    def __init__(self, path: Path, config: Mapping[str, str] = ORT_SESSION_CONFIG) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3
        for key, value in config.items():
            options.add_session_config_entry(key, value)
        try:
            self._session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own untyped errors
            raise ConversionError(f"onnxruntime cannot load {path.name}: {first_line(e)}") from e
        self._output_names = [o.name for o in self._session.get_outputs()]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        values = self._session.run(self._output_names, feeds)
        return dict(zip(self._output_names, values, strict=True))


FIRST_LINE_HEAD = 160  # characters kept from the start of a long error line...
FIRST_LINE_TAIL = 240  # ...and from its end, where onnxruntime puts the reason


def first_line(error: BaseException) -> str:
    """An exception as one line for the user (converters raise multi-line essays).

    A long line keeps its start and its end: onnxruntime's load errors list every input of
    the failing node first and give the reason last (``..., Error Unrecognized attribute``).
    """
    text = str(error).strip() or type(error).__name__
    line = text.splitlines()[0]
    if len(line) <= FIRST_LINE_HEAD + FIRST_LINE_TAIL:
        return line
    return f"{line[:FIRST_LINE_HEAD].rstrip()} … {line[-FIRST_LINE_TAIL:].lstrip()}"
