"""A shadow run's plan (``ShadowPlan``: how long, how much, how often) and its clock."""

from __future__ import annotations

import time
from dataclasses import dataclass

from edgec.errors import OptionError

__all__ = ["PlanClock", "ShadowPlan"]


@dataclass(frozen=True)
class ShadowPlan:
    """How long a shadow run lasts and what it may take (see ``agent.shadow``)."""

    duration_s: float | None = None  # stop after this long ...
    requests: int | None = None  # ... or after this many requests run on the candidate, whichever first
    sample: float = 0.1  # share of served requests also run on the candidate
    cpu_budget: float = 0.5  # the candidate may use at most this share of one core
    window_s: float = 10.0  # a window of figures is handed to on_window this often
    queue: int = 8  # sampled requests waiting for the candidate; more are dropped (counted)

    def __post_init__(self) -> None:
        if self.duration_s is None and self.requests is None:
            raise OptionError("a shadow plan needs a duration or a request count (or both)")
        if self.duration_s is not None and not self.duration_s > 0:
            raise OptionError(f"shadow duration must be > 0 s, got {self.duration_s}")
        if self.requests is not None and self.requests < 1:
            raise OptionError(f"shadow request count must be >= 1, got {self.requests}")
        if not 0.0 < self.sample <= 1.0:
            raise OptionError(f"shadow sample must be a share in (0, 1], got {self.sample}")
        if not 0.0 < self.cpu_budget <= 1.0:
            raise OptionError(
                f"shadow CPU budget must be a share of one core in (0, 1], got {self.cpu_budget}"
            )
        if not self.window_s > 0:
            raise OptionError(f"shadow window must be > 0 s, got {self.window_s}")
        if self.queue < 1:
            raise OptionError(f"shadow queue must hold at least 1 request, got {self.queue}")


class PlanClock:
    """A run's times from its start: its deadline, if it has a duration, and its windows."""

    def __init__(self, plan: ShadowPlan) -> None:
        start = time.monotonic()
        self.window_s = plan.window_s
        self.deadline = start + plan.duration_s if plan.duration_s is not None else None
        self.next_window = start + plan.window_s

    def window_due(self, now: float) -> bool:
        """Whether a window ended by ``now`` (the next one starts at the following boundary)."""
        if now < self.next_window:
            return False
        while self.next_window <= now:
            self.next_window += self.window_s
        return True

    def wake(self) -> float:
        """When the loop must look again at the latest: the next window's end or the deadline."""
        return min(self.next_window, self.deadline) if self.deadline is not None else self.next_window
