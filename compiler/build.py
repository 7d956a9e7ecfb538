"""``edgec build``: source model -> prepared graph -> per target: compile, verify, bundle.

Every check that can fail on bad input runs before any slow work, so a typo costs no
time and leaves nothing behind. A target that fails to convert or misses its gate is
reported with its figures; the other targets are still built.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import platform
import sys
import tempfile
import time
from dataclasses import dataclass
from importlib.metadata import version as dist_version
from pathlib import Path

import numpy as np

import edgec
from compiler.backends import BACKENDS, Artifact, get_backend
from compiler.bundle import bundle_dir_name, write_bundle
from compiler.cache import BuildCache
from compiler.dequantize import agreement_failures
from compiler.limits import (
    MemoryBudget,
    format_size,
    memory_budget,
)
from compiler.memory_fit import measure, memory_failure, memory_refusal
from compiler.prepare import PreparedModel
from compiler.report import BuildResult, TargetResult
from compiler.runtime import first_line
from compiler.search import Context, Trial, best, search, with_layer_errors
from compiler.shared import (
    BuildRequest,
    Progress,
    Shared,
    prepare_shared,
    shared_notes,
    with_shapes,
)
from compiler.source import identify
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
    BundleStatus,
    FileEntry,
    FrozenInput,
    Manifest,
    MemoryPeak,
    Precision,
    ProfileRef,
    TargetFormat,
    Verification,
)

__all__ = ["BuildRequest", "build"]

logger = logging.getLogger(__name__)

GOLDEN_SAMPLES = 8
LAYER_ERRORS_KEPT = 20


@dataclass(frozen=True)
class _Plan:
    profile: DeviceProfile
    format: TargetFormat
    precision: Precision | None  # None: auto
    bundle: Path


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


def _frozen_inputs(prepared: PreparedModel) -> list[FrozenInput]:
    return [
        FrozenInput(
            name=name, dtype=value.dtype.name, shape=list(value.shape), values=value.reshape(-1).tolist()
        )
        for name, value in prepared.frozen.items()
    ]


def _gate(profile: DeviceProfile, precision: Precision) -> dict[str, float]:
    gate = profile.gates[precision].flat()
    gate["max_artifact_bytes"] = float(profile.max_artifact_bytes)
    if profile.model_memory_budget_bytes is not None:
        gate["model_memory_budget_bytes"] = float(profile.model_memory_budget_bytes)
    return gate


def _tool_versions(artifact: Artifact) -> dict[str, str]:
    versions = {
        "edgec": edgec.__version__,
        "python": platform.python_version(),
        "numpy": dist_version("numpy"),
    }
    versions.update(artifact.tool_versions)
    return versions


def _golden(shared: Shared) -> dict[str, np.ndarray]:
    count = min(GOLDEN_SAMPLES, len(shared.verify_set))
    golden = {f"inputs/{k}": v[:count] for k, v in shared.verify_set.arrays.items()}
    for spec in shared.prepared.outputs:
        golden[f"outputs/{spec.name}"] = np.stack([o[spec.name] for o in shared.reference[:count]])
    return golden


def _candidates(plan: _Plan, shared: Shared) -> list[Precision]:
    """The precisions to try: the one asked for, or for ``auto`` the smallest first."""
    if plan.precision is not None:
        return [plan.precision]
    spec = BACKENDS[plan.format]
    order = [Precision.INT8, Precision.FP16, Precision.FP32]
    if shared.calibration is None:
        order.remove(Precision.INT8)
    return [p for p in order if p in plan.profile.precisions and p in spec.precisions]


def _build_target(plan: _Plan, shared: Shared, progress: Progress) -> TargetResult:
    timings: dict[str, float] = {}
    result = _build_timed(plan, shared, progress, timings)
    return result.model_copy(update={"timings_s": {k: round(v, 3) for k, v in timings.items()}})


def _trail(trials: list[Trial], chosen: Trial | None, auto: bool) -> list[dict[str, object]]:
    return [t.as_dict(t is chosen) for t in trials] if len(trials) > 1 or auto else []


def _build_timed(plan: _Plan, shared: Shared, progress: Progress, timings: dict[str, float]) -> TargetResult:
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
            peak: MemoryPeak | None = None
            unmeasured: str | None = "not measured: the artifact missed its gate"
            if chosen.converted and (chosen.passed or shared.request.ignore_gates):
                progress(f"{label}: measuring peak memory")
                started = time.perf_counter()
                peak, unmeasured = measure(chosen.artifact, progress)
                timings["memory"] = time.perf_counter() - started
                over = memory_failure(plan.profile, peak)
                if over:
                    chosen.failures.append(over)
            result = result.model_copy(
                update={
                    "precision": chosen.precision,
                    "gate": _gate(plan.profile, chosen.precision),
                    "metrics": chosen.metrics,
                    "size_bytes": chosen.size_bytes,
                    "gate_failures": chosen.failures,
                    "notes": chosen.artifact.notes + shared_notes(shared),
                    "search": _trail(trials, chosen if chosen.passed else None, plan.precision is None),
                    "cached": chosen.cached,
                    "layer_errors": [e.as_dict() for e in chosen.layer_errors[:LAYER_ERRORS_KEPT]],
                    "memory": peak,
                    "memory_note": unmeasured,
                }
            )
            if chosen.failures and not shared.request.ignore_gates:
                named = f"{plan.profile.id} {plan.format.value} {chosen.precision.value}"
                error = memory_refusal(named, peak, chosen.failures) or _gate_error(chosen, trials)
                return result.model_copy(update={"error": error, "size_bytes": None})
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


def _refuse_unequal_float(plan: _Plan, shared: Shared) -> None:
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


def _write(plan: _Plan, shared: Shared, chosen: Trial, result: TargetResult) -> TargetResult:
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
        return _manifest(plan, shared, chosen, verification, files, memory=result.memory)

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
    plan: _Plan,
    shared: Shared,
    chosen: Trial,
    verification: Verification,
    files: list[FileEntry],
    *,
    memory: MemoryPeak | None,
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
            for o in with_shapes(artifact.outputs, shared.reference[0])
        ],
        verification=verification,
        reference_stats=shared.stats,
        max_latency_ms=plan.profile.max_latency_ms,
        runtime_config=artifact.runtime_config,
        tool_versions=_tool_versions(artifact),
        source=shared.source.ref,
        frozen_inputs=_frozen_inputs(shared.prepared),
        memory=memory,
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
                shared = prepare_shared(request, ref, Path(tmp), say, budget)
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
