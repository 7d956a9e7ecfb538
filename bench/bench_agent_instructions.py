"""Instructions per request of the agent's v2 endpoint, this tree against a baseline commit (callgrind).

Run:  .venv/bin/python bench/bench_agent_instructions.py [--baseline 1a6018d] [--requests 1600]
          [--warmup 320] [--runs 2] [--cells json:1,json:16,binary:1,binary:16] [--idle 5]
          [--no-strace]
      (needs valgrind: apt-get install valgrind; without it the script says so in one line and
      exits 0. No extra beyond the agent's.)

Why: requests/s on a shared machine move by more than the 5% a change to the HTTP layer must
stay within (bench_agent_serving.py --baseline: identical processes differ by up to 13% on the
2-core VM it ran on). The instructions a server executes per request do not depend on what
else runs: they are the measure of its CPU cost that a busy machine cannot blur.

How: the two sides are the ones ``bench_agent_serving.py --baseline`` serves, with its code
(``baseline_tree``, ``build_bundle``, its request encoders and its ``--serve agent`` entry):
``baseline`` (REF's tree, from a git worktree under build/bench/) and ``this tree``, each an
``InferenceServer`` inline (``workers=0``) on the digits x86-64-cpu bundle (built by REF's
compiler), one eval sample per request. Each side runs under ``valgrind --tool=callgrind
--separate-threads=yes`` (``PYTHONHASHSEED=0``), ``--runs`` times, each run a fresh process.
For each cell (request kind x concurrency) a run opens the connections, sends ``--warmup``
requests over them, zeroes the counters (``callgrind_control --zero``), sends ``--requests``
more (each connection its share, one at a time, keep-alive), dumps the counters
(``callgrind_control --dump``) and closes the connections. Instructions per request = the
instructions executed between the zero and the dump / the requests: on the event loop's thread
(the one that calls ``epoll_wait``; it parses, runs the model and answers) and in the whole
process (every thread). Connections are opened and closed outside the counted window. Each
answer's status is checked, and the first one of each cell compared with ``session.run``.

Counts are deterministic up to what the clock decides: at concurrency 16, how many requests
one wake of the event loop finds waiting, and work done once a second whatever the load (this
tree's HTTP layer sweeps its connections' deadlines on the event loop; onnxruntime's threads
wake now and then). Under valgrind a request takes 100 to 200 times longer than without it
(about 25 ms against 0.15 ms here), so that work weighs as much more per request. Two
measures of it: ``--runs`` 2 (each run a fresh process; both counts are reported) and, after
each cell, the same connections left idle for ``--idle`` seconds with the counters running:
the event loop's instructions per second then, times the cell's window, per request, is the
clock's share.

Syscalls per request (optional, ``strace -f -c`` attached to a server run without valgrind, the
same cells and warm-up): what a request costs the kernel, which callgrind does not count.

Writes ``bench/results/agent_instructions.json`` and ``.md``. About 16 minutes on 2 cores with
the defaults (each callgrind run about 3.5 minutes; the callgrind dumps stay in
build/bench/agent_instructions/callgrind/ for ``callgrind_annotate``).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
from bench._common import ResponseFramer  # noqa: E402
from bench.bench_agent_serving import (  # noqa: E402
    baseline_tree,
    binary_request,
    build_bundle,
    decode_logits,
    git,
    json_request,
    loadavg,
    machine,
    session_for,
)

RESULTS = ROOT / "bench" / "results"
WORK = ROOT / "build" / "bench" / "agent_instructions"
SERVE = ROOT / "bench" / "bench_agent_serving.py"
SIDES = ("baseline", "this tree")
CELLS = ("json:1", "json:16", "binary:1", "binary:16")
START_S = 300  # python, numpy and onnxruntime imported under valgrind: about 30 s here
REQUEST_S = 600  # one cell's requests under valgrind


class _Connection(asyncio.Protocol):
    """One keep-alive connection that sends ``request`` again as soon as each answer is in,
    ``count`` times."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.framer = ResponseFramer()
        self.request = b""
        self.left = 0
        self.errors = 0
        self.first_body: bytes | None = None
        self.done: asyncio.Future[None] | None = None
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def send(self, request: bytes, count: int) -> asyncio.Future[None]:
        assert self.transport is not None
        self.request, self.left = request, count
        self.done = asyncio.get_running_loop().create_future()
        self.transport.write(request)
        return self.done

    def data_received(self, data: bytes) -> None:
        for status, body in self.framer.feed(data):
            self.errors += status != 200
            if self.first_body is None:
                self.first_body = body
            self.left -= 1
            assert self.transport is not None
            if self.left:
                self.transport.write(self.request)
            elif self.done is not None and not self.done.done():
                self.done.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.done is not None and not self.done.done():
            self.done.set_exception(ConnectionError(f"the server closed a connection: {exc}"))
        if not self.lost.done():
            self.lost.set_result(None)


async def _open(port: int, clients: int) -> list[_Connection]:
    loop = asyncio.get_running_loop()
    connections = []
    for _ in range(clients):
        _transport, connection = await loop.create_connection(_Connection, "127.0.0.1", port)
        connections.append(connection)
    return connections


async def _send(connections: list[_Connection], request: bytes, per_connection: int) -> None:
    await asyncio.wait_for(asyncio.gather(*(c.send(request, per_connection) for c in connections)), REQUEST_S)


async def _close(connections: list[_Connection]) -> None:
    for connection in connections:
        assert connection.transport is not None
        connection.transport.close()
    await asyncio.wait_for(asyncio.gather(*(c.lost for c in connections)), 30)


class _Cell:
    """A request kind at a concurrency: ``json:16``."""

    def __init__(self, text: str) -> None:
        kind, _, clients = text.partition(":")
        if kind not in ("json", "binary") or not clients.isdigit() or int(clients) < 1:
            raise SystemExit(f"--cells: {text!r} is not KIND:CONCURRENCY with KIND json or binary")
        self.kind, self.clients = kind, int(clients)

    def per_connection(self, total: int) -> int:
        return max(1, total // self.clients)

    def __str__(self) -> str:
        return f"{self.kind}:{self.clients}"


@dataclass(frozen=True)
class _Setup:
    """What every run serves and sends."""

    commands: dict[str, list[str]]  # per side: bench_agent_serving.py --serve's arguments
    bundle: Path
    requests: dict[str, bytes]  # per request kind
    expected: np.ndarray  # session.run's answer
    cells: list[_Cell]
    warmup: int
    counted: int
    idle_s: float


class _Server:
    """``bench_agent_serving.py --serve agent`` for one side, under ``prefix`` (valgrind) or not."""

    def __init__(self, command: list[str], bundle: Path, prefix: list[str], log: Path) -> None:
        serve = [sys.executable, str(SERVE), "--serve", *command, "--bundle", str(bundle)]
        env = dict(os.environ, PYTHONHASHSEED="0")
        with log.open("w") as err:
            self.process = subprocess.Popen(
                [*prefix, *serve],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
                env=env,
            )
        assert self.process.stdout is not None
        ready, _, _ = select.select([self.process.stdout], [], [], START_S)
        line = self.process.stdout.readline() if ready else ""  # PORT n, once the model is loaded
        if not line.startswith("PORT "):
            self.process.kill()
            self.stop()
            raise SystemExit(
                f"the server did not start within {START_S} s ({' '.join(prefix[:2])}); its log: {log}"
            )
        self.port = int(line.split()[1])
        self.served_from = line.split(maxsplit=2)[2].strip()

    def stop(self) -> None:
        if self.process.stdin:
            self.process.stdin.close()
        try:
            self.process.wait(120)  # callgrind writes its last dump on exit
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def callgrind_control(*args: str) -> None:
    done = subprocess.run(["callgrind_control", *args], capture_output=True, text=True, check=False)
    if done.returncode != 0 or "OK" not in done.stdout:
        raise SystemExit(f"callgrind_control {' '.join(args)} failed: {(done.stdout + done.stderr).strip()}")


_SUMMARY = re.compile(r"^summary: (\d+)", re.M)


def dumped_counts(out: Path, part: int) -> tuple[dict[str, int], str | None]:
    """The instructions each thread executed since the last zero, from dump ``part``
    (``OUT.PART-TID``; ``summary`` is the thread's own counter, ``totals`` only what its cost
    lines add up to), and the event loop's thread: the one that waits in ``epoll_wait`` (None
    unless exactly one does). valgrind numbers threads in the order they start, which varies
    between runs."""
    counts: dict[str, int] = {}
    loops = []
    for path in sorted(out.parent.glob(f"{out.name}.{part}-*")):
        text = path.read_text(errors="replace")
        found = _SUMMARY.search(text)
        if found is None:
            raise SystemExit(f"{path}: no summary line in a callgrind dump")
        thread = path.name.rsplit("-", 1)[1]
        counts[thread] = int(found.group(1))
        if "epoll_wait" in text:
            loops.append(thread)
    if not counts:
        raise SystemExit(f"callgrind wrote no dump {out}.{part}-*")
    return counts, loops[0] if len(loops) == 1 else None


def callgrind_run(setup: _Setup, side: str, run: int) -> tuple[dict[str, dict[str, Any]], str]:
    """One process of ``side`` under callgrind: each cell's instructions per request."""
    tag = f"{side.replace(' ', '-')}-{run}"
    out = WORK / "callgrind" / f"{tag}.cg"
    prefix = ["valgrind", "--tool=callgrind", "--separate-threads=yes", f"--callgrind-out-file={out}"]
    started = time.perf_counter()
    server = _Server(setup.commands[side], setup.bundle, prefix, WORK / f"valgrind-{tag}.log")
    pid = str(server.process.pid)
    results: dict[str, dict[str, Any]] = {}
    try:
        print(
            f"{side} run {run}: started under callgrind in {time.perf_counter() - started:.0f} s", flush=True
        )
        with asyncio.Runner() as runner:
            for index, cell in enumerate(setup.cells):
                connections = runner.run(_open(server.port, cell.clients))
                runner.run(_send(connections, setup.requests[cell.kind], cell.per_connection(setup.warmup)))
                callgrind_control("--zero", pid)
                window = time.perf_counter()
                per_connection = cell.per_connection(setup.counted)
                runner.run(_send(connections, setup.requests[cell.kind], per_connection))
                time.sleep(0.2)  # the loop back in epoll_wait after the last answer
                callgrind_control(f"--dump={cell}", pid)
                window = time.perf_counter() - window
                # the same connections, idle: what the clock alone makes the server do
                callgrind_control("--zero", pid)
                idle = time.perf_counter()
                time.sleep(setup.idle_s)
                callgrind_control(f"--dump={cell}-idle", pid)
                idle = time.perf_counter() - idle
                runner.run(_close(connections))
                counted = per_connection * cell.clients
                errors = sum(c.errors for c in connections)
                body = connections[0].first_body
                assert body is not None
                diff = float(np.abs(decode_logits(body) - setup.expected).max())
                if errors or diff > 1e-4:
                    raise SystemExit(f"{side} {cell}: {errors} answers not 200, answer off by {diff:.1e}")
                counts, loop_thread = dumped_counts(out, 2 * index + 1)
                if loop_thread is None:
                    raise SystemExit(f"{side} {cell}: no thread or several call epoll_wait in {out}")
                idle_counts, _ = dumped_counts(out, 2 * index + 2)
                loop = counts[loop_thread]
                idle_loop_per_s = idle_counts.get(loop_thread, 0) / idle
                results[str(cell)] = {
                    "requests": counted,
                    "event_loop_per_request": loop / counted,
                    "process_per_request": sum(counts.values()) / counted,
                    "window_s": round(window, 1),
                    "idle_event_loop_per_s": idle_loop_per_s,
                    "idle_process_per_s": sum(idle_counts.values()) / idle,
                    "clock_event_loop_per_request": idle_loop_per_s * window / counted,
                    "answer_max_abs_diff": diff,
                }
                print(
                    f"  {cell!s:9s} {counted} requests in {window:.0f} s: event loop "
                    f"{loop / counted:,.0f} instructions/request, whole process "
                    f"{sum(counts.values()) / counted:,.0f}; idle event loop {idle_loop_per_s:,.0f}/s",
                    flush=True,
                )
    finally:
        server.stop()
    return results, server.served_from


def strace_counts(setup: _Setup, side: str) -> dict[str, Any] | None:
    """Syscalls per request per cell, ``strace -f -c`` attached to a server without valgrind;
    None where it cannot attach."""
    server = _Server(setup.commands[side], setup.bundle, [], WORK / f"strace-{side.replace(' ', '-')}.log")
    results: dict[str, Any] = {}
    try:
        with asyncio.Runner() as runner:
            for cell in setup.cells:
                connections = runner.run(_open(server.port, cell.clients))
                runner.run(_send(connections, setup.requests[cell.kind], cell.per_connection(setup.warmup)))
                out = WORK / "strace.txt"
                tracer = subprocess.Popen(
                    ["strace", "-f", "-c", "-o", str(out), "-p", str(server.process.pid)],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE,
                    text=True,
                )
                assert tracer.stderr is not None
                first = tracer.stderr.readline()  # "strace: Process N attached" once it is
                if "attached" not in first:
                    tracer.kill()
                    tracer.wait()
                    print(f"strace could not attach ({first.strip()}): no syscall counts", flush=True)
                    return None
                time.sleep(0.5)  # every thread attached
                per_connection = cell.per_connection(setup.counted)
                runner.run(_send(connections, setup.requests[cell.kind], per_connection))
                tracer.send_signal(signal.SIGINT)
                tracer.communicate(timeout=30)
                runner.run(_close(connections))
                counted = per_connection * cell.clients
                calls = parse_strace_summary(out.read_text())
                results[str(cell)] = {
                    "requests": counted,
                    "per_request": round(calls.pop("total", 0) / counted, 3),
                    "by_syscall": {name: round(n / counted, 3) for name, n in calls.items()},
                }
    finally:
        server.stop()
    return results


def parse_strace_summary(text: str) -> dict[str, int]:
    """``strace -c``'s table: calls per syscall, and ``total``."""
    calls: dict[str, int] = {}
    for line in text.splitlines():
        fields = line.split()
        if len(fields) >= 5 and fields[3].isdigit() and not line.startswith("%"):
            calls[fields[-1]] = int(fields[3])
    return calls


def tool_versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {}
    for tool, flag in (("valgrind", "--version"), ("strace", "-V")):
        if shutil.which(tool) is None:
            found[tool] = None
            continue
        done = subprocess.run([tool, flag], capture_output=True, text=True, check=False)
        found[tool] = (done.stdout or done.stderr).splitlines()[0].strip() if done.returncode == 0 else None
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--baseline", default="1a6018d", metavar="REF", help="git ref (default 1a6018d)")
    parser.add_argument(
        "--requests",
        type=int,
        default=1600,
        help="counted requests per cell (default 1600, split over connections)",
    )
    parser.add_argument(
        "--warmup",
        type=int,
        default=320,
        help="requests before counting, per cell (default 320; in the first few dozen onnxruntime "
        "still works on threads of its own)",
    )
    parser.add_argument(
        "--runs", type=int, default=2, help="callgrind runs per side, each a fresh process (default 2)"
    )
    parser.add_argument(
        "--cells", default=",".join(CELLS), help=f"KIND:CONCURRENCY,... (default {','.join(CELLS)})"
    )
    parser.add_argument(
        "--idle",
        type=float,
        default=5.0,
        help="seconds counted with the connections idle, per cell (default 5)",
    )
    parser.add_argument("--no-strace", action="store_true", help="leave out the syscall counts")
    parser.add_argument("--bundles", type=Path, default=WORK / "bundles")
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    cells = [_Cell(text) for text in args.cells.split(",")]
    missing = [tool for tool in ("valgrind", "callgrind_control") if shutil.which(tool) is None]
    if missing:
        print(f"skipped: {missing[0]} is not installed (apt-get install valgrind); nothing measured")
        return 0

    started = time.perf_counter()
    info = machine()
    info["tools"] = tool_versions()
    tree, commit = baseline_tree(args.baseline)
    head = git("rev-parse", "HEAD")
    dirty = bool(git("status", "--porcelain", "--untracked-files=no", "--", "agent", "edgec"))
    print(f"machine: {info['cpu']}, {info['usable_cores']} usable cores, python {info['python']}")
    print(f"tools: {info['tools']['valgrind']}, {info['tools']['strace'] or 'no strace'}")
    changes = " + uncommitted changes" if dirty else ""
    print(f"baseline {commit[:10]} from {tree.relative_to(ROOT)}; this tree {head[:10]}{changes}", flush=True)
    shutil.rmtree(WORK / "callgrind", ignore_errors=True)
    (WORK / "callgrind").mkdir(parents=True)
    bundle, manifest, sample = build_bundle(args.bundles, tree)  # REF's compiler: both agents read it
    name = manifest.inputs[0].name
    path = f"/v2/models/{manifest.name}/infer"
    requests = {"json": json_request(name, sample, path), "binary": binary_request(name, sample, path)}
    expected = session_for(bundle).run(None, {name: sample})[0].ravel()
    commands = {"baseline": ["agent", "--code-root", str(tree)], "this tree": ["agent"]}
    should_serve = {
        "baseline": str(tree / "agent" / "serving.py"),
        "this tree": str(ROOT / "agent" / "serving.py"),
    }

    setup = _Setup(commands, bundle, requests, expected, cells, args.warmup, args.requests, args.idle)
    runs: dict[str, list[dict[str, dict[str, Any]]]] = {side: [] for side in SIDES}
    for run in range(1, args.runs + 1):
        for side in SIDES:
            counts, served = callgrind_run(setup, side, run)
            if served != should_serve[side]:
                raise SystemExit(f"{side} served {served}, not {should_serve[side]}")
            runs[side].append(counts)

    syscalls: dict[str, dict[str, Any] | None] = {side: None for side in SIDES}
    if not args.no_strace and shutil.which("strace"):
        for side in SIDES:
            syscalls[side] = strace_counts(setup, side)
            if syscalls[side] is None:
                break

    info["loadavg_end"] = loadavg()
    table = compare(runs, syscalls, cells)
    print()
    print(render(table))
    elapsed = round(time.perf_counter() - started, 1)
    report = {
        "benchmark": "agent_instructions",
        "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": info,
        "bundle": manifest.name + " " + manifest.version + " " + manifest.profile.id,
        "baseline": {"ref": args.baseline, "commit": commit, "served_from": should_serve["baseline"]},
        "this_tree": {"commit": head, "uncommitted_changes": dirty, "served_from": should_serve["this tree"]},
        "settings": {
            "requests_per_cell": args.requests,
            "warmup_per_cell": args.warmup,
            "runs": args.runs,
            "cells": [str(c) for c in cells],
            "workers": 0,
            "valgrind": "--tool=callgrind --separate-threads=yes, PYTHONHASHSEED=0",
            "window": "callgrind_control --zero after the warm-up, --dump after the counted requests",
            "idle_s": args.idle,
            "sides": commands,
        },
        "table": table,
        "runs": runs,
        "syscalls": syscalls,
        "elapsed_s": elapsed,
    }
    args.results.mkdir(parents=True, exist_ok=True)
    json_path = args.results / "agent_instructions.json"
    md_path = args.results / "agent_instructions.md"
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    md_path.write_text(markdown(report))
    print(f"\nwrote {json_path}\nwrote {md_path}\n({elapsed} s)")
    return 0


def markdown(report: dict[str, Any]) -> str:
    """agent_instructions.md from the report (what the JSON holds)."""
    info, settings, table = report["machine"], report["settings"], report["table"]
    baseline, this = report["baseline"], report["this_tree"]
    changes = " with uncommitted changes" if this["uncommitted_changes"] else ""
    spread = max(row["run_spread"] for row in table)
    process_spread = max(row["process_run_spread"] for row in table)
    ratios = [row["event_loop_ratio"] for row in table if row["event_loop_ratio"] is not None]
    without = [row["event_loop_ratio_without_clock"] for row in table if row["event_loop_ratio"] is not None]
    return (
        "# Agent serving: instructions per request, this tree against a baseline commit (callgrind)\n\n"
        f"{info['cpu']}, {info['usable_cores']} cores, python {info['python']}, {info['platform']}; "
        f"{info['tools']['valgrind']}, {info['tools']['strace'] or 'no strace'}; "
        + ", ".join(f"{k} {v}" for k, v in info["versions"].items() if v)
        + f"; {report['created_at']}.\n\n"
        f"Baseline: `{baseline['commit'][:10]}` ({baseline['ref']}), served from a git worktree with this "
        f"venv; this tree: `{this['commit'][:10]}`{changes}. "
        "Both inline (`workers=0`), the digits bundle built by the baseline, one eval sample per "
        f"request. Each side ran {settings['runs']} times under callgrind, each run a fresh process; per "
        f"cell {settings['warmup_per_cell']} warm-up requests, then {settings['requests_per_cell']} counted "
        f"(split over the connections). The runs of a cell differ by at most {spread:.2%} on the event "
        f"loop, {process_spread:.2%} in the whole process.\n\n"
        f"This tree executes {min(ratios):.3f} to {max(ratios):.3f} times the baseline's instructions per "
        f"request on the event loop ({min(without):.3f} to {max(without):.3f} without the clock's share).\n\n"
        + render(table)
        + "\n\n"
        + NOTES
    )


NOTES = """\
- instructions: user-space instructions executed between `callgrind_control --zero` (after the
  warm-up) and `--dump` (after the counted requests), per request; event loop: the thread that
  runs the server's event loop (parsing, the model, the answer), whole process: every thread
  (onnxruntime's own, this tree's deadline thread). Not counted: the kernel's work (see
  syscalls) and time spent waiting.
- runs: each a fresh process. What differs between them is what the clock decides: at
  concurrency 16, how many requests one wake of the loop finds; the work done once a second
  whatever the load (this tree's deadline sweep over the open connections).
- of which the clock: the event loop's instructions per second with the same connections open
  and idle (counted for `--idle` s after each cell) times the cell's window, per request. Under
  valgrind a request takes 100 to 200 times longer than without it, so this share is as many
  times what it is in real serving.
- ratio: this tree over the baseline, the means of the runs; lower is cheaper. Without the
  clock: both sides less their share of the clock.
- syscalls: `strace -f -c` attached to a server run without valgrind, over the same counted
  requests; at concurrency 16 the `epoll_wait` share depends on timing.
"""


def _mean(runs: list[dict[str, dict[str, Any]]], cell: _Cell, key: str) -> float:
    return float(np.mean([r[str(cell)][key] for r in runs]))


def _ratio(
    this: list[dict[str, dict[str, Any]]],
    base: list[dict[str, dict[str, Any]]],
    cell: _Cell,
    key: str,
    less: str | None = None,
) -> float:
    """This tree's mean of ``key`` over the baseline's, each less its mean of ``less``."""

    def value(runs: list[dict[str, dict[str, Any]]]) -> float:
        return _mean(runs, cell, key) - (_mean(runs, cell, less) if less else 0.0)

    return value(this) / value(base)


def compare(
    runs: dict[str, list[dict[str, dict[str, Any]]]],
    syscalls: dict[str, dict[str, Any] | None],
    cells: list[_Cell],
) -> list[dict[str, Any]]:
    """One row per cell and side: each run's counts, the clock's share, and (on this tree's
    row) this tree over the baseline."""
    rows = []
    for cell in cells:
        for side in SIDES:
            loop = [r[str(cell)]["event_loop_per_request"] for r in runs[side]]
            process = [r[str(cell)]["process_per_request"] for r in runs[side]]
            counts = syscalls[side]
            rows.append(
                {
                    "request": cell.kind,
                    "concurrency": cell.clients,
                    "side": side,
                    "event_loop_per_request": [round(v) for v in loop],
                    "process_per_request": [round(v) for v in process],
                    "run_spread": (max(loop) - min(loop)) / min(loop),
                    "process_run_spread": (max(process) - min(process)) / min(process),
                    "clock_event_loop_per_request": round(
                        _mean(runs[side], cell, "clock_event_loop_per_request")
                    ),
                    "syscalls_per_request": counts[str(cell)]["per_request"] if counts else None,
                    "event_loop_ratio": None,
                    "event_loop_ratio_without_clock": None,
                    "process_ratio": None,
                }
            )
        this, base = runs["this tree"], runs["baseline"]
        rows[-1]["event_loop_ratio"] = _ratio(this, base, cell, "event_loop_per_request")
        rows[-1]["event_loop_ratio_without_clock"] = _ratio(
            this, base, cell, "event_loop_per_request", less="clock_event_loop_per_request"
        )
        rows[-1]["process_ratio"] = _ratio(this, base, cell, "process_per_request")
    return rows


def render(table: list[dict[str, Any]]) -> str:
    lines = [
        "| request | concurrency | side | event loop, instructions/request (run 1 / run 2 ...) "
        "| of which the clock | whole process (run 1 / run 2 ...) | syscalls/request "
        "| this tree / baseline: event loop | without the clock | whole process |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in table:
        ratio = row["event_loop_ratio"]
        cells = [
            row["request"],
            str(row["concurrency"]),
            row["side"],
            " / ".join(f"{v:,}" for v in row["event_loop_per_request"]),
            f"{row['clock_event_loop_per_request']:,}",
            " / ".join(f"{v:,}" for v in row["process_per_request"]),
            "-" if row["syscalls_per_request"] is None else f"{row['syscalls_per_request']:.2f}",
            "" if ratio is None else f"**{ratio:.3f}**",
            "" if ratio is None else f"{row['event_loop_ratio_without_clock']:.3f}",
            "" if ratio is None else f"{row['process_ratio']:.3f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
