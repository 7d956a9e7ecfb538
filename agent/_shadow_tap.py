"""The agent's one point where the serving path meets a shadow run (``agent.shadow``)."""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np

from edgec.errors import ConflictError

if TYPE_CHECKING:
    from agent.shadow import ShadowRun

__all__ = ["ShadowBusyError", "ShadowTap"]


class ShadowBusyError(ConflictError):
    """A shadow run is already attached to the agent's tap (one at a time)."""


class ShadowTap:
    """The agent's one shadow slot: the serving callback offers every request here, and the
    run attached, if any, takes its share."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._run: ShadowRun | None = None

    @property
    def run(self) -> ShadowRun | None:
        return self._run

    def attach(self, run: ShadowRun) -> None:
        """Feed ``run``; ``ShadowBusyError`` while another is attached."""
        with self._lock:
            if self._run is not None and self._run is not run:
                raise ShadowBusyError(
                    f"a shadow run of {self._run.release} is in progress: wait for it to end or stop it first"
                )
            self._run = run

    def detach(self, run: ShadowRun) -> None:
        """Stop feeding ``run`` (nothing if another is attached)."""
        with self._lock:
            if self._run is run:
                self._run = None

    def offer(
        self,
        version: str,
        infer_s: float,
        ok: bool,
        inputs: Mapping[str, np.ndarray],
        outputs: Mapping[str, np.ndarray] | None,
    ) -> None:
        """``agent.serving.OnInfer``: forwards to the run attached, if any."""
        run = self._run
        if run is not None:
            run.offer(version, infer_s, ok, inputs, outputs)
