"""Loading the source model a user trained. Only ONNX is read directly for now."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from compiler.runtime import OnnxRuntimeRunner, Runner
from edgec.errors import ConversionError, ModelLoadError
from edgec.manifest import SourceRef, sha256_file

__all__ = ["SourceModel", "load_source"]

logger = logging.getLogger(__name__)

_SUFFIX_FORMATS = {".onnx": "onnx"}


@dataclass(frozen=True)
class SourceModel:
    """The user's model: the reference every artifact is verified against."""

    path: Path
    ref: SourceRef
    onnx_path: Path  # the ONNX form every backend starts from

    def runner(self) -> Runner:
        try:
            return OnnxRuntimeRunner(self.path)
        except ConversionError as e:
            raise ModelLoadError(f"cannot run the source model {self.path}: {e}") from e


def load_source(path: Path) -> SourceModel:
    """Identify and check the source model. Raises ``ModelLoadError``."""
    if not path.exists():
        raise ModelLoadError(f"model {path} does not exist")
    fmt = _SUFFIX_FORMATS.get(path.suffix.lower())
    if fmt is None:
        known = ", ".join(sorted(_SUFFIX_FORMATS))
        raise ModelLoadError(f"cannot tell the format of {path}: supported model files are {known}")
    if not path.is_file():
        raise ModelLoadError(f"model {path} is not a file")
    try:
        digest = sha256_file(path)
    except OSError as e:
        raise ModelLoadError(f"cannot read model {path}: {e.strerror}") from e
    ref = SourceRef(filename=path.name, format=fmt, sha256=digest)
    return SourceModel(path=path, ref=ref, onnx_path=path)
