"""The serving slot: which model answers requests, swapped atomically under load.

A request takes a lease on the model that is current when it starts and keeps that model
until it finishes, so in-flight requests end on the old session while new ones go to the new
one the instant it is swapped in. A model that has been swapped out is closed once its last
lease ends (``drained``).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Protocol

import numpy as np

from edgec.errors import EdgecError
from edgec.manifest import Manifest

__all__ = ["LoadedModel", "ModelSlot", "NoModelError"]

logger = logging.getLogger(__name__)


class NoModelError(EdgecError):
    """No model is installed yet: nobody's fault, the device waits for its first install
    (the inference API answers 503)."""


class LoadedModel(Protocol):
    """A bundle loaded into a runtime session (see ``agent.runtime``)."""

    manifest: Manifest

    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def close(self) -> None: ...


class _Holder:
    __slots__ = ("drained", "leases", "model", "retired")

    def __init__(self, model: LoadedModel) -> None:
        self.model = model
        self.leases = 0
        self.retired = False
        self.drained = threading.Event()


class ModelSlot:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._current: _Holder | None = None

    @property
    def model(self) -> LoadedModel | None:
        holder = self._current
        return holder.model if holder else None

    @contextmanager
    def lease(self) -> Iterator[LoadedModel]:
        """The current model, kept alive (not closed) until the ``with`` block ends."""
        with self._lock:
            holder = self._current
            if holder is None:
                raise NoModelError("no model is installed yet")
            holder.leases += 1
        try:
            yield holder.model
        finally:
            with self._lock:
                holder.leases -= 1
                done = holder.retired and holder.leases == 0
            if done:
                self._release(holder)

    def infer(self, inputs: dict[str, np.ndarray]) -> tuple[LoadedModel, dict[str, np.ndarray]]:
        """Run one request on the current model: ``(the model that answered, its outputs)``."""
        with self.lease() as model:
            return model, model.infer(inputs)

    def swap(self, model: LoadedModel) -> threading.Event | None:
        """Make ``model`` current; returns an event set when the previous one has drained
        (``None`` if there was none). The previous model is closed once it drains."""
        new = _Holder(model)
        with self._lock:
            old, self._current = self._current, new
            if old is None:
                return None
            old.retired = True
            done = old.leases == 0
        if done:
            self._release(old)
        return old.drained

    def clear(self) -> None:
        """Serve nothing (a first install that failed probation has nothing to go back to)."""
        with self._lock:
            old, self._current = self._current, None
            if old is None:
                return
            old.retired = True
            done = old.leases == 0
        if done:
            self._release(old)

    @staticmethod
    def _release(holder: _Holder) -> None:
        try:
            holder.model.close()
        except Exception:  # a runtime's close must not break serving
            logger.exception("closing %s failed", holder.model.manifest.version)
        holder.drained.set()
