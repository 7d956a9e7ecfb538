"""How a simulated device's stand-in runtime behaves, per model version (``SimBehaviours``)."""

from __future__ import annotations

import json
import logging
import math
import tomllib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from edgec.errors import OptionError
from edgec.reports import DriftVerdict

__all__ = ["SimBehaviour", "SimBehaviours"]

logger = logging.getLogger(__name__)
_Z95, _Z99 = 1.6449, 2.3263  # standard normal quantiles
_TYPICAL_PSI = {DriftVerdict.OK: 0.02, DriftVerdict.WARN: 0.17, DriftVerdict.DRIFT: 0.5}


class SimBehaviour(BaseModel):
    """How a simulated device's stand-in runtime behaves with one model version."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    latency_ms: Annotated[float, Field(gt=0)] = 5.0  # median
    latency_spread: Annotated[float, Field(ge=0, le=3)] = 0.2  # sigma of log latency; 0: constant
    error_rate: Annotated[float, Field(ge=0, le=1)] = 0.0
    requests_per_s: Annotated[float, Field(ge=0)] = 10.0
    # drift, one of three ways (none: "ok"): a verdict, a PSI, or an input mean shifted by
    # this many standard deviations (PSI of two unit normals that far apart ~ shift squared)
    drift: DriftVerdict | None = None
    psi: Annotated[float, Field(ge=0)] | None = None
    input_shift_sd: float | None = None
    self_test: Literal["pass", "fail"] = "pass"
    load: Literal["ok", "fail"] = "ok"
    infer_sleeps: bool = True  # false: infer returns at once (probation then sees ~0 ms)

    @model_validator(mode="after")
    def _one_drift(self) -> SimBehaviour:
        given = [name for name in ("drift", "psi", "input_shift_sd") if getattr(self, name) is not None]
        if len(given) > 1:
            raise ValueError(f"give one of drift, psi and input_shift_sd, not {' and '.join(given)}")
        return self

    @property
    def p95_ms(self) -> float:
        return self.latency_ms * math.exp(_Z95 * self.latency_spread)

    @property
    def p99_ms(self) -> float:
        return self.latency_ms * math.exp(_Z99 * self.latency_spread)

    def expected_psi(self) -> float:
        if self.psi is not None:
            return self.psi
        if self.input_shift_sd is not None:
            return self.input_shift_sd**2
        return _TYPICAL_PSI[self.drift or DriftVerdict.OK]

    def latencies_ms(self, rng: np.random.Generator, count: int) -> np.ndarray:
        if not self.latency_spread:
            return np.full(count, self.latency_ms)
        return rng.lognormal(math.log(self.latency_ms), self.latency_spread, count)


_DRIFT_FIELDS = frozenset({"drift", "psi", "input_shift_sd"})


class SimBehaviours:
    """Behaviours per model version; ``"*"`` applies to every version, and a version's own
    entry overrides the fields it names (its drift field replaces any drift field of ``"*"``).
    Everything is validated when built: a bad entry raises ``OptionError`` naming it."""

    ANY = "*"

    def __init__(self, table: Mapping[str, Mapping[str, Any]] | None = None) -> None:
        self._raw = {str(version): dict(fields) for version, fields in (table or {}).items()}
        self._resolved: dict[str, SimBehaviour] = {}
        for version in [self.ANY, *self._raw]:
            self.for_version(version)

    @classmethod
    def load(cls, path: Path) -> SimBehaviours:
        """A TOML or JSON file of ``{version: {field: value}}``."""
        try:
            text = path.read_text(encoding="utf-8")
            raw = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
        except OSError as e:
            raise OptionError(f"cannot read the behaviour file {path}: {e.strerror}") from e
        except (ValueError, tomllib.TOMLDecodeError) as e:
            raise OptionError(
                f"{path} is not valid {'JSON' if path.suffix == '.json' else 'TOML'}: {e}"
            ) from e
        if not isinstance(raw, dict) or not all(isinstance(v, dict) for v in raw.values()):
            raise OptionError(f'{path}: expected a table per model version, e.g. ["2.0.0"] latency_ms = 8')
        return cls(raw)

    @classmethod
    def parse(cls, specs: Iterable[str], base: SimBehaviours | None = None) -> SimBehaviours:
        """``VERSION:field=value,field=value`` specs (``*`` for every version), over ``base``."""
        table = {version: dict(fields) for version, fields in (base._raw if base else {}).items()}
        for spec in specs:
            version, sep, assignments = spec.partition(":")
            if not sep or not version or not assignments:
                raise OptionError(
                    f"bad behaviour {spec!r}: expected VERSION:field=value,... "
                    "(e.g. 2.0.0:latency_ms=8,error_rate=0.02)"
                )
            fields = table.setdefault(version, {})
            for assignment in assignments.split(","):
                name, eq, value = (part.strip() for part in assignment.partition("="))
                if not eq or not name or not value:
                    raise OptionError(f"bad behaviour {spec!r}: {assignment!r} is not field=value")
                if name in _DRIFT_FIELDS:  # a later drift setting replaces an earlier one
                    for other in _DRIFT_FIELDS:
                        fields.pop(other, None)
                fields[name] = value
        return cls(table)

    def for_version(self, version: str) -> SimBehaviour:
        cached = self._resolved.get(version)
        if cached is not None:
            return cached
        fields = dict(self._raw.get(self.ANY, {}))
        own = self._raw.get(version, {}) if version != self.ANY else {}
        if _DRIFT_FIELDS & own.keys():
            for name in _DRIFT_FIELDS:
                fields.pop(name, None)
        fields.update(own)
        try:
            behaviour = SimBehaviour.model_validate(fields)
        except ValidationError as e:
            first = e.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "behaviour"
            raise OptionError(f"behaviour for version {version}: {where}: {first['msg']}") from e
        self._resolved[version] = behaviour
        return behaviour

    def describe(self) -> list[str]:
        """One line per configured version, as the fleet will use them."""
        lines = []
        for version in [self.ANY, *(v for v in self._raw if v != self.ANY)]:
            b = self.for_version(version)
            drift = f"psi {b.expected_psi():.3g}" if b.drift is None else f"drift {b.drift.value}"
            lines.append(
                f"{version}: latency {b.latency_ms:g} ms (p95 {b.p95_ms:.3g}), errors {b.error_rate:.2%}, "
                f"{b.requests_per_s:g} req/s, {drift}, self-test {b.self_test}, load {b.load}"
            )
        return lines
