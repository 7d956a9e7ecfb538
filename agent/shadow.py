"""Shadow evaluation: a candidate model beside the serving one, on a share of live requests.

A ``ShadowRun`` holds a loaded candidate and the manifest of the model being served. The
serving path hands it every answered request (``offer``: the inputs, the serving model's
outputs and its inference time), and it picks a share of them (``ShadowPlan.sample``, one
in N by a counter, so the same traffic always picks the same requests) to run on the
candidate and compare. Answers always come from the serving model: ``offer`` only counts, and
puts a reference to the request's arrays (which nothing changes after the answer) into a
bounded queue without waiting; a full queue drops the request and counts it (``dropped``).

A candidate loaded from a bundle (``agent.runtime.RuntimeModel``) runs in a child process
(``agent._shadow_child``, spawned when the run starts; the constructor waits until it has
loaded the bundle itself, with one intra-op thread, at most a minute), so that its
inference and the judging take neither the serving process's CPU nor its GIL. A feeder
thread hands the child the requests sampled since its last look as one batch, once a tick
(``_TICK_S``), and counts the answers to that batch at its next look: one wake-up of the
serving process a tick while requests are sampled (another when the queue half fills before
the tick ends), none while none are. A child that cannot load the
candidate, or that dies (a runtime's crash), ends the run ("failed", ``last_error`` says how)
and leaves serving as it was. Any other candidate (a ``LoadedModel`` with no folder) runs on
a worker thread of this process, one request at a time, as before.

Each output is judged by its kind with the figures the build's gate uses
(``agent._shadow_judge``); a request agrees when every output both models give agrees.

The candidate may use ``cpu_budget`` of one core. In a child process: its process CPU time
against wall time, as a bucket holding at most one window's share (see
``agent._shadow_child``). On a worker thread: the thread's CPU time (``time.thread_time``, the
candidate's inference and the comparison) against wall time, counted afresh each window so
that an idle spell does not bank CPU for a later burst (load the candidate with one intra-op
thread so that its work is on the worker's thread and counted). A sampled request taken while
over budget is skipped (``over_budget``). Every ``window_s`` the run hands the window's figures
to ``on_window`` (the last window when the run ends, with ``done``). A run ends after
``duration_s`` (counted from when the candidate is loaded), after ``requests`` run on the
candidate (compared or failed: a candidate that always fails still ends), or when stopped.

Latencies are kept for at most ``MAX_LATENCIES`` requests (a reservoir, pairs of the
candidate's and the serving model's time on the same request), per run and per window.
The serving callback (``agent.serving.OnInfer``) feeds a ``ShadowTap`` (``agent._shadow_tap``),
which forwards to the run attached, if any.
"""

from __future__ import annotations

import collections
import logging
import queue
import random
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import numpy as np

from agent._shadow_child import CandidateProcess, ChildFailed, one_line
from agent._shadow_figures import MAX_LATENCIES, Counts, Reservoir, ShadowFigures, iso, percentiles
from agent._shadow_judge import Judge, ShadowMismatchError
from agent._shadow_plan import PlanClock, ShadowPlan
from agent._shadow_tap import ShadowBusyError, ShadowTap
from agent.runtime import RuntimeModel
from agent.slot import LoadedModel
from edgec.manifest import Manifest

__all__ = [
    "MAX_LATENCIES",
    "ShadowBusyError",
    "ShadowFigures",
    "ShadowMismatchError",
    "ShadowPlan",
    "ShadowRun",
    "ShadowTap",
]

logger = logging.getLogger(__name__)

_POLL_S = 0.1  # how often the idle worker looks at the clock and the stop flag
_STOP_WAIT_S = 10.0  # how long close() and a stopped wait() give the worker to finish a request
_TICK_S = 0.1  # how often the feeder hands the child process the requests sampled since
_ANSWER_S = 60.0  # how long the child may take to answer a batch (and 1 s more per request)


class _Sample(NamedTuple):
    inputs: Mapping[str, np.ndarray]
    outputs: Mapping[str, np.ndarray]
    infer_s: float


def _send(child: CandidateProcess, batch: list[_Sample]) -> None:
    """Hand ``batch`` to the child: each request's inputs and the serving model's outputs."""
    child.send([(dict(x.inputs), dict(x.outputs)) for x in batch])


# --------------------------------------------------------------------------- the run


class ShadowRun:
    """One candidate in shadow beside the serving model; starts its child process (waiting
    until it has loaded the candidate) or its worker thread at once.

    ``offer`` is the request path's (cheap, never blocks, never raises); ``figures`` the totals
    so far; ``wait`` blocks until the plan is met (or ``stop`` is set, which ends the run) and
    returns the totals; ``close`` ends the run. The candidate stays open: its owner closes it.
    Raises ``ShadowMismatchError`` when the candidate cannot be judged against ``serving``.
    """

    def __init__(
        self,
        candidate: LoadedModel,
        serving: Manifest,
        plan: ShadowPlan,
        on_window: Callable[[ShadowFigures], None] | None = None,
    ) -> None:
        self.candidate = candidate
        self.plan = plan
        self.release = f"{candidate.manifest.name}:{candidate.manifest.version}"
        self.serving = f"{serving.name}:{serving.version}"
        self._serving_version = serving.version
        self._serving_manifest = serving
        self._judge = Judge(candidate.manifest, serving)
        self._on_window = on_window
        self._queue: queue.Queue[_Sample] = queue.Queue(plan.queue)  # the in-thread worker's
        # a candidate loaded from a bundle runs in a child process, fed in batches from _pending
        self._in_child = isinstance(candidate, RuntimeModel)
        self._pending: collections.deque[_Sample] = collections.deque()
        self._wake_at = max(1, plan.queue // 2)  # pending samples that wake the feeder early
        self._wake = threading.Event()
        self._idle = False  # the feeder sleeps until a request is sampled
        self._offer_lock = threading.Lock()
        self._lock = threading.Lock()
        self._eligible = 0  # answered requests the sample picks from
        self._counts = Counts(list(self._judge.kinds))
        self._rng = random.Random(0)  # the reservoirs' picks: the same traffic keeps the same requests
        self._latencies = Reservoir(self._rng)
        self._window_latencies = Reservoir(self._rng)
        self._last_error: str | None = None
        self._window_error: str | None = None
        self._started = time.time()
        self._ended: float | None = None
        self._window_counts = self._counts.copy()  # the worker's: where the open window starts
        self._window_started = self._started
        self._reason: str | None = None
        self._stop = threading.Event()
        self._done = threading.Event()
        if self._in_child:
            self._thread = threading.Thread(
                target=self._feed, args=self._start_child(), name=f"shadow {self.release}", daemon=True
            )
        else:
            self._thread = threading.Thread(target=self._work, name=f"shadow {self.release}", daemon=True)
        self._thread.start()

    # -- the request path --------------------------------------------------------------------
    def offer(
        self,
        version: str,
        infer_s: float,
        ok: bool,
        inputs: Mapping[str, np.ndarray],
        outputs: Mapping[str, np.ndarray] | None,
    ) -> None:
        """One answered request of the serving model; picked for the candidate or only counted.
        A request answered by another model (a swap during the run) is not counted."""
        try:
            if version != self._serving_version:
                return
            sample = self.plan.sample
            with self._offer_lock:
                if self._reason is not None:  # ended: its last window is counted
                    return
                counts = self._counts
                counts.offered += 1
                if not ok or outputs is None:
                    return
                self._eligible += 1
                n = self._eligible
                if int(n * sample) == int((n - 1) * sample):
                    return
                counts.sampled += 1
                if self._in_child:
                    if len(self._pending) >= self.plan.queue:
                        counts.dropped += 1
                        return
                    self._pending.append(_Sample(inputs, outputs, infer_s))
                    waiting = len(self._pending)  # wake the feeder if it sleeps, or the queue half fills
                    if waiting != self._wake_at and not (waiting == 1 and self._idle):
                        return
            if self._in_child:
                self._wake.set()
                return
            try:
                self._queue.put_nowait(_Sample(inputs, outputs, infer_s))
            except queue.Full:
                with self._offer_lock:
                    counts.dropped += 1
        except Exception:  # a shadow run must never break serving
            logger.exception("shadow %s: offer failed", self.release)

    # -- the worker ------------------------------------------------------------------------
    def _work(self) -> None:
        try:
            reason = self._serve_plan()
        except Exception:  # a bug: the run ends, and says so, rather than leave its waiters waiting
            logger.exception("shadow %s: the worker failed", self.release)
            reason = "failed"
        self._finish(reason)

    def _serve_plan(self) -> str:
        """Run sampled requests on the candidate until the plan is met; why it ended."""
        plan = self.plan
        clock = PlanClock(plan)
        wall_since, cpu_since = time.perf_counter(), time.thread_time()
        while True:
            now = time.monotonic()
            if ended := self._plan_met(clock, now):
                return ended
            if clock.window_due(now):
                self._close_window()
                wall_since, cpu_since = time.perf_counter(), time.thread_time()
            try:
                sample = self._queue.get(timeout=max(0.0, min(_POLL_S, clock.wake() - now)))
            except queue.Empty:
                continue
            used = time.thread_time() - cpu_since
            if used > plan.cpu_budget * (time.perf_counter() - wall_since):
                with self._lock:
                    self._counts.over_budget += 1
                continue
            self._run_one(sample)

    def _plan_met(self, clock: PlanClock, now: float) -> str | None:
        """Why the run ends at ``now``, if it does: stopped, its duration or its requests."""
        if self._stop.is_set():
            return "stopped"
        if clock.deadline is not None and now >= clock.deadline:
            return "duration"
        if self._still_needed() == 0:
            return "requests"
        return None

    def _still_needed(self, in_flight: int = 0) -> int | None:
        """How many more requests the plan needs run (besides ``in_flight``); None: no count."""
        if self.plan.requests is None:
            return None
        return max(0, self.plan.requests - self._counts.compared - self._counts.errors - in_flight)

    def _run_one(self, sample: _Sample) -> None:
        started = time.perf_counter()
        try:
            found = self.candidate.infer(dict(sample.inputs))
        except Exception as e:  # the candidate's failure is a figure, not the worker's end
            self._count_error(one_line(e))
            return
        infer_s = time.perf_counter() - started
        try:
            agrees = self._judge.agreement(sample.outputs, found)
        except Exception:  # a comparison that fails on these values: logged, counted as no agreement
            logger.exception("shadow %s: comparing outputs failed", self.release)
            agrees = dict.fromkeys(self._judge.kinds, False)
        self._count_compared(sample, infer_s, agrees)

    def _count_error(self, text: str) -> None:
        with self._lock:
            self._counts.errors += 1
            self._last_error = self._window_error = text

    def _count_compared(self, sample: _Sample, infer_s: float, agrees: Mapping[str, bool]) -> None:
        with self._lock:
            counts = self._counts
            counts.compared += 1
            counts.agreed += all(agrees.values())
            for name, agreed in agrees.items():
                counts.outputs[name] += agreed
            self._latencies.add((infer_s, sample.infer_s))
            self._window_latencies.add((infer_s, sample.infer_s))

    # -- the feeder of the child process --------------------------------------------------
    def _start_child(self) -> tuple[CandidateProcess | None, str | None]:
        """The child process, once it has loaded the candidate, or why it cannot run."""
        candidate = self.candidate
        assert isinstance(candidate, RuntimeModel)
        try:
            child = CandidateProcess(
                candidate.folder,
                candidate=candidate.manifest,
                serving=self._serving_manifest,
                cpu_budget=self.plan.cpu_budget,
                window_s=self.plan.window_s,
            )
        except ChildFailed as e:
            return None, str(e)
        return child, None

    def _feed(self, child: CandidateProcess | None, error: str | None) -> None:
        try:
            if child is None:
                raise ChildFailed(error or "the candidate's process did not start")
            reason = self._serve_child(child)
        except ChildFailed as e:
            logger.error("shadow %s: %s", self.release, e)
            with self._lock:
                self._last_error = self._window_error = str(e)
            reason = "failed"
        except Exception:  # a bug: the run ends, and says so, rather than leave its waiters waiting
            logger.exception("shadow %s: the feeder failed", self.release)
            reason = "failed"
        finally:
            if child is not None:
                child.close()
        self._finish(reason)

    def _serve_child(self, child: CandidateProcess) -> str:
        """Hand the sampled requests to the child in batches until the plan is met; why it ended.

        One batch at a time is with the child. The feeder wakes once a tick: it counts the
        answers to the batch it sent before, if they are in, and sends the requests gathered
        since as the next batch. It wakes early when the queue is half full (and then, if the
        child still holds a batch, waits for its answers), and sleeps while nothing is sampled."""
        clock, wake = PlanClock(self.plan), self._wake
        sent: list[_Sample] = []  # the batch the child holds
        answer_by = 0.0
        while True:
            wake.clear()
            now = time.monotonic()
            if sent and (results := child.answered()) is not None:
                self._count_results(sent, results)
                sent = []
            elif sent and now > answer_by:
                raise ChildFailed(f"the candidate's process did not answer {len(sent)} requests in time")
            if ended := self._plan_met(clock, now):
                self._last_answers(child, sent, _STOP_WAIT_S / 2 if ended == "stopped" else _ANSWER_S)
                return ended
            if clock.window_due(now):
                self._close_window()
            with self._offer_lock:
                batch = []
                if not sent:
                    batch = list(self._pending)
                    self._pending.clear()
                waiting = len(self._pending)
                self._idle = not sent and not batch
            if (needed := self._still_needed()) is not None:  # the plan's last requests: no more
                del batch[needed:]
            if batch:
                _send(child, batch)
                sent, answer_by = batch, now + _ANSWER_S + len(batch)
            until = clock.wake()
            if self._idle:  # nothing sampled: sleep until a request is, a window ends or the plan
                wake.wait(max(0.0, until - now))
            elif sent and waiting >= self._wake_at:  # the queue fills: take the answers as they come
                if (results := child.answered(max(0.0, min(_TICK_S, until - now)))) is not None:
                    self._count_results(sent, results)
                    sent = []
            else:
                wake.wait(max(0.0, min(_TICK_S, until - now)))
            self._idle = False

    def _last_answers(self, child: CandidateProcess, sent: list[_Sample], wait_s: float) -> None:
        """Count the answers to the batch the child holds and to the requests sampled since
        (as many as the plan still needs), waiting at most ``wait_s`` for them in all."""
        until = time.monotonic() + wait_s
        with self._offer_lock:
            rest = list(self._pending)
            self._pending.clear()
        if (needed := self._still_needed(len(sent))) is not None:
            del rest[needed:]
        if sent:
            self._count_results(sent, child.results(max(_POLL_S, until - time.monotonic())))
        if rest:
            _send(child, rest)
            self._count_results(rest, child.results(max(_POLL_S, until - time.monotonic())))

    def _count_results(self, batch: list[_Sample], results: list[Any]) -> None:
        """Count the child's answers to ``batch`` (see ``agent._shadow_child``)."""
        for sample, result in zip(batch, results, strict=True):
            if result[0] == "ok":
                _, infer_s, agrees, compare_error = result
                if compare_error is not None:
                    logger.error("shadow %s: comparing outputs failed: %s", self.release, compare_error)
                self._count_compared(sample, infer_s, dict(zip(self._judge.kinds, agrees, strict=True)))
            elif result[0] == "error":
                self._count_error(result[1])
            else:
                with self._lock:
                    self._counts.over_budget += 1

    def _snapshot(self) -> Counts:
        with self._offer_lock, self._lock:
            return self._counts.copy()

    def _close_window(self, now: float | None = None) -> None:
        """Hand the window's figures to ``on_window`` and start the next window."""
        now = time.time() if now is None else now
        counts = self._snapshot()
        with self._lock:
            latencies, self._window_latencies = self._window_latencies, Reservoir(self._rng)
            error, self._window_error = self._window_error, None
        since, started = self._window_counts, self._window_started
        self._window_counts, self._window_started = counts, now
        if self._on_window is not None:
            window = self._figures(counts.minus(since), latencies.pairs, started, now, error)
            try:
                self._on_window(window)
            except Exception:  # the callback's failure must not end the run
                logger.exception("shadow %s: on_window failed", self.release)

    def _finish(self, reason: str) -> None:
        ended = time.time()
        with self._offer_lock, self._lock:  # no request is counted after this
            self._reason = reason
            self._ended = ended
        self._close_window(ended)
        self._done.set()
        totals = self.figures()
        logger.info(
            "shadow %s beside %s ended (%s): %d compared, agreement %s, %d errors",
            self.release,
            self.serving,
            reason,
            totals.compared,
            "-" if totals.agreement is None else f"{totals.agreement:.4f}",
            totals.errors,
        )

    # -- figures ---------------------------------------------------------------------------
    def _figures(
        self,
        counts: Counts,
        pairs: list[tuple[float, float]],
        started: float,
        ended: float,
        error: str | None,
    ) -> ShadowFigures:
        compared = counts.compared
        candidate = percentiles([c for c, _ in pairs])
        serving = percentiles([s for _, s in pairs])
        return ShadowFigures(
            release=self.release,
            serving=self.serving,
            started_at=iso(started),
            ended_at=iso(ended),
            offered=counts.offered,
            sampled=counts.sampled,
            compared=compared,
            dropped=counts.dropped,
            over_budget=counts.over_budget,
            errors=counts.errors,
            agreement=counts.agreed / compared if compared else None,
            outputs={k: v / compared for k, v in counts.outputs.items()} if compared else {},
            p50_ms=candidate[0],
            p95_ms=candidate[1],
            p99_ms=candidate[2],
            serving_p50_ms=serving[0],
            serving_p95_ms=serving[1],
            serving_p99_ms=serving[2],
            done=self._reason is not None,
            reason=self._reason,
            last_error=error,
        )

    def figures(self) -> ShadowFigures:
        """The run's totals so far (final once it is done)."""
        counts = self._snapshot()
        with self._lock:
            pairs = list(self._latencies.pairs)
            ended = self._ended if self._ended is not None else time.time()
            error = self._last_error
        return self._figures(counts, pairs, self._started, ended, error)

    @property
    def isolated(self) -> bool:
        """The candidate runs in a child process, which loaded it itself: its owner may close
        the copy in this process as soon as the run is made."""
        return self._in_child

    @property
    def done(self) -> bool:
        """Whether the run has ended and handed over its last window."""
        return self._done.is_set()

    def wait(self, stop: threading.Event | None = None) -> ShadowFigures:
        """Block until the plan is met, or until ``stop`` is set (which ends the run); the totals."""
        while not self._done.wait(_POLL_S):
            if stop is not None and stop.is_set():
                self._stop.set()
                self._wake.set()
                self._done.wait(_STOP_WAIT_S)
                break
        return self.figures()

    def close(self) -> None:
        """End the run (``reason`` "stopped" unless it had ended) and wait for the worker to
        finish the request it is on (at most ``_STOP_WAIT_S``). Leaves the candidate open."""
        self._stop.set()
        self._wake.set()
        if self._thread is not threading.current_thread():
            self._thread.join(_STOP_WAIT_S)
