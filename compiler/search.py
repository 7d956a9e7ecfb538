"""Finding an artifact that meets the gate: one trial per configuration, recorded.

A trial compiles one configuration and verifies it. When the default int8 build misses the
profile's gate, the backend's int8 search space is tried in order (per-tensor weights,
entropy and percentile calibration, symmetric activations, int16 activations for TFLite),
then mixed precision: the tensors whose quantization hurts most, measured layer by layer
against the float model, are kept in float, one, two, four... at a time, until the gate
passes; then, for ONNX Runtime, int16 activations (int8's size, float compute there). When
fp16 misses the gate, the nodes whose float16 error is largest (measured node by node
against the float32 graph, the tensors that leave float16's range first) are kept in float32
the same way, where the backend can keep nodes in float32; where it cannot (TFLite's float16
quantization converts every weight or none), fp32 is built and the reason is noted.
``--precision auto`` walks int8 (with that search), fp16 and fp32, smallest first; for a
profile whose objective is latency, where the build host is the target, it builds every
precision that meets the gate and takes the fastest on this host (``compiler.latency``). A
configuration the converter refuses is recorded as a failed trial with its reason, and the
search goes on to the next one.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import onnx

from compiler.backends import Artifact, Backend, CompileOptions, Int8Config
from compiler.cache import BuildCache, CachedTrial, fingerprint
from compiler.kinds import Kinds
from compiler.latency import not_the_target, time_candidates
from compiler.layer_error import LayerError, layer_errors, nodes_touching
from compiler.prepare import PreparedModel
from compiler.runtime import RuntimeUnavailableError, first_line
from compiler.stateful import Sequences, carry
from compiler.tensors import SampleSet
from compiler.verify import Outputs, compare, gate_failures, run_samples
from device_profiles import DeviceProfile
from device_profiles.model import Objective
from edgec.errors import BuildError
from edgec.manifest import Metrics, Precision

__all__ = ["Context", "Trial", "best", "search", "searched_trial"]

logger = logging.getLogger(__name__)
MAX_FLOAT_FRACTION = 0.5  # mixed precision stops before keeping more than half the tensors
# in float, or every node that holds weights


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
    sequences: Sequences | None = None  # a stateful model: verified carrying its state (compiler.stateful)


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
    fp32_nodes: tuple[str, ...] = ()  # fp16: nodes kept in float32
    latency_ms: float | None = None  # timed on this host (auto, objective latency; compiler.latency)

    @property
    def passed(self) -> bool:
        return not self.failures

    @property
    def float_nodes(self) -> tuple[str, ...]:
        """The nodes this trial keeps out of its reduced precision."""
        if self.precision is Precision.FP16:
            return self.fp32_nodes
        return self.config.float_nodes if self.config and self.precision is Precision.INT8 else ()

    def label(self) -> str:
        if self.precision is Precision.FP16 and self.fp32_nodes:
            return f"fp16 ({len(self.fp32_nodes)} nodes fp32)"
        if self.config is None or self.precision is not Precision.INT8:
            return self.precision.value
        return f"int8 ({self.config.label()})"

    def as_dict(self, chosen: bool) -> dict[str, object]:
        return {
            "configuration": self.label(),
            "precision": self.precision.value,
            "float_nodes": list(self.float_nodes),
            "size_bytes": self.size_bytes,
            "metrics": self.metrics.model_dump() if self.metrics else None,
            "passed": self.passed,
            "failures": self.failures,
            "latency_ms": self.latency_ms,
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


def _cache_key(
    ctx: Context, precision: Precision, config: Int8Config, fp32_nodes: tuple[str, ...] = ()
) -> str:
    spec = ctx.backend.spec
    profile = ctx.profile.model_dump(mode="json", include=set(spec.profile_fields))
    int8 = dataclasses.asdict(config) if precision is Precision.INT8 else None
    parts = {
        **ctx.cache_parts,
        "format": spec.format,
        "precision": precision,
        "int8": int8,
        "profile": profile,
    }
    if precision is Precision.FP16:  # verified with float16 storage emulated (compiler.backends._fp16)
        parts["fp16"] = {"fp32_nodes": list(fp32_nodes), "verified": "float16 storage"}
    return fingerprint(parts)


def trial(
    ctx: Context, precision: Precision, config: Int8Config | None = None, fp32_nodes: tuple[str, ...] = ()
) -> Trial:
    """Compile one configuration into its own folder and verify it (or take both from the cache).
    ``fp32_nodes``: at fp16, the nodes kept in float32."""
    folder = ctx.workdir / f"trial-{len(list(ctx.workdir.glob('trial-*')))}"
    folder.mkdir(parents=True)
    config = config or ctx.backend.spec.int8_default
    key = _cache_key(ctx, precision, config, fp32_nodes) if ctx.cache is not None else None
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
            [LayerError(**{**e, "inputs": tuple(e.get("inputs", ()))}) for e in record.layer_errors or []],
            key,
            cached=True,
            fp32_nodes=fp32_nodes,
        )
        ctx.progress(f"  {found.label()}: reused from the build cache")
        return found
    options = CompileOptions(
        precision=precision, calibration=ctx.calibration, int8=config, fp16_fp32_nodes=fp32_nodes
    )
    artifact = ctx.backend.compile(ctx.prepared, ctx.profile, options, folder)
    size = _size(artifact.path)
    metrics: Metrics | None = None
    unverified: str | None
    try:
        runner = carry(ctx.backend.open(artifact), ctx.sequences)
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
        fp32_nodes=fp32_nodes,
    )
    logger.info("%s: %s", found.label(), "passed" if found.passed else "; ".join(found.failures))
    return found


def searched_trial(
    ctx: Context, precision: Precision, config: Int8Config | None, fp32_nodes: tuple[str, ...] = ()
) -> Trial:
    """One trial of a search: a configuration the converter refuses is recorded as a failed
    trial with its reason, so the search goes on to the next one."""
    try:
        return trial(ctx, precision, config, fp32_nodes=fp32_nodes)
    except BuildError as e:
        reason = first_line(e)
        label = config.label() if config and precision is Precision.INT8 else f"{len(fp32_nodes)} nodes fp32"
        ctx.progress(f"  {label}: {reason}")
        logger.info("%s (%s) failed to convert: %s", precision.value, label, reason)
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
            precision,
            config,
            placeholder,
            0,
            None,
            [f"conversion failed: {reason}"],
            None,
            converted=False,
            fp32_nodes=fp32_nodes,
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
    """The passing trial with the smallest artifact (the fastest, where they were timed), else
    the closest to passing."""
    passing = [t for t in trials if t.passed]
    timed = [t for t in passing if t.latency_ms is not None]
    if timed:
        return min(timed, key=lambda t: (t.latency_ms or 0.0, t.size_bytes))
    if passing:
        return min(passing, key=lambda t: t.size_bytes)
    return max([t for t in trials if t.converted] or trials, key=_score)


def _weighted_nodes(model: onnx.ModelProto) -> set[str]:
    """The nodes that hold weights (convolutions, matrix products): what int8 makes small."""
    weights = {init.name for init in model.graph.initializer}
    return {node.name for node in model.graph.node if any(i in weights for i in node.input[1:2])}


def _search_int8(ctx: Context, trail: list[Trial]) -> None:
    spec = ctx.backend.spec
    for config in spec.int8_search:
        ctx.progress(f"  int8 missed the gate; trying {config.label()}")
        trail.append(searched_trial(ctx, Precision.INT8, config))
        if trail[-1].passed:
            return
    if spec.mixed_precision:
        _search_mixed(ctx, trail)
        if trail[-1].passed:
            return
    for config in spec.int8_after_mixed:
        ctx.progress(f"  int8 missed the gate; trying {config.label()}")
        trail.append(searched_trial(ctx, Precision.INT8, config))
        if trail[-1].passed:
            return


def _search_mixed(ctx: Context, trail: list[Trial]) -> None:
    """Keep the most harmful tensors in float, 1, 2, 4... at a time, until the gate passes."""
    base = with_layer_errors(ctx, trail[0])  # the default configuration, measured layer by layer
    # each harmful tensor with the tensors its node amplifies: both stay in float
    ranked = [(e.tensor, *e.inputs) for e in base.layer_errors]
    count = 1
    tried: set[frozenset[str]] = set()
    weighted = _weighted_nodes(ctx.prepared.model)
    while count <= max(1, int(len(ranked) * MAX_FLOAT_FRACTION)):
        tensors = list(dict.fromkeys(t for group in ranked[:count] for t in group))
        nodes = nodes_touching(ctx.prepared.model, tensors)
        if weighted and weighted <= set(nodes):  # no weights left in int8: int8 in name only
            break
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


def _search_fp16(ctx: Context, trail: list[Trial]) -> None:
    """Keep the nodes with the largest float16 error in float32, as mixed int8 does: every
    tensor that leaves float16's range at once, then one, two, four... tensors ranked by the
    error their producer adds, each with its producer and consumers (``nodes_touching``)."""
    from compiler.backends._fp16 import node_errors

    folder = ctx.workdir / "fp16-errors"
    folder.mkdir(exist_ok=True)
    samples = ctx.calibration if ctx.calibration is not None else ctx.verify_set
    try:
        errors = node_errors(ctx.prepared.path, samples, folder)
    except Exception as e:  # a diagnostic: the fp16 trial already stands on its own
        logger.warning("fp16 error per node not measured: %s", first_line(e))
        trail[-1].artifact.notes.append(f"fp16 error per node not measured: {first_line(e)}")
        return
    ranked = [e.tensor for e in errors]
    missed = "; ".join(trail[-1].failures)
    overflowing = sum(e.overflows for e in errors)
    limit = max(1, int(len(ranked) * MAX_FLOAT_FRACTION))
    if overflowing > limit:  # said in the failures, so the build's error carries it
        trail[-1].failures.append(
            f"{overflowing} of {len(ranked)} tensors leave float16's range (over 65504), more than "
            f"{MAX_FLOAT_FRACTION:.0%} of the graph would stay in float32: build it at fp32"
        )
        return
    count = max(1, overflowing)
    tried: set[frozenset[str]] = set()
    while count <= limit:
        # the same nodes as nodes_touching(ranked[:count]), the worst tensor's first
        nodes = tuple(
            dict.fromkeys(n for t in ranked[:count] for n in nodes_touching(ctx.prepared.model, [t]))
        )
        if not nodes or frozenset(nodes) in tried:  # more tensors, the same nodes: nothing new
            count *= 2
            continue
        tried.add(frozenset(nodes))
        ctx.progress(
            f"  fp16 missed the gate; keeping {count} tensor(s) with the largest fp16 error in "
            f"float32 ({len(nodes)} nodes)"
        )
        trail.append(searched_trial(ctx, Precision.FP16, None, fp32_nodes=nodes))
        worst = ", ".join(e.described() for e in errors[: min(count, 4)])
        trail[-1].artifact.notes.append(
            f"fp16 missed the gate ({missed}); kept in float32: the nodes that make or read the "
            f"{count} tensor(s) with the largest float16 error, worst first: {worst}"
        )
        if trail[-1].passed:
            return
        count *= 2


def _fp16_fallback(ctx: Context, trail: list[Trial]) -> None:
    """fp16 missed the gate on a backend that cannot keep nodes in float32: build fp32, and
    say why, when the profile allows it."""
    fmt = ctx.backend.spec.format.value
    reason = (
        f"{fmt} fp16 cannot keep chosen ops in float32 (its converter turns every float weight to float16)"
    )
    missed = "; ".join(trail[-1].failures)
    if Precision.FP32 not in ctx.profile.precisions or Precision.FP32 not in ctx.backend.spec.precisions:
        trail[-1].artifact.notes.append(f"{reason}, and profile {ctx.profile.id} does not allow fp32")
        return
    ctx.progress(f"  fp16 missed the gate; {reason}: trying fp32")
    found = searched_trial(ctx, Precision.FP32, None)
    trail.append(found)
    verdict = "it met the gate" if found.passed else f"it missed its gate too: {'; '.join(found.failures)}"
    found.artifact.notes.append(f"fp16 missed the gate ({missed}); {reason}, so fp32 was built: {verdict}")


def search(ctx: Context, precisions: list[Precision], searching: bool) -> list[Trial]:
    """Trials for each precision in turn until one passes; int8 and fp16 search when ``searching``."""
    trail: list[Trial] = []
    auto = len(precisions) > 1
    latency = auto and ctx.profile.objective is Objective.LATENCY
    not_timed = not_the_target(ctx.profile, ctx.backend.spec.format) if latency else None
    timed = latency and not_timed is None  # every precision that meets the gate is a candidate
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
        # objective latency: once one precision met the gate, the later ones get a plain trial
        searching = searching and not (timed and any(t.passed for t in trail[:-1]))
        if not trail[-1].passed and searching and precision is Precision.INT8:
            _search_int8(ctx, trail)
        if not trail[-1].passed and searching and precision is Precision.FP16 and trail[-1].metrics:
            if ctx.backend.spec.fp16_fp32_nodes:
                _search_fp16(ctx, trail)
            elif not auto:  # auto tries fp32 next anyway
                _fp16_fallback(ctx, trail)
        if any(t.passed for t in trail) and not timed:
            if auto:
                chosen = best(trail)
                chosen.artifact.notes.append(
                    f"precision auto: {chosen.label()} is the smallest configuration that met the gate"
                    + (f" (objective latency, not timed: {not_timed})" if not_timed else "")
                )
            break
    if timed:
        time_candidates(ctx, trail)
    return trail
