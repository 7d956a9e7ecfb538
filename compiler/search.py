"""Finding an artifact that meets the gate: one trial per configuration, recorded.

A trial compiles one configuration and verifies it. When the default int8 build misses the
profile's gate, the backend's int8 search space is tried in order (per-tensor weights,
entropy and percentile calibration, symmetric activations, int16 activations for TFLite),
then mixed precision: the tensors whose quantization hurts most, measured layer by layer
against the float model, are kept in float, one, two, four... at a time, until the gate
passes. ``--precision auto`` walks int8 (with that search), fp16 and fp32, smallest first.
A configuration the converter refuses is recorded as a failed trial with its reason, and
the search goes on to the next one.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from compiler.backends import Artifact, Backend, CompileOptions, Int8Config
from compiler.cache import BuildCache, CachedTrial, fingerprint
from compiler.kinds import Kinds
from compiler.layer_error import LayerError, layer_errors, nodes_touching
from compiler.prepare import PreparedModel
from compiler.runtime import RuntimeUnavailableError, first_line
from compiler.tensors import SampleSet
from compiler.verify import Outputs, compare, gate_failures, run_samples
from device_profiles import DeviceProfile
from edgec.errors import BuildError
from edgec.manifest import Metrics, Precision

__all__ = ["Context", "Trial", "best", "search", "searched_trial"]

logger = logging.getLogger(__name__)
MAX_FLOAT_FRACTION = 0.5  # mixed precision stops before keeping more than half the tensors in float


@dataclass(frozen=True)
class Context:
    """What every trial of one target shares."""

    backend: Backend
    profile: DeviceProfile
    prepared: PreparedModel
    calibration: SampleSet | None
    verify_set: SampleSet
    reference: Outputs
    kinds: Kinds  # how each output is judged
    workdir: Path
    progress: Callable[[str], None]
    cache: BuildCache | None = None
    cache_parts: dict[str, object] = field(default_factory=dict)  # the build's share of each key


@dataclass
class Trial:
    precision: Precision
    config: Int8Config | None
    artifact: Artifact
    size_bytes: int
    metrics: Metrics | None
    failures: list[str]
    unverified: str | None
    layer_errors: list[LayerError] = field(default_factory=list)
    cache_key: str | None = None
    cached: bool = False  # taken from the build cache, not converted and verified again
    converted: bool = True  # False: the converter failed; ``failures`` says why, no artifact

    @property
    def passed(self) -> bool:
        return not self.failures

    def label(self) -> str:
        if self.config is None or self.precision is not Precision.INT8:
            return self.precision.value
        return f"int8 ({self.config.label()})"

    def as_dict(self, chosen: bool) -> dict[str, object]:
        return {
            "configuration": self.label(),
            "precision": self.precision.value,
            "float_nodes": list(self.config.float_nodes) if self.config else [],
            "size_bytes": self.size_bytes,
            "metrics": self.metrics.model_dump() if self.metrics else None,
            "passed": self.passed,
            "failures": self.failures,
            "chosen": chosen,
        }


def _size(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


def _failures(ctx: Context, precision: Precision, metrics: Metrics | None, size: int) -> list[str]:
    limit = ctx.profile.max_artifact_bytes
    failures = [f"size {size} bytes > {limit}"] if size > limit else []
    if metrics is not None:
        failures = gate_failures(metrics, ctx.profile.gates[precision]) + failures
    return failures


def _cache_key(ctx: Context, precision: Precision, config: Int8Config) -> str:
    spec = ctx.backend.spec
    profile = ctx.profile.model_dump(mode="json", include=set(spec.profile_fields))
    int8 = dataclasses.asdict(config) if precision is Precision.INT8 else None
    return fingerprint(
        {**ctx.cache_parts, "format": spec.format, "precision": precision, "int8": int8, "profile": profile}
    )


def trial(ctx: Context, precision: Precision, config: Int8Config | None = None) -> Trial:
    """Compile one configuration into its own folder and verify it (or take both from the cache)."""
    folder = ctx.workdir / f"trial-{len(list(ctx.workdir.glob('trial-*')))}"
    folder.mkdir(parents=True)
    config = config or ctx.backend.spec.int8_default
    key = _cache_key(ctx, precision, config) if ctx.cache is not None else None
    if ctx.cache is not None and key is not None and (hit := ctx.cache.get(key, folder)):
        record, artifact = hit
        found = Trial(
            precision,
            config,
            artifact,
            record.size_bytes,
            record.metrics,
            _failures(ctx, precision, record.metrics, record.size_bytes),
            record.unverified,
            [LayerError(**e) for e in record.layer_errors or []],
            key,
            cached=True,
        )
        ctx.progress(f"  {found.label()}: reused from the build cache")
        return found
    options = CompileOptions(precision=precision, calibration=ctx.calibration, int8=config)
    artifact = ctx.backend.compile(ctx.prepared, ctx.profile, options, folder)
    size = _size(artifact.path)
    metrics: Metrics | None = None
    unverified: str | None
    try:
        runner = ctx.backend.open(artifact)
    except RuntimeUnavailableError as e:
        unverified = str(e)
    else:
        ctx.progress(f"  verifying on {len(ctx.verify_set)} {ctx.verify_set.origin} samples")
        candidate = run_samples(runner, ctx.verify_set)
        metrics = compare(ctx.reference, candidate, ctx.verify_set.labels, ctx.kinds)
        unverified = artifact.unverified_reason
    if ctx.cache is not None and key is not None:
        ctx.cache.put(key, CachedTrial.of(artifact, size, metrics, unverified), artifact)
    found = Trial(
        precision,
        config,
        artifact,
        size,
        metrics,
        _failures(ctx, precision, metrics, size),
        unverified,
        cache_key=key,
    )
    logger.info("%s: %s", found.label(), "passed" if found.passed else "; ".join(found.failures))
    return found


def searched_trial(ctx: Context, precision: Precision, config: Int8Config) -> Trial:
    """One trial of a search: a configuration the converter refuses is recorded as a failed
    trial with its reason, so the search goes on to the next one."""
    try:
        return trial(ctx, precision, config)
    except BuildError as e:
        reason = first_line(e)
        ctx.progress(f"  {config.label()}: {reason}")
        logger.info("int8 (%s) failed to convert: %s", config.label(), reason)
        placeholder = Artifact(
            format=ctx.backend.spec.format,
            precision=precision,
            path=ctx.workdir,
            inputs=ctx.prepared.inputs,
            outputs=ctx.prepared.outputs,
            source_inputs=ctx.prepared.inputs,
            source_outputs=ctx.prepared.outputs,
        )
        return Trial(
            precision, config, placeholder, 0, None, [f"conversion failed: {reason}"], None, converted=False
        )


def with_layer_errors(ctx: Context, found: Trial) -> Trial:
    """Attach the per-layer error table of a Q/DQ ONNX artifact (for ``edgec explain``)."""
    graph = found.artifact.qdq_graph
    if graph is None or ctx.calibration is None or found.layer_errors:
        return found
    folder = ctx.workdir / f"layers-{id(found)}"
    folder.mkdir(exist_ok=True)
    try:
        found.layer_errors = layer_errors(ctx.prepared.path, graph, ctx.calibration, folder)
        if ctx.cache is not None and found.cache_key is not None:
            ctx.cache.update_layers(found.cache_key, [dataclasses.asdict(e) for e in found.layer_errors])
    except Exception as e:  # a diagnostic: its failure must not fail the build
        logger.warning("per-layer error not measured: %s", first_line(e))
        found.artifact.notes.append(f"per-layer error not measured: {first_line(e)}")
    return found


def _score(t: Trial) -> tuple[bool, float, float]:
    m = t.metrics
    return (t.passed, m.top1_agreement or 0.0 if m else 0.0, m.cosine or 0.0 if m else 0.0)


def best(trials: list[Trial]) -> Trial:
    """The passing trial with the smallest artifact, else the closest to passing."""
    passing = [t for t in trials if t.passed]
    if passing:
        return min(passing, key=lambda t: t.size_bytes)
    return max([t for t in trials if t.converted] or trials, key=_score)


def _search_int8(ctx: Context, trail: list[Trial]) -> None:
    spec = ctx.backend.spec
    for config in spec.int8_search:
        ctx.progress(f"  int8 missed the gate; trying {config.label()}")
        trail.append(searched_trial(ctx, Precision.INT8, config))
        if trail[-1].passed:
            return
    if not spec.mixed_precision:
        return
    base = with_layer_errors(ctx, trail[0])  # the default configuration, measured layer by layer
    ranked = [e.tensor for e in base.layer_errors]
    count = 1
    tried: set[frozenset[str]] = set()
    while count <= max(1, int(len(ranked) * MAX_FLOAT_FRACTION)):
        nodes = nodes_touching(ctx.prepared.model, ranked[:count])
        if frozenset(nodes) in tried:  # more tensors, the same nodes: nothing new to try
            count *= 2
            continue
        tried.add(frozenset(nodes))
        config = dataclasses.replace(base.config or ctx.backend.spec.int8_default, float_nodes=nodes)
        ctx.progress(f"  mixed precision: {count} most sensitive tensor(s) in float ({len(nodes)} nodes)")
        trail.append(searched_trial(ctx, Precision.INT8, config))
        if trail[-1].passed:
            return
        count *= 2


def search(ctx: Context, precisions: list[Precision], searching: bool) -> list[Trial]:
    """Trials for each precision in turn until one passes; int8 searches when ``searching``."""
    trail: list[Trial] = []
    auto = len(precisions) > 1
    for precision in precisions:
        if auto:
            ctx.progress(f"  trying {precision.value}")
        trail.append(trial(ctx, precision))
        if auto and trail[-1].metrics is None:  # the runtime cannot run here: nothing to compare
            fallback = ctx.profile.default_precision
            found = trail[-1] if precision is fallback else trial(ctx, fallback)
            found.artifact.notes.append(
                f"precision auto: {ctx.backend.spec.format.value} cannot run here to compare sizes "
                f"against the gate, so the profile's default ({fallback.value}) was built"
            )
            return [found]
        if not trail[-1].passed and searching and precision is Precision.INT8:
            _search_int8(ctx, trail)
        if any(t.passed for t in trail):
            if auto:
                chosen = best(trail)
                chosen.artifact.notes.append(
                    f"precision auto: {chosen.label()} is the smallest configuration that met the gate"
                )
            break
    return trail
