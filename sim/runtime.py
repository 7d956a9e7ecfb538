"""The runtime stand-in: a model that is never loaded, its latency and errors drawn from the
version's behaviour. ``sim_runtime`` gives ``agent.device.DeviceCore`` its hooks."""

from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from agent.device import Runtime
from agent.install import ProbationMonitor
from agent.slot import ModelSlot
from edgec.errors import EdgecError
from edgec.manifest import Manifest, read_manifest
from sim.behaviour import SimBehaviour, SimBehaviours

__all__ = [
    "SimModel",
    "SimProbation",
    "SimSelfTest",
    "SimulatedFailure",
    "sim_golden_inputs",
    "sim_runtime",
    "sim_self_test",
]

logger = logging.getLogger(__name__)


class SimulatedFailure(EdgecError, RuntimeError):
    """A failure the behaviour asked for (a request's error, a load that fails)."""


class SimModel:
    """A ``LoadedModel`` that never loads the model: latency and errors from the behaviour."""

    __slots__ = ("behaviour", "last_latency_s", "manifest")

    def __init__(self, manifest: Manifest, behaviour: SimBehaviour) -> None:
        self.manifest = manifest
        self.behaviour = behaviour
        self.last_latency_s: float | None = None  # what the latest request drew

    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        b = self.behaviour
        latency_s = random.lognormvariate(math.log(b.latency_ms), b.latency_spread) / 1e3
        self.last_latency_s = latency_s
        if b.infer_sleeps:
            time.sleep(latency_s)
        if b.error_rate and random.random() < b.error_rate:
            raise SimulatedFailure(f"simulated error ({b.error_rate:.1%} of requests)")
        return {}

    def close(self) -> None:
        pass


class SimProbation(ProbationMonitor):
    """Probation judges the latency the stand-in drew, not the wall time around the call: with
    a thousand devices on two cores a 5 ms sleep can take 60 ms to come back, which is the
    host's load, not the model's (the error rate and the budget are judged as on a device)."""

    def __init__(self, slot: ModelSlot) -> None:
        super().__init__()
        self._slot = slot
        self._changes = 0  # requests recorded and watches begun, so far
        self._figures: tuple[int, tuple[int, int, float | None]] | None = None  # (at _changes, figures)

    def watch(self, version: str | None) -> None:
        super().watch(version)
        with self._lock:
            self._changes += 1

    def record(self, version: str, latency_s: float, ok: bool) -> None:
        model = self._slot.model
        if isinstance(model, SimModel) and model.manifest.version == version and model.last_latency_s:
            latency_s = model.last_latency_s
        super().record(version, latency_s, ok)
        with self._lock:
            self._changes += 1

    def figures(self) -> tuple[int, int, float | None]:
        """The monitor's figures, computed again only after a change: probation asks every
        50 ms, and recomputing the percentile of an unchanged sample was a tenth of the
        simulator's CPU with a thousand devices (the same figures, computed once)."""
        changes, memo = self._changes, self._figures
        if memo is not None and memo[0] == changes:
            return memo[1]
        figures = super().figures()
        self._figures = (changes, figures)
        return figures


@dataclass(frozen=True)
class SimSelfTest:
    passed: bool
    reason: str | None = None


def sim_self_test(model: SimModel, _golden: Path) -> SimSelfTest:
    if model.behaviour.self_test == "fail":
        version = model.manifest.version
        return SimSelfTest(False, f"simulated self-test failure (behaviour self_test=fail for {version})")
    return SimSelfTest(True)


def sim_golden_inputs(_model: SimModel, _golden: Path) -> list[dict[str, np.ndarray]]:
    return [{}]


def sim_runtime(behaviours: SimBehaviours) -> Runtime:
    """The stand-in runtime: the loader reads the staged bundle's ``manifest.json`` and never
    loads the model; the self-test and errors follow the version's behaviour."""

    def load(folder: Path) -> SimModel:
        manifest = read_manifest(folder)
        behaviour = behaviours.for_version(manifest.version)
        if behaviour.load == "fail":
            raise SimulatedFailure(f"simulated load failure (behaviour load=fail for {manifest.version})")
        return SimModel(manifest, behaviour)

    return Runtime(
        load=load, self_test=sim_self_test, golden_inputs=sim_golden_inputs, probation=SimProbation
    )
