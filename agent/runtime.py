"""Running a bundle on the device: load it into its runtime, check requests, self-test it.

``load_bundle`` checks every file of a bundle against its manifest (length and sha256), then
opens the artifact with ``bundle_runtime``, the code the compiler verified it with:
onnxruntime's CPU provider for ONNX (with the manifest's ``runtime_config`` entries), the
LiteRT interpreter for TFLite. CoreML and TensorRT bundles are refused here with
``NotRunnableHereError``.

The ``RuntimeModel`` it returns speaks the SOURCE model's tensors, whatever the artifact
takes: callers (and ``golden.npz``) give float arrays in the source's shape and layout, keyed
by tensor name; ``bundle_runtime.TensorPort`` moves them to the artifact's layout
(channels-last for TFLite), quantizes int8 inputs with the manifest's scale and zero point,
and dequantizes int8 outputs back to float. ``inputs`` and ``outputs`` describe that
caller's view (``TensorInfo``).

``check_inputs`` is the one place a request's tensors are checked: names, shapes (a negative
dimension in the manifest takes any size) and dtypes, converting where no information is lost
that matters (float64 JSON numbers to float32, integral floats to integers, integers to
floats) and raising ``InputError`` with one line that names the tensor otherwise.

``self_test`` runs a bundle's golden inputs and compares the outputs with the golden ones:
the agent refuses a model that fails it before swapping it in.
"""

from __future__ import annotations

import logging
import math
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bundle_runtime import (
    SESSIONS,
    ArtifactLoadError,
    ArtifactRunner,
    RuntimeNotInstalledError,
    first_line,
    open_artifact,
)
from edgec.errors import BundleError, UserInputError
from edgec.manifest import Manifest, OutputKind, TensorSpec, check_files, read_manifest

__all__ = [
    "DamagedBundleError",
    "InputError",
    "LoadError",
    "NotRunnableHereError",
    "RuntimeModel",
    "SelfTestResult",
    "TensorInfo",
    "check_inputs",
    "convert_dtype",
    "golden_samples",
    "load_bundle",
    "self_test",
]

logger = logging.getLogger(__name__)

MIN_ABS_ERR_TOLERANCE = 1e-4  # self-test floor for an artifact the build measured as exact
ABS_ERR_MARGIN = 2.0  # self-test allows this multiple of the build's measured max abs error


class LoadError(BundleError):
    """The bundle's model cannot be loaded into its runtime (bad data: never retried blindly)."""


class DamagedBundleError(LoadError):
    """A bundle file is missing or differs from the manifest (length or sha256)."""


class NotRunnableHereError(LoadError):
    """The bundle's format has no runtime on this device (CoreML, TensorRT, a missing package)."""


class InputError(UserInputError, ValueError):
    """A request's tensors do not fit the model; ``str()`` is one line naming the tensor."""


@dataclass(frozen=True)
class TensorInfo:
    """A tensor as callers see it: the source model's shape (-1: any size) and dtype."""

    name: str
    shape: tuple[int, ...]
    dtype: str  # numpy dtype name

    def describe(self) -> str:
        return f"{self.dtype} {_shape_text(self.shape)}"


def _shape_text(shape: Sequence[int]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def _caller_view(spec: TensorSpec) -> TensorInfo:
    shape = tuple(spec.source_shape if spec.source_shape is not None else spec.shape)
    quantized = spec.scale is not None and spec.zero_point is not None
    return TensorInfo(spec.name, shape, "float32" if quantized else spec.dtype)


# --------------------------------------------------------------------------- input checks


def _fits(shape: Sequence[int], want: Sequence[int]) -> bool:
    return len(shape) == len(want) and all(w < 0 or s == w for s, w in zip(shape, want, strict=True))


def _integral(array: np.ndarray) -> bool:
    return bool(np.isfinite(array).all() and np.array_equal(array, np.round(array)))


def _too_large(array: np.ndarray, limit: float) -> bool:
    peak = max(float(array.max()), -float(array.min()))  # methods: np.max's wrapper is slow
    if math.isfinite(peak):
        return peak > limit
    finite = array[np.isfinite(array)]  # NaN and infinities stay so; only finite values overflow
    return bool(finite.size) and float(np.abs(finite).max()) > limit


def convert_dtype(
    name: str, array: np.ndarray, dtype: np.dtype[Any] | str, *, wanted: str = "the model takes"
) -> np.ndarray:
    """``array`` (input ``name``) as ``dtype`` where that loses nothing that matters, else
    ``InputError``; ``wanted`` words the error (``"the model takes"``, ``"its datatype is"``).

    Accepted: any float or integer to a float dtype (float64 JSON numbers to float32, finite
    values past the float range refused); integers, and floats that hold whole numbers, to an
    integer dtype within its range; booleans, and integers 0 and 1, to bool. Nothing else
    (booleans to numbers, strings, objects, complex numbers) is converted.
    """
    want = dtype if isinstance(dtype, np.dtype) else np.dtype(dtype)
    have = array.dtype
    if have == want:
        return array
    if have.kind not in "biuf" or want.kind not in "biuf":
        raise InputError(f"input {name!r} is {have}, {wanted} {want}")
    if want.kind == "f":
        if have.kind == "b":
            raise InputError(f"input {name!r} is bool, {wanted} {want}")
        narrower = have.kind == "f" and have.itemsize > want.itemsize and array.size
        if narrower and _too_large(array, float(np.finfo(want).max)):
            raise InputError(f"input {name!r} holds values too large for {want}")
        return array.astype(want)
    if want.kind == "b":
        if have.kind in "iu" and bool(np.isin(array, (0, 1)).all()):
            return array.astype(want)
        raise InputError(f"input {name!r} is {have}, {wanted} bool (true/false or 0/1)")
    # an integer dtype
    if have.kind == "b":
        raise InputError(f"input {name!r} is bool, {wanted} {want}")
    if have.kind == "f" and not _integral(array):
        raise InputError(f"input {name!r} holds non-integer values, {wanted} {want}")
    if array.size:
        limits = np.iinfo(want)
        if array.min() < limits.min or array.max() > limits.max:
            raise InputError(
                f"input {name!r} holds values outside the {want} range [{limits.min}, {limits.max}]"
            )
    return array.astype(want)


class _InputChecker:
    """``check_inputs`` for one manifest, prepared once (the serving path calls it per request)."""

    def __init__(self, infos: Sequence[TensorInfo]) -> None:
        self.infos = list(infos)
        self._names = {i.name for i in infos}
        self._dtypes = [np.dtype(i.dtype) for i in infos]

    def check(self, inputs: Mapping[str, Any]) -> dict[str, np.ndarray]:
        unknown = [n for n in inputs if n not in self._names]
        if unknown:
            takes = ", ".join(repr(i.name) for i in self.infos)
            raise InputError(f"unknown input {unknown[0]!r}: the model takes {takes}")
        checked: dict[str, np.ndarray] = {}
        for info, dtype in zip(self.infos, self._dtypes, strict=True):
            if info.name not in inputs:
                raise InputError(f"missing input {info.name!r} ({info.describe()})")
            array = np.asarray(inputs[info.name])
            if not _fits(array.shape, info.shape):
                dynamic = " (-1: any size)" if any(d < 0 for d in info.shape) else ""
                raise InputError(
                    f"input {info.name!r} has shape {_shape_text(array.shape)}, "
                    f"the model takes {_shape_text(info.shape)}{dynamic}"
                )
            checked[info.name] = convert_dtype(info.name, array, dtype)
        return checked


def check_inputs(manifest: Manifest, inputs: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The request's tensors checked against the model's inputs and converted to their dtypes.

    Raises ``InputError`` naming the first tensor that is unknown, missing, of the wrong shape,
    or of a dtype that does not convert (see ``convert_dtype``).
    """
    return _InputChecker([_caller_view(s) for s in manifest.inputs]).check(inputs)


# --------------------------------------------------------------------------- runtimes


def _open(folder: Path, manifest: Manifest, threads: int) -> ArtifactRunner:
    """The bundle's model in the session the build verified it with (``bundle_runtime``)."""
    label = f"{manifest.name} {manifest.version}"
    try:
        return open_artifact(
            folder / manifest.model_file,
            manifest.format,
            manifest.inputs,
            manifest.outputs,
            runtime_config=manifest.runtime_config,
            threads=threads,
        )
    except RuntimeNotInstalledError as e:
        raise NotRunnableHereError(
            f"{label} is a {manifest.format.value} bundle and {e}: pip install 'edgec[agent]'"
        ) from e
    except ArtifactLoadError as e:
        raise LoadError(str(e)) from e


class RuntimeModel:
    """A bundle loaded into its runtime; implements ``agent.slot.LoadedModel``.

    ``infer`` takes and gives source-layout arrays keyed by tensor name (see the module
    docstring); it checks its inputs with ``check_inputs`` and raises ``InputError`` for
    ones that do not fit. Safe to call from several threads at once.
    """

    def __init__(self, folder: Path, manifest: Manifest, runner: ArtifactRunner):
        self.folder = folder
        self.manifest = manifest
        self.inputs = [_caller_view(s) for s in manifest.inputs]
        self.outputs = [_caller_view(s) for s in manifest.outputs]
        self._checker = _InputChecker(self.inputs)
        self._runner: ArtifactRunner | None = runner

    @property
    def version(self) -> str:
        return self.manifest.version

    def __repr__(self) -> str:
        m = self.manifest
        return f"RuntimeModel({m.name} {m.version}, {m.format.value} {m.precision.value}, {self.folder})"

    def infer(self, inputs: Mapping[str, Any]) -> dict[str, np.ndarray]:
        checked = self._checker.check(inputs)
        runner = self._runner
        if runner is None:
            raise RuntimeError(f"{self.manifest.name} {self.manifest.version} is closed")
        return runner.run(checked)

    def close(self) -> None:
        self._runner = None  # the runtimes free their sessions when the last reference goes


def load_bundle(folder: Path, *, threads: int = 1) -> RuntimeModel:
    """Check ``folder``'s files against its manifest and open its model in its runtime.

    ``threads`` is the runtime's intra-op thread count. Raises ``BundleError`` (no or bad
    manifest), ``DamagedBundleError``, ``NotRunnableHereError`` or ``LoadError``.
    """
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    manifest = read_manifest(folder)
    label = f"{manifest.name} {manifest.version} ({folder})"
    if manifest.format not in SESSIONS:
        raise NotRunnableHereError(
            f"{label} is a {manifest.format.value} bundle: not runnable here "
            f"(this agent runs {', '.join(f.value for f in SESSIONS)} bundles)"
        )
    try:
        manifest.file(manifest.model_file)
    except KeyError:
        raise DamagedBundleError(
            f"{label}: the manifest does not list its model file {manifest.model_file}"
        ) from None
    problems = {path: problem for path, problem in check_files(folder, manifest).items() if problem}
    if problems:
        listed = "; ".join(f"{path}: {problem}" for path, problem in sorted(problems.items()))
        raise DamagedBundleError(f"{label} is damaged: {listed}")
    runner = _open(folder, manifest, threads)
    logger.info(
        "loaded %s %s (%s %s) from %s",
        manifest.name,
        manifest.version,
        manifest.format.value,
        manifest.precision.value,
        folder,
    )
    return RuntimeModel(folder, manifest, runner)


# --------------------------------------------------------------------------- self-test


@dataclass(frozen=True)
class SelfTestResult:
    """The model's outputs on the golden inputs against the golden outputs.

    ``limits`` holds the thresholds applied (``min_cosine``, ``min_top1_agreement``,
    ``max_abs_err``); ``reason`` says why it failed (``None`` when it passed).
    """

    passed: bool
    samples: int = 0
    max_abs_err: float | None = None
    cosine: float | None = None
    top1_agreement: float | None = None
    reason: str | None = None
    limits: dict[str, float] = field(default_factory=dict)


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    norm = float(np.linalg.norm(a) * np.linalg.norm(b))
    if norm == 0.0:
        return 1.0 if not a.any() and not b.any() else 0.0
    return float(np.dot(a, b) / norm)


def _limits(manifest: Manifest) -> dict[str, float]:
    """The manifest gate's thresholds, and the abs error allowed from the build's own figure."""
    gate = manifest.verification.gate
    limits: dict[str, float] = {k: float(gate[k]) for k in ("min_cosine", "min_top1_agreement") if k in gate}
    metrics = manifest.verification.metrics
    if metrics is not None and metrics.max_abs_err is not None:
        limits["max_abs_err"] = max(ABS_ERR_MARGIN * metrics.max_abs_err, MIN_ABS_ERR_TOLERANCE)
    return limits


def golden_samples(
    model: RuntimeModel, golden: Path
) -> tuple[list[dict[str, np.ndarray]], list[dict[str, np.ndarray]]]:
    """The golden inputs and outputs, one dict per sample, shaped as the model takes them."""
    try:
        with np.load(golden, allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in npz.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise InputError(f"cannot read {golden.name}: {first_line(e)}") from e
    wanted = [f"inputs/{i.name}" for i in model.inputs] + [f"outputs/{o.name}" for o in model.outputs]
    missing = [key for key in wanted if key not in arrays]
    if missing:
        raise InputError(f"{golden.name} has no {', '.join(missing)}")
    counts = {len(arrays[key]) for key in wanted}
    if len(counts) != 1 or not counts.pop():
        raise InputError(f"{golden.name} holds different or no sample counts")
    count = len(arrays[wanted[0]])

    def per_sample(info: TensorInfo, array: np.ndarray) -> np.ndarray:
        if _fits(array.shape[1:], info.shape):
            return array
        if info.shape[:1] == (1,) and _fits(array.shape[1:], info.shape[1:]):
            return array[:, None]  # samples stored without the batch axis of 1
        raise InputError(
            f"{golden.name}: {info.name!r} samples are {_shape_text(array.shape[1:])}, "
            f"the model's tensor is {_shape_text(info.shape)}"
        )

    ins = {i.name: per_sample(i, arrays[f"inputs/{i.name}"]) for i in model.inputs}
    outs = {o.name: per_sample(o, arrays[f"outputs/{o.name}"]) for o in model.outputs}
    return (
        [{k: v[n] for k, v in ins.items()} for n in range(count)],
        [{k: v[n] for k, v in outs.items()} for n in range(count)],
    )


def _class_head(manifest: Manifest) -> str | None:
    """The output top-1 agreement is measured on: the first the build judged as class scores
    (manifests from before output kinds: the first output)."""
    if all(o.kind is None for o in manifest.outputs):
        return manifest.outputs[0].name if manifest.outputs else None
    return next((o.name for o in manifest.outputs if o.kind is OutputKind.CLASSIFICATION), None)


def self_test(model: RuntimeModel, golden: Path) -> SelfTestResult:
    """Run ``golden``'s inputs one sample at a time and compare with its outputs.

    Passes when the cosine similarity (mean per sample, worst output) reaches the gate's
    ``min_cosine``, top-1 agreement of the first output the build judged as class scores
    (for ``[batch, classes]`` float outputs) reaches ``min_top1_agreement``, and the max
    absolute error is at most ``max(2 x the build's measured max_abs_err, 1e-4)``. Integer
    outputs must match exactly. An unreadable golden file or a runtime failure fails the test with the reason.
    """
    limits = _limits(model.manifest)
    try:
        inputs, expected = golden_samples(model, golden)
    except InputError as e:
        return SelfTestResult(False, reason=str(e), limits=limits)
    got: list[dict[str, np.ndarray]] = []
    for index, feed in enumerate(inputs):
        try:
            got.append(model.infer(feed))
        except Exception as e:  # a runtime's own failure is the test's result
            return SelfTestResult(False, reason=f"sample {index} failed: {first_line(e)}", limits=limits)

    max_err = 0.0
    worst_cosine: float | None = None
    for info in model.outputs:
        cosines = []
        for ref, out in zip(expected, got, strict=True):
            r, c = ref[info.name], np.asarray(out[info.name])
            if r.size != c.size:
                return SelfTestResult(
                    False,
                    reason=f"output {info.name!r} is {_shape_text(c.shape)}, golden {_shape_text(r.shape)}",
                    limits=limits,
                )
            c = c.reshape(r.shape)
            if r.dtype.kind != "f":
                max_err = max(max_err, 1.0 if np.any(r != c) else 0.0)
                continue
            r64, c64 = r.astype(np.float64), c.astype(np.float64)
            max_err = max(max_err, float(np.abs(r64 - c64).max(initial=0.0)))
            cosines.append(_cosine(r64.ravel(), c64.ravel()))
        if cosines:
            mean = float(np.mean(cosines))
            worst_cosine = mean if worst_cosine is None else min(worst_cosine, mean)

    top1 = None
    head = _class_head(model.manifest)
    if head is not None and all(
        ref[head].dtype.kind == "f" and ref[head].ndim == 2 and ref[head].shape[1] >= 2 for ref in expected
    ):
        ref_top = np.concatenate([ref[head].argmax(-1) for ref in expected])
        got_top = np.concatenate(
            [
                np.asarray(out[head]).reshape(ref[head].shape).argmax(-1)
                for ref, out in zip(expected, got, strict=True)
            ]
        )
        top1 = float(np.mean(ref_top == got_top))

    failures = []
    if worst_cosine is not None and "min_cosine" in limits and worst_cosine < limits["min_cosine"]:
        failures.append(f"cosine {worst_cosine:.6f} < {limits['min_cosine']}")
    if top1 is not None and "min_top1_agreement" in limits and top1 < limits["min_top1_agreement"]:
        failures.append(f"top-1 agreement {top1:.4f} < {limits['min_top1_agreement']}")
    if "max_abs_err" in limits and max_err > limits["max_abs_err"]:
        failures.append(f"max abs err {max_err:.3e} > {limits['max_abs_err']:.3e}")
    return SelfTestResult(
        passed=not failures,
        samples=len(inputs),
        max_abs_err=max_err,
        cosine=worst_cosine,
        top1_agreement=top1,
        reason="; ".join(failures) or None,
        limits=limits,
    )
