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
"""

from __future__ import annotations

import pickle
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from agent._shadow_judge import Judge
from agent.runtime import load_bundle
from edgec.manifest import Manifest

__all__ = ["main"]


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
