"""The source model a user trained: identify it, import it to ONNX, keep its own runtime.

``identify`` is quick and runs before any work (a bad path or an unknown format is the
user's to fix, exit 2); ``import_source`` does the conversion.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from compiler.importers import Imported
from compiler.limits import MemoryBudget
from compiler.runtime import OnnxRuntimeRunner, Runner
from edgec.errors import ConversionError, ModelLoadError
from edgec.manifest import SourceRef, sha256_file

__all__ = ["SourceModel", "identify", "import_source"]

logger = logging.getLogger(__name__)

_SUFFIX_FORMATS = {".onnx": "onnx", ".keras": "keras", ".h5": "keras", ".tflite": "tflite", ".pt2": "pytorch"}
_KNOWN = ".onnx, .keras, .h5, .tflite, .pt2 files and TensorFlow SavedModel folders"


@dataclass(frozen=True)
class SourceModel:
    """The user's model: the reference every artifact is verified against."""

    path: Path
    ref: SourceRef
    imported: Imported

    @property
    def onnx_path(self) -> Path:
        return self.imported.onnx_path

    def runner(self) -> Runner:
        try:
            return self.imported.runner()
        except ConversionError as e:
            raise ModelLoadError(f"cannot run the source model {self.path}: {e}") from e


def _folder_sha256(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(path.relative_to(folder).as_posix().encode() + b"\0")
        digest.update(bytes.fromhex(sha256_file(path)))
    return digest.hexdigest()


def identify(path: Path) -> SourceRef:
    """The source's format and hash. Raises ``ModelLoadError``."""
    if not path.exists():
        raise ModelLoadError(f"model {path} does not exist")
    if path.is_dir():
        if not (path / "saved_model.pb").is_file():
            raise ModelLoadError(f"{path} is a folder without saved_model.pb; edgec reads {_KNOWN}")
        return SourceRef(filename=path.name, format="savedmodel", sha256=_folder_sha256(path))
    fmt = _SUFFIX_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise ModelLoadError(f"cannot tell the format of {path}: edgec reads {_KNOWN}")
    try:
        digest = sha256_file(path)
    except OSError as e:
        raise ModelLoadError(f"cannot read model {path}: {e.strerror}") from e
    return SourceRef(filename=path.name, format=fmt, sha256=digest)


def import_source(
    path: Path,
    ref: SourceRef,
    shapes: Mapping[str, list[int]],
    workdir: Path,
    budget: MemoryBudget | None = None,
) -> SourceModel:
    """Convert the source to ONNX in ``workdir`` (ONNX sources are used as they are).

    ``budget`` bounds the example inputs an importer allocates (PyTorch traces with them)."""
    if ref.format == "onnx":
        imported = Imported(onnx_path=path, runner=lambda: OnnxRuntimeRunner(path))
    elif ref.format == "keras":
        from compiler.importers.tensorflow import import_keras

        imported = import_keras(path, shapes, workdir)
    elif ref.format == "savedmodel":
        from compiler.importers.tensorflow import import_saved_model

        imported = import_saved_model(path, shapes, workdir)
    elif ref.format == "tflite":
        from compiler.importers.tflite import import_tflite

        imported = import_tflite(path, shapes, workdir)
    else:
        from compiler.importers.pytorch import import_pytorch

        imported = import_pytorch(path, shapes, workdir, budget)
    return SourceModel(path=path, ref=ref, imported=imported)
