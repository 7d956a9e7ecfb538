"""The bundle manifest: what the compiler writes and the agent and server read.

A bundle is one folder per model x version x profile (see DESIGN.md, "Bundle"). The
manifest lists every other file with its sha256 and length, the tensors the model takes
and gives (with layout, so a runtime feeds it right), the verification figures, and the
reference statistics the agent compares live traffic against for drift.

A wire document read tolerantly: fields a newer compiler adds, at any level, are kept and
ignored (the director and the image repository sign the file's bytes, not this model). Only a
newer major ``schema_version`` is refused (``NewerBundleError``: upgrade the reader).
"""

from __future__ import annotations

import enum
import hashlib
import json
import os
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from edgec._bounded_json import json_depth
from edgec._schema import check_schema_version
from edgec.errors import BundleError, NewerBundleError
from edgec.names import Name, RelativePath, Version

__all__ = [
    "MANIFEST_NAME",
    "MAX_MANIFEST_BYTES",
    "MAX_MANIFEST_DEPTH",
    "SCHEMA_VERSION",
    "BundleStatus",
    "FileEntry",
    "FrozenInput",
    "Layout",
    "Manifest",
    "MemoryPeak",
    "Metrics",
    "OutputKind",
    "OutputMetrics",
    "Precision",
    "ProfileRef",
    "SourceRef",
    "TargetFormat",
    "TensorSpec",
    "TensorStats",
    "Verification",
    "check_files",
    "file_entry",
    "parse_manifest",
    "read_manifest",
    "sha256_file",
]

SCHEMA_VERSION = 1  # the major this reader reads; additive changes do not bump it
MANIFEST_NAME = "manifest.json"
MAX_MANIFEST_BYTES = 16 << 20  # a manifest is tens of KB; anything near this is not one
MAX_MANIFEST_DEPTH = 64  # a manifest nests 6 deep; unknown fields get room, not a stack's worth
_CHUNK = 1 << 20


class TargetFormat(enum.StrEnum):
    """Artifact formats edgec can write."""

    ONNX = "onnx"
    TFLITE = "tflite"
    COREML = "coreml"
    TENSORRT = "tensorrt"


class Precision(enum.StrEnum):
    """Numeric precision of an artifact's weights and compute."""

    FP32 = "fp32"
    FP16 = "fp16"
    INT8 = "int8"
    DYNAMIC = "dynamic"  # int8 weights, float activations (dynamic-range); needs no calibration


class Layout(enum.StrEnum):
    """Memory layout of a tensor with a channel axis; ``ANY`` for everything else.

    TFLite and CoreML artifacts converted from ONNX take channels-last tensors (NHWC) where
    the source took channels-first (NCHW); the manifest records which, so callers feed them.
    """

    NCW = "NCW"
    NWC = "NWC"
    NCHW = "NCHW"
    NHWC = "NHWC"
    NCDHW = "NCDHW"
    NDHWC = "NDHWC"
    ANY = "any"


class OutputKind(enum.StrEnum):
    """What an output holds, which decides how an artifact's values are judged against the
    source's (see compiler/kinds.py for how a kind is found, ``--output-kind`` to set it)."""

    CLASSIFICATION = "classification"  # class scores: top-1 agreement
    DENSE = "dense"  # maps, masks, embeddings, landmarks: cosine, PSNR, IoU of a [0, 1] map
    SEQUENCE = "sequence"  # per-timestep class scores (CTC, tagging): per-step argmax agreement
    DETECTION = "detection"  # anchors x (box, scores): cosine per head, confident-anchor agreement
    REGRESSION = "regression"  # a few values (a score, a flag, a box): error over the output's range


class BundleStatus(enum.StrEnum):
    """Outcome of one target's build."""

    OK = "ok"
    FAILED = "failed"
    UNVERIFIED = "unverified"


class _Model(BaseModel):
    # a wire document: unknown fields are kept and ignored, at every level
    model_config = ConfigDict(extra="allow", frozen=True)


class TensorSpec(_Model):
    """One model input or output as the artifact expects it."""

    name: str
    shape: list[int]
    dtype: str  # numpy dtype name: float32, int64, ...
    layout: Layout = Layout.ANY
    runtime_name: str | None = None  # the runtime's own key for it, where that differs from name
    scale: float | None = None  # for integer-quantized I/O: real = scale * (q - zero_point)
    zero_point: int | None = None
    # the source model's shape where the artifact's differs (channels-last, squeezed axes):
    # callers and golden.npz use the source's shape, the runtime takes ``shape``
    source_shape: list[int] | None = None
    kind: OutputKind | None = None  # outputs only: how the build judged it (and a device should)


class FrozenInput(_Model):
    """An input of the source model that the build replaced by a constant (``--freeze``):
    it is not an input of the bundle; the bundle behaves as the source with this value."""

    name: str
    dtype: str  # numpy dtype name, as in TensorSpec
    shape: list[int]
    values: list[bool] | list[int] | list[float]  # flattened, row-major


class FileEntry(_Model):
    path: RelativePath  # relative to the bundle folder: no '..', never absolute
    sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
    length: Annotated[int, Field(ge=0)]


class ProfileRef(_Model):
    id: Name
    sha256: str


class SourceRef(_Model):
    filename: str
    format: str
    sha256: str


class OutputMetrics(_Model):
    """One output of the artifact against the source's, by its kind. ``None`` where the
    figure does not apply to the kind (or the data gave nothing to measure it on)."""

    name: str
    kind: OutputKind
    max_abs_err: float | None = None
    mean_abs_err: float | None = None
    cosine: float | None = None  # mean over samples of each sample's cosine similarity
    psnr_db: float | None = None  # over the reference's range (peak-to-peak), capped at 200
    top1_agreement: float | None = None  # classification (integer outputs: equal values)
    map_iou: float | None = None  # dense maps in [0, 1]: IoU of the maps thresholded at 0.5
    sequence_agreement: float | None = None  # sequence: per-step argmax (integers: equal values)
    anchor_agreement: float | None = None  # detection: confident anchors found by both
    rel_err: float | None = None  # regression: max abs error over the reference's scale
    # (the larger of its range and its largest magnitude)


class Metrics(_Model):
    """Artifact vs source model on the same inputs. ``None`` where it does not apply.

    The top-level figures summarise ``outputs``: the largest error, the worst cosine (of the
    outputs that are not regression), the worst top-1 agreement of the classification outputs;
    accuracy is the first classification output's against the labels.
    """

    samples: int
    max_abs_err: float | None = None
    mean_abs_err: float | None = None
    cosine: float | None = None
    top1_agreement: float | None = None
    accuracy: float | None = None
    source_accuracy: float | None = None
    outputs: list[OutputMetrics] = []


class Verification(_Model):
    status: BundleStatus
    data: str  # "eval", "calibration" or "generated"
    metrics: Metrics | None = None
    gate: dict[str, float]
    gate_failures: list[str] = []
    reason: str | None = None  # why a bundle is unverified, or why its gate was waived


class TensorStats(_Model):
    """Reference distribution of one tensor, for drift checks (PSI) on the device.

    ``bin_edges`` has one more element than ``bin_fractions``; the first and last bins are
    open-ended on the device (values outside the reference range fall into them).
    """

    name: str
    count: int
    mean: float
    std: float
    min: float
    max: float
    bin_edges: list[float]
    bin_fractions: list[float]


class MemoryPeak(_Model):
    """The artifact's peak memory in its runtime, measured when it was built: loaded and run at
    ``batch`` in a child process, the resident set's high-water mark over the runtime's own
    (``baseline_bytes``, the process once the runtime is imported). ``method`` says how:
    ``VmHWM`` (Linux, the mark reset after the imports) or ``ru_maxrss`` (no ``/proc``)."""

    peak_bytes: Annotated[int, Field(ge=0)]
    baseline_bytes: Annotated[int, Field(ge=0)]
    method: str
    batch: Annotated[int, Field(ge=1)]


class Manifest(_Model):
    schema_version: int = SCHEMA_VERSION
    name: Name
    version: Version
    profile: ProfileRef
    format: TargetFormat
    precision: Precision
    created_at: str
    files: list[FileEntry]
    model_file: RelativePath
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    preprocessing: dict[str, str] = {}
    verification: Verification
    reference_stats: list[TensorStats]
    max_latency_ms: float
    runtime_config: dict[str, str] = {}  # session settings the runtime must use (onnxruntime keys)
    tool_versions: dict[str, str]
    source: SourceRef
    frozen_inputs: list[FrozenInput] = []  # source inputs fixed at build time (--freeze)
    memory: MemoryPeak | None = None  # None: not measured (no runtime on the build host; older compilers)

    @model_validator(mode="before")
    @classmethod
    def _readable_version(cls, data: Any) -> Any:
        """A newer major is refused before any field is read (it may have changed them)."""
        return _check_version(data, "bundle manifest")

    def file(self, path: str) -> FileEntry:
        for entry in self.files:
            if entry.path == path:
                return entry
        raise KeyError(path)


def _check_version(data: Any, document: str) -> Any:
    return check_schema_version(
        data,
        document=document,
        supported=SCHEMA_VERSION,
        writer="compiler",
        upgrade="agent or server reading it",
        error=NewerBundleError,
    )


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(_CHUNK):
            digest.update(block)
    return digest.hexdigest()


def file_entry(root: Path, path: Path) -> FileEntry:
    """The manifest entry for ``path``, stored relative to the bundle ``root``."""
    return FileEntry(
        path=path.relative_to(root).as_posix(),
        sha256=sha256_file(path),
        length=os.path.getsize(path),
    )


def parse_manifest(data: bytes | bytearray | str, source: str = MANIFEST_NAME) -> Manifest:
    """A manifest from its JSON text. Raises ``BundleError`` (one line: ``source`` and the
    first problems) for anything that is not a valid manifest, ``NewerBundleError`` (a
    ``BundleError``) for one from a newer compiler; never another exception."""
    if len(data) > MAX_MANIFEST_BYTES:
        raise BundleError(f"{source} is {len(data)} bytes, over the limit of {MAX_MANIFEST_BYTES}")
    encoded = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data
    if json_depth(encoded, MAX_MANIFEST_DEPTH) > MAX_MANIFEST_DEPTH:  # kept unknown fields must dump
        raise BundleError(f"cannot read {source}: it nests deeper than {MAX_MANIFEST_DEPTH} levels")
    try:
        raw = json.loads(data)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise BundleError(f"cannot read {source}: {type(e).__name__}: {str(e)[:200]}") from e
    raw = _check_version(raw, source)  # named by its path; raises NewerBundleError
    try:
        return Manifest.model_validate(raw)
    except ValueError as e:  # pydantic's ValidationError
        first = str(e).splitlines()
        raise BundleError(f"{source} is not a valid edgec manifest: {' '.join(first[:3])}") from e


def read_manifest(bundle: Path) -> Manifest:
    """Load and validate ``bundle/manifest.json``. Raises ``BundleError``."""
    path = bundle / MANIFEST_NAME
    try:
        with path.open("rb") as f:
            data = f.read(MAX_MANIFEST_BYTES + 1)  # parse_manifest refuses one byte more
    except FileNotFoundError:
        if not bundle.exists():
            raise BundleError(f"{bundle} does not exist; give the path of a bundle folder") from None
        raise BundleError(f"{bundle} is not a bundle: it has no {MANIFEST_NAME}") from None
    except NotADirectoryError:
        raise BundleError(f"{bundle} is a file; a bundle is a folder with {MANIFEST_NAME}") from None
    except OSError as e:
        raise BundleError(f"cannot read {path}: {e}") from e
    return parse_manifest(data, str(path))


def check_files(bundle: Path, manifest: Manifest) -> dict[str, str | None]:
    """Each manifest file's problem (``None`` when its length and sha256 match)."""
    problems: dict[str, str | None] = {}
    root = bundle.resolve()
    for entry in manifest.files:
        path = (bundle / entry.path).resolve()
        if not path.is_relative_to(root):
            problems[entry.path] = "path leaves the bundle"
        elif not path.is_file():
            problems[entry.path] = "missing"
        elif path.stat().st_size != entry.length:
            problems[entry.path] = f"length {path.stat().st_size} != {entry.length}"
        elif sha256_file(path) != entry.sha256:
            problems[entry.path] = "sha256 mismatch"
        else:
            problems[entry.path] = None
    return problems
