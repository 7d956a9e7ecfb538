"""What every target of one build shares, computed once: the source imported and prepared,
the calibration and verification samples (bounded by the memory budget), the source's
reference outputs on them (carried over sequences for a stateful model), each output's kind,
the reference statistics, and the parts of the build cache's key."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as dist_version
from pathlib import Path
from typing import Literal

import numpy as np

import edgec
from compiler.cache import default_cache_dir
from compiler.dequantize import agreement_note, described
from compiler.kinds import Kinds, check_kind_names, detect_kinds
from compiler.limits import (
    DEFAULT_MAX_SAMPLES,
    MemoryBudget,
    describe_tensors,
    format_size,
    sample_bytes,
)
from compiler.prepare import PreparedModel, prepare
from compiler.runtime import OnnxRuntimeRunner, Runner
from compiler.source import SourceModel, import_source
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
from edgec.manifest import (
    SCHEMA_VERSION,
    Metrics,
    OutputKind,
    Precision,
    SourceRef,
    TargetFormat,
    TensorSpec,
    TensorStats,
    sha256_file,
)

__all__ = [
    "BuildRequest",
    "Progress",
    "Shared",
    "installed_versions",
    "prepare_shared",
    "shared_notes",
    "with_shapes",
]

logger = logging.getLogger(__name__)

GENERATED_SAMPLES = 32  # when the user gives no data (fewer if --max-samples is lower)
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


@dataclass
class Shared:
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


def with_shapes(specs: list[TensorSpec], sample: Mapping[str, np.ndarray]) -> list[TensorSpec]:
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


def prepare_shared(
    request: BuildRequest, ref: SourceRef, workdir: Path, progress: Progress, budget: MemoryBudget
) -> Shared:
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
    prepared = dataclasses.replace(prepared, outputs=with_shapes(prepared.outputs, reference[0]))
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
        "tools": installed_versions(),
    }
    if sequences is not None:
        cache_parts["sequences"] = sequences.key()
    dequantized = compare(quantized, reference, None, kinds) if quantized is not None else None
    return Shared(
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


def installed_versions() -> dict[str, str]:
    """Versions of every converter and runtime that can shape an artifact (cache key)."""
    found = {}
    for package in CONVERTERS:
        try:
            found[package] = dist_version(package)
        except PackageNotFoundError:
            continue
    return found


def shared_notes(shared: Shared) -> list[str]:
    notes = []
    if shared.dequantized is not None:
        notes.append(agreement_note(shared.prepared.dequantized, shared.dequantized))
    if shared.sequences is not None:
        notes.append(shared.sequences.describe(len(shared.verify_set)))
    return notes
