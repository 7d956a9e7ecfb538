"""Stateful models: state in, state out, carried over sequences of steps.

A model that takes back its own state (an RNN's ``h0``/``hn``, Silero-VAD's ``state``/``stateN``,
a decoder's ``past_*``/``present_*``) is deployed by feeding each step's state output into the
next step's state input. Run one sample at a time from the zeros a data file holds, it is
never seen as it runs: int8 would calibrate the state input on zeros, and verification would
compare steps that all start from zero state, where the error that builds up over steps is
never measured.

**State pairs**: an input and an output of the same shape and dtype whose names pair up
(``state``/``stateN``, ``h0``/``hn``, ``c0``/``cn``, ``X_in``/``X_out``, ``past_X``/``present_X``,
``past_key_values.X``/``present.X``), found only while the model keeps at least one input that
is not a state. ``--state INPUT=OUTPUT`` (repeat) names them instead of the names.

**Sequences**: the samples of a data file are the steps of sequences, in order. By default
the whole file is one sequence; ``--sequence-length N`` cuts it into sequences of N steps
(the last may be shorter); ``--sequence-length 1`` runs every sample alone from the state it
holds, as before. A sequence starts from the state its first sample holds (zeros where the
data file leaves the state input out, and for generated data); each later step is fed the
state the model put out at the step before.

The build runs the source model this way once and writes the states it fed into the data
(calibration and verification sets): int8 calibrates on the states the float model really
carries, the golden vectors hold each step's state, and every artifact is verified running
the same sequences carrying its own state, against the source's outputs.
"""

from __future__ import annotations

import logging
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from compiler.runtime import Runner
from compiler.tensors import SampleSet
from compiler.verify import Outputs, run_samples
from edgec.errors import OptionError
from edgec.manifest import OutputKind, TensorSpec

__all__ = [
    "CarriedState",
    "Sequences",
    "StatePair",
    "carry",
    "find_sequences",
    "parse_states",
    "run_carrying",
    "state_kinds",
    "stored_inputs",
    "with_zero_states",
]

logger = logging.getLogger(__name__)

# how an output's name follows from its state input's name: whole-name suffixes, then
# (old, new) swaps of a suffix and of a prefix
_ADDED = ("N", "n", "_out", "_new", "_next")
_SUFFIX_SWAPS = (
    ("_in", "_out"),
    ("In", "Out"),
    ("_input", "_output"),
    ("0", "n"),
    ("0", "N"),
    ("_prev", "_next"),
)
_PREFIX_SWAPS = (("past_key_values", "present"), ("past", "present"), ("in_", "out_"), ("prev_", "next_"))


@dataclass(frozen=True)
class StatePair:
    input: str
    output: str


@dataclass(frozen=True)
class Sequences:
    """How a stateful model runs over data: its state pairs, and where each sequence starts."""

    pairs: tuple[StatePair, ...]
    length: int | None = None  # steps per sequence; None: all the data is one sequence

    def starts_at(self, step: int) -> bool:
        return step == 0 or (self.length is not None and step % self.length == 0)

    def counted(self, steps: int) -> tuple[int, int, int]:
        """(sequences, steps in each, steps in the last) for ``steps`` samples."""
        length = steps if self.length is None else min(self.length, steps)
        count = -(-steps // length) if length else 0
        return count, length, steps - (count - 1) * length if count else 0

    def describe(self, steps: int) -> str:
        count, length, last = self.counted(steps)
        plural = "s" if count != 1 else ""
        shape = f"{count} sequence{plural} of {length} step{'s' if length != 1 else ''}"
        if last != length:
            shape += f" (the last of {last})"
        carried = ", ".join(f"{p.output} -> {p.input}" for p in self.pairs)
        return f"stateful: verified over {shape}, state carried step to step ({carried})"

    def key(self) -> dict[str, object]:
        """What the figures depend on, for the build cache."""
        return {"pairs": [[p.input, p.output] for p in self.pairs], "length": self.length}


def parse_states(specs: Sequence[str]) -> dict[str, str]:
    """``["h0=hn", "c0=cn"]`` -> ``{"h0": "hn", "c0": "cn"}`` (input -> output). Raises OptionError."""
    states: dict[str, str] = {}
    for spec in specs:
        name, sep, output = spec.partition("=")
        name, output = name.strip(), output.strip()
        if not sep or not name or not output:
            raise OptionError(f"--state {spec!r} is not INPUT=OUTPUT (e.g. --state state=stateN)")
        if name in states:
            raise OptionError(f"--state gives the input {name!r} twice")
        states[name] = output
    if len(set(states.values())) != len(states):
        raise OptionError("--state names the same output for two inputs; each state input has its own output")
    return states


def _partners(name: str) -> list[str]:
    """The output names that would carry input ``name``'s state."""
    found = [name + added for added in _ADDED]
    found += [
        name[: -len(old)] + new for old, new in _SUFFIX_SWAPS if name.endswith(old) and len(name) > len(old)
    ]
    found += [
        new + name[len(old) :] for old, new in _PREFIX_SWAPS if name.startswith(old) and len(name) > len(old)
    ]
    return found


def _fits(a: TensorSpec, b: TensorSpec) -> bool:
    """Same dtype and shape, a dimension shape inference left unknown (-1) matching any."""
    if a.dtype != b.dtype or len(a.shape) != len(b.shape):
        return False
    return all(x == y or x < 0 or y < 0 for x, y in zip(a.shape, b.shape, strict=True))


def _named(
    inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec], given: Mapping[str, str]
) -> list[StatePair]:
    ins = {s.name: s for s in inputs}
    outs = {s.name: s for s in outputs}
    pairs = []
    for name, output in given.items():
        if name not in ins:
            raise OptionError(
                f"--state {name}={output}: {name!r} is not an input of the model; its inputs are "
                + ", ".join(map(repr, ins))
            )
        if output not in outs:
            raise OptionError(
                f"--state {name}={output}: {output!r} is not an output of the model; its outputs are "
                + ", ".join(map(repr, outs))
            )
        a, b = ins[name], outs[output]
        if not _fits(a, b):
            raise OptionError(
                f"--state {name}={output}: the input is {a.dtype} {a.shape}, the output {b.dtype} {b.shape}; "
                "a state output must have its input's shape and dtype"
            )
        pairs.append(StatePair(name, output))
    if len(pairs) == len(ins):
        raise OptionError("--state names every input of the model as a state; one input must take the data")
    return pairs


def _detected(inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec]) -> list[StatePair]:
    outs = {s.name: s for s in outputs}
    pairs: list[StatePair] = []
    taken: set[str] = set()
    for spec in inputs:
        for candidate in _partners(spec.name):
            if candidate in outs and candidate not in taken and _fits(spec, outs[candidate]):
                pairs.append(StatePair(spec.name, candidate))
                taken.add(candidate)
                break
    if len(pairs) == len(inputs):  # every input a state: an image-to-image model (x_in -> x_out)
        return []
    return pairs


def find_sequences(
    inputs: Sequence[TensorSpec],
    outputs: Sequence[TensorSpec],
    given: Mapping[str, str],
    length: int | None = None,
) -> Sequences | None:
    """The model's state pairs (``given`` with ``--state``, else found by name) and how data
    is cut into sequences; None for a stateless model. Raises OptionError."""
    if length is not None and length < 1:
        raise OptionError(f"--sequence-length must be at least 1, got {length}")
    pairs = _named(inputs, outputs, given) if given else _detected(inputs, outputs)
    if not pairs:
        if length is not None:
            raise OptionError(
                "--sequence-length is for stateful models, and no input/output state pair was found "
                "by name; name one with --state INPUT=OUTPUT"
            )
        return None
    found = Sequences(tuple(pairs), length)
    logger.info("state pairs: %s", ", ".join(f"{p.input}/{p.output}" for p in pairs))
    return found


class CarriedState:
    """A runner that carries the state from step to step, over one pass through a sample set
    (one wrapper per pass): at a sequence's first step the state input is fed as the sample
    holds it (zeros with ``zero_start``), at every other step the state the model put out at
    the step before. ``fed`` keeps what each step was fed."""

    def __init__(self, runner: Runner, sequences: Sequences, zero_start: bool = False) -> None:
        self._runner = runner
        self._sequences = sequences
        self._zero_start = zero_start
        self._step = 0
        self._carried: dict[str, np.ndarray] = {}
        self.fed: dict[str, list[np.ndarray]] = {p.input: [] for p in sequences.pairs}

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self._sequences.starts_at(self._step):
            state = {p.input: np.asarray(feeds[p.input]) for p in self._sequences.pairs}
            if self._zero_start:
                state = {name: np.zeros_like(value) for name, value in state.items()}
        else:
            state = self._carried
        self._step += 1
        outputs = self._runner.run({**feeds, **state})
        for pair in self._sequences.pairs:
            self.fed[pair.input].append(state[pair.input])
            want = np.asarray(feeds[pair.input])
            # a runtime may drop axes of length 1 or hand back another float type
            self._carried[pair.input] = (
                np.asarray(outputs[pair.output]).reshape(want.shape).astype(want.dtype)
            )
        return outputs


def state_kinds(sequences: Sequences | None) -> dict[str, OutputKind]:
    """State outputs are judged as dense vectors (cosine, PSNR), never as class scores."""
    return {} if sequences is None else {p.output: OutputKind.DENSE for p in sequences.pairs}


def carry(runner: Runner, sequences: Sequences | None) -> Runner:
    """``runner`` carrying state over one pass through a sample set; itself for a stateless model."""
    return runner if sequences is None else CarriedState(runner, sequences)


def run_carrying(
    runner: Runner, samples: SampleSet, sequences: Sequences | None
) -> tuple[Outputs, SampleSet]:
    """Run ``samples`` as sequences carrying the state; return the outputs and the samples with
    each step's state input replaced by the state it was fed (a stateless model: as given)."""
    if sequences is None:
        return run_samples(runner, samples), samples
    carried = CarriedState(runner, sequences, zero_start=samples.origin == "generated")
    outputs = run_samples(carried, samples)
    arrays = dict(samples.arrays)
    for name, states in carried.fed.items():
        arrays[name] = np.stack(states).reshape(arrays[name].shape).astype(arrays[name].dtype)
    return outputs, SampleSet(samples.origin, arrays, samples.labels)


def _keys(path: Path) -> set[str] | None:
    """The array names a data file or folder holds; None where it cannot tell (the loader
    then reports what is wrong with the file)."""
    try:
        if path.is_dir():
            return {p.stem for p in path.glob("*.npy")}
        with zipfile.ZipFile(path) as archive:
            return {n[: -len(".npy")] for n in archive.namelist() if n.endswith(".npy")}
    except (OSError, zipfile.BadZipFile):
        return None


def stored_inputs(path: Path, inputs: Sequence[TensorSpec], sequences: Sequences | None) -> list[TensorSpec]:
    """The inputs a data file must hold: all but the state inputs it leaves out."""
    if sequences is None:
        return list(inputs)
    keys = _keys(path)
    states = {p.input for p in sequences.pairs}
    if keys is None:
        return list(inputs)
    left_out = [s for s in inputs if s.name in states and s.name not in keys]
    if left_out:
        logger.info(
            "%s holds no %s: each sequence starts from zeros", path, ", ".join(s.name for s in left_out)
        )
    return [s for s in inputs if s not in left_out]


def with_zero_states(samples: SampleSet, inputs: Sequence[TensorSpec]) -> SampleSet:
    """``samples`` with zeros for the inputs it lacks (state inputs a data file left out)."""
    missing = [s for s in inputs if s.name not in samples.arrays]
    if not missing:
        return samples
    count = len(samples)
    arrays = dict(samples.arrays)
    for spec in missing:
        arrays[spec.name] = np.zeros((count, *spec.shape), np.dtype(spec.dtype))
    return SampleSet(samples.origin, {s.name: arrays[s.name] for s in inputs}, samples.labels)
