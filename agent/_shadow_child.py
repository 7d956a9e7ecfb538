"""The child process of a shadow run (``agent.shadow``): the candidate's inference and judging.

``main`` is the process's target (spawned: it loads nothing of its parent's). It loads the
candidate bundle itself from its folder with one intra-op thread, builds the ``Judge`` from
both manifests (JSON), says ``("ready", None)`` (or ``("error", TEXT)`` and ends), then answers
each batch of sampled requests its parent sends (``send_bytes`` of a pickled list of
``(inputs, serving_outputs)``) with one pickled list of results, in order:

- ``("ok", infer_s, agrees, compare_error)``: the candidate's inference time, per compared
  output (in ``Judge.kinds`` order) whether it agrees, and the comparison's failure, if any
  (then every output counts as disagreeing);
- ``("error", TEXT)``: the candidate raised, one line;
- ``("over_budget",)``: skipped, the process over its CPU budget.

The budget is kept as a bucket of CPU time, filled at ``cpu_budget`` seconds a second of wall
time and holding at most one window's share (``cpu_budget * window_s``, so that an idle spell
banks no more), from which the process's CPU time (``time.process_time``: the candidate's
inference, the comparison and the batches' decoding) is taken; a request that finds it empty
is skipped.
An empty message ends the process.

``CandidateProcess`` is the parent's side: it starts the child, waits until it has loaded the
candidate, hands it batches and reads the results, and ends it.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import pickle
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from agent._shadow_judge import Judge
from agent.runtime import load_bundle
from edgec.errors import EdgecError
from edgec.manifest import Manifest

__all__ = ["CandidateProcess", "ChildFailed", "main", "one_line"]

_POLL_S = 0.1  # how often a wait for the child looks whether it is still alive
_START_S = 60.0  # how long the child may take to load the candidate
_EXIT_S = 2.0  # how long a child asked to end gets before it is terminated


def one_line(e: BaseException) -> str:
    return (str(e).strip() or type(e).__name__).splitlines()[0][:300]


def main(
    conn: Connection, folder: str, *, candidate: str, serving: str, cpu_budget: float, window_s: float
) -> None:
    try:
        model = load_bundle(Path(folder), threads=1)
        judge = Judge(Manifest.model_validate_json(candidate), Manifest.model_validate_json(serving))
    except Exception as e:
        conn.send(("error", one_line(e)))
        return
    conn.send(("ready", None))
    names = list(judge.kinds)
    cap = cpu_budget * window_s  # CPU seconds an idle spell may bank: one window's share
    credit, wall_then, cpu_then = 0.0, time.perf_counter(), time.process_time()
    while True:
        try:
            data = conn.recv_bytes()
        except EOFError:  # the parent is gone
            return
        if not data:
            return
        results: list[tuple[Any, ...]] = []
        for inputs, outputs in pickle.loads(data):
            wall, cpu = time.perf_counter(), time.process_time()
            credit = min(cap, credit + cpu_budget * (wall - wall_then)) - (cpu - cpu_then)
            wall_then, cpu_then = wall, cpu
            if credit < 0:
                results.append(("over_budget",))
                continue
            started = time.perf_counter()
            try:
                found = model.infer(inputs)
            except Exception as e:  # the candidate's failure is a figure
                results.append(("error", one_line(e)))
                continue
            infer_s = time.perf_counter() - started
            try:
                agrees = judge.agreement(outputs, found)
                results.append(("ok", infer_s, [bool(agrees[n]) for n in names], None))
            except Exception as e:  # counted as no agreement; the parent logs it
                results.append(("ok", infer_s, [False] * len(names), one_line(e)))
        conn.send_bytes(pickle.dumps(results, protocol=pickle.HIGHEST_PROTOCOL))


class ChildFailed(EdgecError):
    """The child process could not start, cannot run the candidate, or ended under the run."""


class CandidateProcess:
    """The parent's side of the child: ``CandidateProcess(folder, ...)`` starts it and waits
    until it has loaded the candidate (at most ``_START_S``); ``send`` hands it one batch,
    ``answered`` (without waiting) or ``results`` (waiting) return its results; ``close`` ends
    it. ``ChildFailed`` says why it cannot go on."""

    def __init__(
        self, folder: Path, *, candidate: Manifest, serving: Manifest, cpu_budget: float, window_s: float
    ) -> None:
        context = multiprocessing.get_context("spawn")  # nothing of the serving process's state
        self._conn, child_conn = context.Pipe()
        self._process = context.Process(
            target=main,
            args=(child_conn, str(folder)),
            kwargs={
                "candidate": candidate.model_dump_json(),
                "serving": serving.model_dump_json(),
                "cpu_budget": cpu_budget,
                "window_s": window_s,
            },
            name=f"shadow {candidate.name}:{candidate.version}",
            daemon=True,
        )
        try:
            try:
                self._process.start()
            except OSError as e:  # no process to be had
                raise ChildFailed(f"cannot start the candidate's process: {e}") from e
            finally:
                child_conn.close()
            self._receive(_START_S, f"load the candidate within {_START_S:.0f} s")
        except ChildFailed:
            self.close()
            raise

    def send(self, batch: list[tuple[dict[str, Any], dict[str, Any]]]) -> None:
        """Hand the child one batch of ``(inputs, serving outputs)`` pairs to run and judge."""
        with contextlib.suppress(OSError):  # the child is gone: the next read says how
            self._conn.send_bytes(pickle.dumps(batch, protocol=pickle.HIGHEST_PROTOCOL))

    def answered(self, wait_s: float = 0.0) -> list[Any] | None:
        """The child's results for the batch sent last, in order, if they are in (waiting at
        most ``wait_s`` for them); None if not yet. ``ChildFailed`` if the child has ended."""
        if not self._conn.poll(wait_s) and self._process.is_alive():
            return None
        results: list[Any] = self._read()
        return results

    def results(self, timeout_s: float) -> list[Any]:
        """The child's results for the batch sent last, waiting for them at most ``timeout_s``."""
        results: list[Any] = self._receive(timeout_s, f"answer within {timeout_s:.0f} s")
        return results

    def _receive(self, timeout_s: float, doing: str) -> Any:
        """The child's next message; ``ChildFailed`` when it ends, says it cannot run, or is
        silent for ``timeout_s``."""
        until = time.monotonic() + timeout_s
        while not self._conn.poll(min(_POLL_S, timeout_s)):
            if not self._process.is_alive():
                break
            if time.monotonic() >= until:
                raise ChildFailed(f"the candidate's process did not {doing}")
        return self._read()

    def _read(self) -> Any:
        try:
            data = self._conn.recv_bytes()
        except (EOFError, OSError):
            self._process.join(_EXIT_S)
            raise ChildFailed(
                f"the candidate's process ended unexpectedly (exit code {self._process.exitcode})"
            ) from None
        message = pickle.loads(data)
        if isinstance(message, tuple) and message[0] == "error":
            raise ChildFailed(f"the candidate's process cannot run it: {message[1]}")
        return message

    def close(self) -> None:
        """Ask the child to end; terminate it if it does not within ``_EXIT_S``."""
        process = self._process
        if process.pid is not None:
            with contextlib.suppress(OSError):  # it is gone already
                self._conn.send_bytes(b"")
            process.join(_EXIT_S)
            if process.is_alive():
                process.terminate()
                process.join(_EXIT_S)
            process.close()
        self._conn.close()
