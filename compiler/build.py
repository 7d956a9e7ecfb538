"""``edgec build``: source model -> prepared graph -> per target: compile, verify, bundle.

Every check that can fail on bad input runs before any slow work, so a typo costs no
time and leaves nothing behind. A target that fails to convert or misses its gate is
reported with its figures; the other targets are still built.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import hashlib
import logging
import platform
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as dist_version
from pathlib import Path
from typing import Literal

import numpy as np

import edgec
from compiler.backends import BACKENDS, Artifact, get_backend
from compiler.bundle import bundle_dir_name, write_bundle
from compiler.cache import BuildCache, default_cache_dir
from compiler.dequantize import agreement_failures, agreement_note, described
from compiler.kinds import Kinds, check_kind_names, detect_kinds
from compiler.limits import (
    DEFAULT_MAX_SAMPLES,
    MemoryBudget,
    describe_tensors,
    format_size,
    memory_budget,
    sample_bytes,
)
from compiler.prepare import PreparedModel, prepare
from compiler.report import BuildResult, TargetResult
from compiler.runtime import OnnxRuntimeRunner, Runner, first_line
from compiler.search import Context, Trial, best, search, with_layer_errors
from compiler.source import SourceModel, identify, import_source
from compiler.stateful import (
    Sequences,
    find_sequences,
    run_carrying,
    state_kinds,
    stored_inputs,
    with_zero_states,
)
from compiler.stats import tensor_stats
from compiler.tensors import SampleSet, generate_samples, load_samples
from compiler.verify import Outputs, compare
from device_profiles import DeviceProfile, load_profile
from edgec.errors import (
    BuildError,
    ConversionError,
    OptionError,
    OutputDirError,
    QuantizedSourceError,
    ResourceLimitError,
    UserInputError,
)
from edgec.manifest import (
    SCHEMA_VERSION,
    BundleStatus,
    FileEntry,
    FrozenInput,
    Manifest,
    Metrics,
    OutputKind,
    Precision,
    ProfileRef,
    SourceRef,
    TargetFormat,
    TensorSpec,
    TensorStats,
    Verification,
    sha256_file,
)

__all__ = ["BuildRequest", "build"]

logger = logging.getLogger(__name__)

GENERATED_SAMPLES = 32  # when the user gives no data (fewer if --max-samples is lower)
GOLDEN_SAMPLES = 8
CONVERTERS = (
    "numpy",
    "onnx",
    "onnxruntime",
    "onnxconverter-common",
    "tensorflow",
    "tf_keras",
    "tf2onnx",
    "onnx2tf",
    "ai-edge-litert",
    "coremltools",
    "torch",
    "onnxscript",
    "tensorrt",
)
LAYER_ERRORS_KEPT = 20
VERIFY_VERSION = 3  # bump when figures or layer tables are measured differently: cached ones are stale
Progress = Callable[[str], None]


@dataclass(frozen=True)
class BuildRequest:
    model: Path
    targets: Sequence[str | Path]
    out: Path
    format: TargetFormat | Literal["all"] | None = None  # None: each profile's first format
    precision: Precision | Literal["auto"] | None = None  # None: each profile's default
    calibration: Path | None = None
    eval: Path | None = None
    input_shapes: Mapping[str, list[int]] = field(default_factory=dict)
    # inputs replaced by constants, values as written (``--freeze``; see compiler.freeze)
    freeze: Mapping[str, str] = field(default_factory=dict)
    # how outputs are judged, where the kind found from shape and values is not the right one
    output_kinds: Mapping[str, OutputKind] = field(default_factory=dict)
    # stateful models: state input -> state output (``--state``; else found by name), and the
    # steps per sequence in data files (None: a whole file is one sequence; see compiler.stateful)
    states: Mapping[str, str] = field(default_factory=dict)
    sequence_length: int | None = None
    name: str | None = None
    version: str = "1.0.0"
    force: bool = False
    ignore_gates: bool = False
    cache: Path | None = field(default_factory=default_cache_dir)  # None: no build cache
    memory_budget_bytes: int | None = None  # None: EDGEC_MEMORY_BUDGET, else half the memory available
    max_samples: int = DEFAULT_MAX_SAMPLES  # of calibration and eval data each; the first ones are used


@dataclass(frozen=True)
class _Plan:
    profile: DeviceProfile
    format: TargetFormat
    precision: Precision | None  # None: auto
    bundle: Path


@dataclass
class _Shared:
    """Everything the targets of one build have in common, computed once."""

    request: BuildRequest
    source: SourceModel
    prepared: PreparedModel
    calibration: SampleSet | None
    verify_set: SampleSet
    reference: Outputs
    kinds: Kinds
    stats: list[TensorStats]
    cache_parts: dict[str, object]
    sequences: Sequences | None = None  # a stateful model: run over sequences carrying its state
    # a quantized source built from its float equivalent: that graph against the source
    dequantized: Metrics | None = None


def _formats(request: BuildRequest, profile: DeviceProfile) -> list[TargetFormat]:
    if request.format == "all":
        return list(profile.formats)
    fmt = request.format or profile.default_format
    if fmt not in profile.formats:
        runs = ", ".join(f.value for f in profile.formats)
        raise OptionError(f"profile {profile.id} does not run {fmt.value}; it runs: {runs}")
    return [fmt]


def _precision(request: BuildRequest, profile: DeviceProfile) -> Precision | None:
    """The precision to build for this profile; None for ``auto``. Checked up front."""
    if request.precision == "auto":
        return None
    precision = request.precision or profile.default_precision
    if precision not in profile.precisions:
        allowed = ", ".join(p.value for p in profile.precisions)
        raise OptionError(f"profile {profile.id} does not allow {precision.value}; allowed: {allowed}")
    if precision is Precision.INT8 and request.calibration is None:
        raise OptionError(
            f"int8 for {profile.id} needs calibration data: pass --calibration FILE.npz|DIR "
            "(or choose --precision fp16)"
        )
    return precision


def _plan(request: BuildRequest, profiles: list[DeviceProfile], name: str) -> list[_Plan]:
    plans: list[_Plan] = []
    for profile in profiles:
        precision = _precision(request, profile)
        formats = _formats(request, profile)
        for fmt in formats:
            spec = BACKENDS.get(fmt)
            if precision is not None and spec is not None and precision not in spec.precisions:
                raise OptionError(f"the {fmt.value} backend cannot build {precision.value}")
            suffix = fmt.value if len(formats) > 1 else ""
            folder = bundle_dir_name(name, request.version, profile.id, suffix)
            plans.append(_Plan(profile, fmt, precision, request.out / folder))
    folders = [p.bundle for p in plans]
    if len(set(folders)) != len(folders):
        raise OptionError("the same profile is named twice in --target")
    return plans


def _check_out_dir(out: Path, plans: list[_Plan], force: bool) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as e:
        raise OutputDirError(
            f"cannot write to output folder {out}: {e.strerror or e}; choose another --out"
        ) from e
    if not force:
        for plan in plans:
            if plan.bundle.exists():
                raise OutputDirError(
                    f"bundle {plan.bundle} already exists; pass --force to replace it "
                    "or set another --version"
                )


def _with_shapes(specs: list[TensorSpec], sample: Mapping[str, np.ndarray]) -> list[TensorSpec]:
    """Fill dimensions shape inference left unknown from an actual run."""
    return [
        s if -1 not in s.shape else s.model_copy(update={"shape": list(sample[s.name].shape)}) for s in specs
    ]


def _reference_stats(samples: SampleSet, outputs: Outputs, output_names: Sequence[str]) -> list[TensorStats]:
    stats = [tensor_stats(name, list(array)) for name, array in samples.arrays.items()]
    stats += [tensor_stats(name, [o[name] for o in outputs]) for name in output_names]
    return [s for s in stats if s is not None]


_SHAPE_FIX = "set a smaller --input-shape (or export the model with smaller inputs)"


def _samples(
    request: BuildRequest, prepared: PreparedModel, budget: MemoryBudget, sequences: Sequences | None
) -> tuple[SampleSet | None, SampleSet]:
    """Calibration data and the verification set, each checked against the budget from the
    declared shapes (and data file headers) before it is allocated."""
    inputs = describe_tensors(prepared.inputs)
    per_input, per_output = sample_bytes(prepared.inputs), sample_bytes(prepared.outputs)
    one = per_input + per_output
    budget.check(one, f"one sample of {inputs} needs {format_size(one)} with the model's outputs", _SHAPE_FIX)
    limit = request.max_samples
    frozen = list(prepared.frozen)

    def load(path: Path, origin: str) -> SampleSet:  # a stateful model's data may leave states out
        specs = stored_inputs(path, prepared.inputs, sequences)
        found = load_samples(path, specs, origin, budget, limit, frozen=frozen)
        return with_zero_states(found, prepared.inputs)

    calibration = load(request.calibration, "calibration") if request.calibration else None
    evaluation = load(request.eval, "eval") if request.eval else None
    verify_set = evaluation or calibration
    if verify_set is None:
        count = min(GENERATED_SAMPLES, limit)
        need = count * per_input
        head = f"{count} generated samples of {inputs} need {format_size(need)}"
        budget.reserve(need, head, f"{_SHAPE_FIX}, use fewer samples (--max-samples N)")
        verify_set = generate_samples(prepared.inputs, count)
    apart = calibration is not None and calibration is not verify_set  # run again for its statistics
    runs = len(verify_set) + (len(calibration) if calibration is not None and apart else 0)
    need = runs * per_output
    head = f"the model's outputs for {runs} samples need {format_size(need)}"
    budget.reserve(need, head, f"{_SHAPE_FIX}, use fewer samples (--max-samples N)")
    return calibration, verify_set


def _prepare_shared(
    request: BuildRequest, ref: SourceRef, workdir: Path, progress: Progress, budget: MemoryBudget
) -> _Shared:
    if ref.format != "onnx":
        progress(f"importing {request.model.name} ({ref.format}) to ONNX")
    source = import_source(request.model, ref, request.input_shapes, workdir, budget)
    progress(f"preparing {source.path.name}")
    prepared = prepare(source.onnx_path, request.input_shapes, workdir, source.imported, request.freeze)
    check_kind_names(request.output_kinds, [o.name for o in prepared.outputs])
    sequences = find_sequences(prepared.inputs, prepared.outputs, request.states, request.sequence_length)
    calibration, verify_set = _samples(request, prepared, budget, sequences)
    progress(f"running the source model on {len(verify_set)} {verify_set.origin} samples")
    runner: Runner = _FrozenFeeds(source.runner(), prepared.frozen)
    same = calibration is verify_set
    quantized: Outputs | None = None
    if prepared.dequantized:  # the float graph is the reference; its distance to the source is reported
        progress(f"the source is quantized ({described(prepared.dequantized)}): building its float graph")
        quantized, _ = run_carrying(runner, verify_set, sequences)
        runner = OnnxRuntimeRunner(prepared.path)
    # a stateful model runs its sequences carrying its state; the sets then hold the states fed
    reference, verify_set = run_carrying(runner, verify_set, sequences)
    if sequences is not None:
        progress(sequences.describe(len(verify_set)))
    prepared = dataclasses.replace(prepared, outputs=_with_shapes(prepared.outputs, reference[0]))
    names = [o.name for o in prepared.outputs]
    kinds = detect_kinds(reference, names, {**state_kinds(sequences), **request.output_kinds})
    progress("outputs judged as " + ", ".join(f"{n}: {k.value}" for n, k in kinds.items()))
    if calibration is not None and not same:
        calibrated, calibration = run_carrying(runner, calibration, sequences)
        stats = _reference_stats(calibration, calibrated, names)
    else:
        calibration = verify_set if same else None
        stats = _reference_stats(verify_set, reference, names)
    cache_parts: dict[str, object] = {
        "edgec": edgec.__version__,
        "manifest_schema": [SCHEMA_VERSION, "source_shape"],  # cached specs carry what manifests need
        "verify": [VERIFY_VERSION, {n: k.value for n, k in kinds.items()}],  # cached figures: how measured
        "prepared": sha256_file(prepared.path),
        "calibration": _data_digest(calibration),
        "verification": _data_digest(verify_set),
        "tools": _installed_versions(),
    }
    if sequences is not None:
        cache_parts["sequences"] = sequences.key()
    dequantized = compare(quantized, reference, None, kinds) if quantized is not None else None
    return _Shared(
        request,
        source,
        prepared,
        calibration,
        verify_set,
        reference,
        kinds,
        stats,
        cache_parts,
        sequences,
        dequantized,
    )


class _FrozenFeeds:
    """The source model with its frozen inputs fed their values: the reference a graph
    with those inputs folded away is verified against."""

    def __init__(self, runner: Runner, frozen: Mapping[str, np.ndarray]) -> None:
        self._runner = runner
        self._frozen = dict(frozen)

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self._runner.run({**feeds, **self._frozen})


def _frozen_inputs(prepared: PreparedModel) -> list[FrozenInput]:
    return [
        FrozenInput(
            name=name, dtype=value.dtype.name, shape=list(value.shape), values=value.reshape(-1).tolist()
        )
        for name, value in prepared.frozen.items()
    ]


def _data_digest(samples: SampleSet | None) -> str | None:
    if samples is None:
        return None
    digest = hashlib.sha256()
    for name in sorted(samples.arrays):
        array = np.ascontiguousarray(samples.arrays[name])
        digest.update(f"{name}:{array.dtype}:{array.shape}".encode())
        digest.update(array.tobytes())
    if samples.labels is not None:
        digest.update(np.ascontiguousarray(samples.labels).tobytes())
    return digest.hexdigest()


def _installed_versions() -> dict[str, str]:
    """Versions of every converter and runtime that can shape an artifact (cache key)."""
    found = {}
    for package in CONVERTERS:
        try:
            found[package] = dist_version(package)
        except PackageNotFoundError:
            continue
    return found


def _gate(profile: DeviceProfile, precision: Precision) -> dict[str, float]:
    gate = profile.gates[precision].flat()
    gate["max_artifact_bytes"] = float(profile.max_artifact_bytes)
    return gate


def _tool_versions(artifact: Artifact) -> dict[str, str]:
    versions = {
        "edgec": edgec.__version__,
        "python": platform.python_version(),
        "numpy": dist_version("numpy"),
    }
    versions.update(artifact.tool_versions)
    return versions


def _golden(shared: _Shared) -> dict[str, np.ndarray]:
    count = min(GOLDEN_SAMPLES, len(shared.verify_set))
    golden = {f"inputs/{k}": v[:count] for k, v in shared.verify_set.arrays.items()}
    for spec in shared.prepared.outputs:
        golden[f"outputs/{spec.name}"] = np.stack([o[spec.name] for o in shared.reference[:count]])
    return golden


def _candidates(plan: _Plan, shared: _Shared) -> list[Precision]:
    """The precisions to try: the one asked for, or for ``auto`` the smallest first."""
    if plan.precision is not None:
        return [plan.precision]
    spec = BACKENDS[plan.format]
    order = [Precision.INT8, Precision.FP16, Precision.FP32]
    if shared.calibration is None:
        order.remove(Precision.INT8)
    return [p for p in order if p in plan.profile.precisions and p in spec.precisions]


def _build_target(plan: _Plan, shared: _Shared, progress: Progress) -> TargetResult:
    timings: dict[str, float] = {}
    result = _build_timed(plan, shared, progress, timings)
    return result.model_copy(update={"timings_s": {k: round(v, 3) for k, v in timings.items()}})


def _trail(trials: list[Trial], chosen: Trial | None, auto: bool) -> list[dict[str, object]]:
    return [t.as_dict(t is chosen) for t in trials] if len(trials) > 1 or auto else []


def _build_timed(plan: _Plan, shared: _Shared, progress: Progress, timings: dict[str, float]) -> TargetResult:
    precisions = _candidates(plan, shared)
    label = f"{plan.profile.id} {plan.format.value} {plan.precision.value if plan.precision else 'auto'}"
    result = TargetResult(
        profile=plan.profile.id,
        format=plan.format,
        precision=precisions[0] if precisions else Precision.FP32,
        status=BundleStatus.FAILED,
        gate=_gate(plan.profile, precisions[0] if precisions else Precision.FP32),
    )
    try:
        _refuse_unequal_float(plan, shared)
        progress(f"{label}: converting")
        backend = get_backend(plan.format)
        with tempfile.TemporaryDirectory(prefix="edgec-target-") as tmp:
            started = time.perf_counter()
            ctx = Context(
                backend,
                plan.profile,
                shared.prepared,
                shared.calibration,
                shared.verify_set,
                shared.reference,
                shared.kinds,
                Path(tmp),
                progress,
                cache=BuildCache(shared.request.cache) if shared.request.cache else None,
                cache_parts=shared.cache_parts,
                sequences=shared.sequences,
            )
            searching = not shared.request.ignore_gates
            trials = search(ctx, precisions, searching)
            chosen = best(trials)
            if chosen.precision is Precision.INT8:
                with_layer_errors(ctx, chosen)
            timings["compile_and_verify"] = time.perf_counter() - started
            result = result.model_copy(
                update={
                    "precision": chosen.precision,
                    "gate": _gate(plan.profile, chosen.precision),
                    "metrics": chosen.metrics,
                    "size_bytes": chosen.size_bytes,
                    "gate_failures": chosen.failures,
                    "notes": chosen.artifact.notes + _shared_notes(shared),
                    "search": _trail(trials, chosen if chosen.passed else None, plan.precision is None),
                    "cached": chosen.cached,
                    "layer_errors": [e.as_dict() for e in chosen.layer_errors[:LAYER_ERRORS_KEPT]],
                }
            )
            if chosen.failures and not shared.request.ignore_gates:
                return result.model_copy(update={"error": _gate_error(chosen, trials), "size_bytes": None})
            progress(f"{label}: writing {plan.bundle.name}")
            started = time.perf_counter()
            result = _write(plan, shared, chosen, result.model_copy(update={"timings_s": timings}))
            timings["bundle"] = time.perf_counter() - started
    except (BuildError, OutputDirError) as e:
        if isinstance(e.__cause__, MemoryError):  # a converter ran out of memory: see below
            raise e.__cause__ from e
        log = e.log if isinstance(e, ConversionError) else None  # the converter's whole output
        return result.model_copy(update={"error": str(e), "size_bytes": None, "converter_log": log})
    except MemoryError:
        raise  # the machine, not the target: build() stops with exit 2
    except Exception as e:  # a converter's own failure must not stop the other targets
        logger.exception("unexpected failure building %s", label)
        return result.model_copy(update={"error": f"internal error: {type(e).__name__}: {first_line(e)}"})
    return result


def _shared_notes(shared: _Shared) -> list[str]:
    notes = []
    if shared.dequantized is not None:
        notes.append(agreement_note(shared.prepared.dequantized, shared.dequantized))
    if shared.sequences is not None:
        notes.append(shared.sequences.describe(len(shared.verify_set)))
    return notes


def _refuse_unequal_float(plan: _Plan, shared: _Shared) -> None:
    """A quantized source's float graph must agree with the source as its precision's gate asks."""
    if shared.dequantized is None:
        return
    failures = agreement_failures(plan.profile, shared.dequantized)
    if failures:
        raise QuantizedSourceError(
            f"the source is quantized and the float graph it computes differs from it beyond "
            f"the gate ({'; '.join(failures)}): give the float model it was made from",
            sorted(shared.prepared.dequantized),
        )


def _gate_error(chosen: Trial, trials: list[Trial]) -> str:
    message = f"missed the {chosen.precision.value} gate: {'; '.join(chosen.failures)}"
    if len(trials) > 1:
        message = (
            f"no configuration met the gate in {len(trials)} tries; best {chosen.label()}: "
            + "; ".join(chosen.failures)
        )
    layers = chosen.layer_errors or next((t.layer_errors for t in trials if t.layer_errors), [])
    if layers:
        worst = ", ".join(
            f"{e.tensor} ({e.harm_db:.1f} dB lost)"
            if e.drop_db is not None
            else f"{e.tensor} ({e.qdq_db:.1f} dB)"
            for e in layers[:3]
        )
        message += f"; layers that hurt most: {worst}"
    return message


def _write(plan: _Plan, shared: _Shared, chosen: Trial, result: TargetResult) -> TargetResult:
    reasons = [chosen.unverified] if chosen.unverified else []
    if chosen.failures:
        reasons.append("gate missed, bundle written because of --ignore-gates")
    status = BundleStatus.UNVERIFIED if chosen.unverified else BundleStatus.OK
    verification = Verification(
        status=status,
        data=shared.verify_set.origin,
        metrics=chosen.metrics,
        gate=result.gate,
        gate_failures=chosen.failures,
        reason="; ".join(reasons) or None,
    )
    result = result.model_copy(
        update={"status": status, "path": str(plan.bundle), "reason": verification.reason}
    )

    def manifest(files: list[FileEntry]) -> Manifest:
        return _manifest(plan, shared, chosen, verification, files)

    write_bundle(
        plan.bundle,
        artifact_path=chosen.artifact.path,
        model_file=BACKENDS[plan.format].model_file,
        golden=_golden(shared),
        report=result.model_dump(mode="json"),
        make_manifest=manifest,
        replace=shared.request.force,
    )
    return result


def _manifest(
    plan: _Plan, shared: _Shared, chosen: Trial, verification: Verification, files: list[FileEntry]
) -> Manifest:
    request = shared.request
    artifact = chosen.artifact
    return Manifest(
        name=_name(request),
        version=request.version,
        profile=ProfileRef(id=plan.profile.id, sha256=plan.profile.sha256()),
        format=plan.format,
        precision=chosen.precision,
        created_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        files=files,
        model_file=BACKENDS[plan.format].model_file,
        inputs=artifact.inputs,
        outputs=[
            o.model_copy(update={"kind": shared.kinds.get(o.name)})
            for o in _with_shapes(artifact.outputs, shared.reference[0])
        ],
        verification=verification,
        reference_stats=shared.stats,
        max_latency_ms=plan.profile.max_latency_ms,
        runtime_config=artifact.runtime_config,
        tool_versions=_tool_versions(artifact),
        source=shared.source.ref,
        frozen_inputs=_frozen_inputs(shared.prepared),
    )


def _name(request: BuildRequest) -> str:
    return request.name or request.model.stem


def _out_of_memory(error: MemoryError, budget: MemoryBudget) -> ResourceLimitError:
    return ResourceLimitError(
        f"the build ran out of memory ({first_line(error)}) within its memory budget of "
        f"{format_size(budget.limit_bytes)} ({budget.origin}); set a smaller --input-shape, use fewer "
        "samples (--max-samples N), or set --memory-budget to what this machine can give"
    )


def build(request: BuildRequest, progress: Progress | None = None) -> BuildResult:
    """Build one bundle per target. Raises ``UserInputError`` before any work on bad input,
    ``ResourceLimitError`` for input over the memory budget or when memory runs out."""
    say = progress or (lambda _message: None)
    if not request.targets:
        raise OptionError("no target: pass --target PROFILE (see edgec profiles list)")
    if request.max_samples < 1:
        raise OptionError(f"--max-samples must be at least 1, got {request.max_samples}")
    if request.sequence_length is not None and request.sequence_length < 1:
        raise OptionError(f"--sequence-length must be at least 1, got {request.sequence_length}")
    budget = memory_budget(request.memory_budget_bytes)
    ref = identify(request.model)  # a missing model is said first, not as missing calibration
    profiles = [load_profile(t) for t in request.targets]
    plans = _plan(request, profiles, _name(request))
    created = not request.out.exists()
    _check_out_dir(request.out, plans, request.force)
    try:
        try:
            with tempfile.TemporaryDirectory(prefix="edgec-build-") as tmp:
                shared = _prepare_shared(request, ref, Path(tmp), say, budget)
                results = [_build_target(plan, shared, say) for plan in plans]
        except MemoryError as e:  # bundles are written to a temp folder and renamed: none is half-written
            raise _out_of_memory(e, budget) from e
    except UserInputError:
        if created:
            with contextlib.suppress(OSError):
                request.out.rmdir()  # only if still empty
        raise
    logger.info("built %d target(s) on %s", len(results), sys.platform)
    return BuildResult(bundles=results)
