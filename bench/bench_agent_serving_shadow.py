"""The agent's serving latency with and without a shadow run attached, side by side.

Run:  .venv/bin/python bench/bench_agent_serving_shadow.py [--repeats 7] [--seconds 2] [--sample 0.1]
      (no extra needed; the plot needs matplotlib, in the dev extra)

One agent server process (``agent.serving.InferenceServer``, inference inline, the digits
x86-64-cpu bundle 1.0.0 built here with ``edgec build``) with a ``ShadowTap`` on its serving
callback and the ``/v2/shadow`` endpoint (``agent._shadow_api``), as the daemon has them. The
candidate is digits 1.1.0, the same network built again. Each round measures both sides back
to back, which goes first rotating:

- ``no shadow``: nothing attached to the tap (every request still passes it);
- ``shadow``: a run of the candidate started through ``POST /v2/shadow`` (``--sample`` of the
  requests, the default CPU budget of half a core, window and queue), stopped with ``DELETE``
  after the side's measurements; its figures (compared, dropped, skipped over budget) are kept.

The closed-loop load generator is bench/bench_agent_serving.py's (this process, keep-alive
connections, each sending its next JSON request when the last answer is in) at concurrency 1,
4 and 16 (``--concurrency``); the paced one (``--rates``, default 200 and 1000 requests/s)
sends requests due at fixed times on 8 keep-alive connections. Client-side p50 and p99,
requests/s, ``--seconds`` per measurement after a 0.5 s warm-up, and the CPU per request of
the server process and of the shadow's candidate process. Reported: the median of
``--repeats`` rounds per side and load, and shadow over no shadow (the goal: within 5 %). Writes
``bench/results/agent_serving_shadow.json``, ``.md`` and ``.png``. About 4 minutes on 2 cores
with the defaults.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
from bench._common import ResponseFramer  # noqa: E402
from bench.bench_agent_serving import (  # noqa: E402
    CONCURRENCY,
    RESULTS,
    WARMUP_S,
    ServerProcess,
    build_bundle,
    cpu_seconds,
    decode_logits,
    json_request,
    loadavg,
    machine,
    measure,
    median_of,
    session_for,
)

SIDES = ("no shadow", "shadow")
CPU_FLAGS = (
    "sse4_2",
    "avx",
    "avx2",
    "fma",
    "avx512f",
    "avx512_vnni",
    "avx512_bf16",
    "amx_tile",
    "neon",
    "asimd",
)
NOTES = """\
- p50 / p99: client-side latency of the served requests (the load generator's clock), the
  median over rounds; ratio: shadow over no shadow (1.05 = 5 % slower), of the medians; paired:
  the median over rounds of the ratio of the two back-to-back runs.
- within 5 %: the p50 and p99 ratios both at most 1.05.
- load: c=N, closed loop, N keep-alive connections each sending its next request when the last
  answer is in (saturates the 2 cores from N=4); R/s, paced, requests due R times a second on
  8 keep-alive connections, latency from sending to answer (below saturation, where any CPU the
  shadow takes from serving shows as latency rather than as throughput).
- server CPU: the server process's user + system CPU time per answered request (warm-up
  included); + candidate process: the shadow's child process's, per answered request.
- shadow figures: summed over the rounds' shadow runs: requests offered, sampled, run on the
  candidate and compared, dropped (its queue full), skipped (over its CPU budget).
- The server, the shadow's child process and the load generator share this machine's cores,
  and other work on the machine shows in the load average."""


class ShadowServer(ServerProcess):
    """This script's ``--serve`` in a process of its own: the agent with a tap and ``/v2/shadow``."""

    def __init__(self, bundle: Path, root: Path) -> None:
        script = str(Path(__file__).resolve())
        self._start("agent", [sys.executable, script, "--serve", str(bundle), "--root", str(root)])

    def shadow(self, method: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}/v2/shadow", data=data, method=method)
        with urllib.request.urlopen(request, timeout=60) as response:
            document: dict[str, Any] = json.loads(response.read())
            return document


def serve(bundle: Path, root: Path) -> None:
    from agent._shadow_api import ShadowControl
    from agent.runtime import load_bundle
    from agent.serving import InferenceServer
    from agent.shadow import ShadowTap
    from agent.slot import ModelSlot

    slot = ModelSlot()
    slot.swap(load_bundle(bundle, threads=1))
    tap = ShadowTap()
    server = InferenceServer(slot, on_infer=tap.offer, shadow=ShadowControl(tap, slot, root))
    print(f"PORT {server.start()}", flush=True)
    sys.stdin.read()  # until the benchmark closes our stdin
    server.stop()


def build_candidate(out: Path) -> Path:
    """digits 1.1.0: the same network as the served 1.0.0, built again."""
    return build_bundle(out, version="1.1.0")[0]


def cpu_flags() -> list[str]:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith(("flags", "Features")):
            present = set(line.split(":", 1)[1].split())
            return [f for f in CPU_FLAGS if f in present]
    return []


# --------------------------------------------------------------------------- paced load

PACED_CONNECTIONS = 8  # keep-alive connections a paced load sends on, each one request at a time


def children_cpu_seconds(pid: int) -> float:
    """User + system CPU time so far of ``pid``'s child processes (the shadow's candidate)."""
    total = 0.0
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            with contextlib.suppress(FileNotFoundError):  # ended meanwhile
                total += cpu_seconds(int(child))
    return total


class _PacedClient(asyncio.Protocol):
    """One keep-alive connection; ``send`` writes a request and gives a future of its answer."""

    def __init__(self) -> None:
        self.framer = ResponseFramer()
        self.transport: asyncio.Transport | None = None
        self.answer: asyncio.Future[tuple[int, bytes]] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def send(self, request: bytes) -> asyncio.Future[tuple[int, bytes]]:
        assert self.transport is not None
        self.answer = asyncio.get_running_loop().create_future()
        self.transport.write(request)
        return self.answer

    def data_received(self, data: bytes) -> None:
        for status, body in self.framer.feed(data):
            if self.answer is not None and not self.answer.done():
                self.answer.set_result((status, body))

    def connection_lost(self, exc: Exception | None) -> None:
        if self.answer is not None and not self.answer.done():
            self.answer.set_exception(ConnectionError("the server closed the connection"))


async def _paced(port: int, request: bytes, rate: float, seconds: float) -> dict[str, Any]:
    """Requests at ``rate`` a second, due at fixed times, each on the next idle connection; a
    request's latency runs from its sending to its answer, and ``late_p99_ms`` says how late
    the sending was (this process's scheduling, or a wait for an idle connection)."""
    loop = asyncio.get_running_loop()
    idle: asyncio.Queue[_PacedClient] = asyncio.Queue()
    clients = []
    for _ in range(PACED_CONNECTIONS):
        _, client = await loop.create_connection(_PacedClient, "127.0.0.1", port)
        clients.append(client)
        idle.put_nowait(client)
    latencies: list[float] = []
    lateness: list[float] = []
    counts = {"total": 0, "errors": 0}
    first: list[bytes] = []
    started = time.perf_counter()
    record_from = started + WARMUP_S
    deadline = record_from + seconds

    async def one(due: float) -> None:
        client = await idle.get()
        sent = time.perf_counter()
        try:
            status, body = await client.send(request)
        except ConnectionError:
            counts["errors"] += 1
            return
        now = time.perf_counter()
        idle.put_nowait(client)
        counts["total"] += 1
        counts["errors"] += status != 200
        if not first:
            first.append(body)
        if due >= record_from:
            latencies.append(now - sent)
            lateness.append(sent - due)

    tasks = []
    index = 0
    while True:
        due = started + index / rate
        if due >= deadline:
            break
        wait = due - time.perf_counter()
        if wait > 0:
            await asyncio.sleep(wait)
        tasks.append(asyncio.create_task(one(due)))
        index += 1
    await asyncio.wait_for(asyncio.gather(*tasks), 30)
    for client in clients:
        assert client.transport is not None
        client.transport.close()
    lat = np.array(latencies) * 1e3
    return {
        "requests_per_s": len(lat) / seconds,
        "p50_ms": float(np.percentile(lat, 50)),
        "p99_ms": float(np.percentile(lat, 99)),
        "late_p99_ms": float(np.percentile(np.array(lateness) * 1e3, 99)),
        "requests": len(lat),
        "answered": counts["total"],
        "errors": counts["errors"],
        "first_body": first[0] if first else b"",
    }


def measure_paced(port: int, pid: int, request: bytes, rate: float, seconds: float) -> dict[str, Any]:
    cpu_before = cpu_seconds(pid)
    result = asyncio.run(_paced(port, request, rate, seconds))
    cpu = cpu_seconds(pid) - cpu_before
    result["server_cpu_us_per_request"] = 1e6 * cpu / max(result["answered"], 1)
    return result


def load_label(load: int | float) -> str:
    """A row's name: a closed-loop concurrency, or a paced rate."""
    return f"c={load}" if isinstance(load, int) else f"{load:g}/s"


# --------------------------------------------------------------------------- the report


def comparison(rounds: dict[str, dict[str, list[dict[str, Any]]]]) -> dict[str, dict[str, Any]]:
    table: dict[str, dict[str, Any]] = {}
    for load in rounds["no shadow"]:
        off_runs, on_runs = rounds["no shadow"][load], rounds["shadow"][load]
        off, on = median_of(off_runs), median_of(on_runs)
        for side, runs in (("no shadow", off_runs), ("shadow", on_runs)):
            child = float(np.median([r["child_cpu_us_per_request"] for r in runs]))
            (off if side == "no shadow" else on)["child_cpu_us_per_request"] = child
        row: dict[str, Any] = {"no shadow": off, "shadow": on}
        for key in ("p50_ms", "p99_ms", "requests_per_s"):
            row[f"{key}_ratio"] = on[key] / off[key]
            paired = [b[key] / a[key] for a, b in zip(off_runs, on_runs, strict=True)]
            row[f"paired_{key}_ratio"] = float(np.median(paired))
        row["within_5_percent"] = row["p50_ms_ratio"] <= 1.05 and row["p99_ms_ratio"] <= 1.05
        table[load] = row
    return table


def render(table: dict[str, dict[str, Any]]) -> str:
    lines = [
        "| load | p50 ms no shadow / shadow | ratio (paired) | p99 ms no shadow / shadow "
        "| ratio (paired) | req/s no shadow / shadow | server CPU us/req no shadow / shadow "
        "| + candidate process | within 5 % |",
        "|---|---:|---:|---:|---:|---:|---:|---:|:---:|",
    ]
    for load, row in table.items():
        off, on = row["no shadow"], row["shadow"]
        lines.append(
            f"| {load} | {off['p50_ms']:.3f} / {on['p50_ms']:.3f} | "
            f"{row['p50_ms_ratio']:.3f} ({row['paired_p50_ms_ratio']:.3f}) | "
            f"{off['p99_ms']:.3f} / {on['p99_ms']:.3f} | "
            f"{row['p99_ms_ratio']:.3f} ({row['paired_p99_ms_ratio']:.3f}) | "
            f"{off['requests_per_s']:,.0f} / {on['requests_per_s']:,.0f} | "
            f"{off['server_cpu_us_per_request']:.0f} / {on['server_cpu_us_per_request']:.0f} | "
            f"{on['child_cpu_us_per_request']:.0f} | "
            f"{'yes' if row['within_5_percent'] else 'NO'} |"
        )
    return "\n".join(lines)


def plot(table: dict[str, dict[str, Any]], path: Path, repeats: int, sample: float) -> bool:
    """p50 and p99 per concurrency, no shadow against shadow."""
    try:
        import matplotlib
    except ImportError:
        print("no matplotlib (dev extra): no plot")
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.8))
    x = np.arange(len(table))
    for ax, key in zip(axes, ("p50_ms", "p99_ms"), strict=True):
        for i, side in enumerate(SIDES):
            values = [row[side][key] for row in table.values()]
            bars = ax.bar(x + (i - 0.5) * 0.38, values, 0.38, label=side)
            ax.bar_label(bars, fmt="%.2f", fontsize=7)
        ax.set_xticks(x, list(table), fontsize=8)
        ax.set_ylabel(f"{key[:3]} latency, ms (lower is better)")
        ax.margins(y=0.15)
    axes[0].legend(fontsize=8, loc="upper left")
    fig.suptitle(
        f"digits onnx fp32 served, with and without a {sample:.0%} shadow; median of {repeats} rounds"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    info = machine()
    info["cpu_flags"] = cpu_flags()
    print(f"machine: {info['cpu']} ({', '.join(info['cpu_flags'])}), {info['usable_cores']} usable cores")
    bundle, manifest, sample = build_bundle(args.bundles)
    candidate = build_candidate(args.bundles)
    name = manifest.inputs[0].name
    request = json_request(name, sample, f"/v2/models/{manifest.name}/infer")
    expected = session_for(bundle).run(None, {name: sample})[0].ravel()
    server = ShadowServer(bundle, args.bundles)
    loads: list[int | float] = [*args.concurrency, *args.rates]
    rounds: dict[str, dict[str, list[dict[str, Any]]]] = {
        side: {load_label(load): [] for load in loads} for side in SIDES
    }
    shadows: list[dict[str, Any]] = []
    worst_diff = 0.0
    try:
        for index in range(args.repeats):
            turn = index % len(SIDES)
            for side in SIDES[turn:] + SIDES[:turn]:
                if side == "shadow":
                    server.shadow(
                        "POST", {"bundle": str(candidate), "duration_s": 3600, "sample": args.sample}
                    )
                for load in loads:
                    pid = server.process.pid
                    child_before = children_cpu_seconds(pid)
                    if isinstance(load, int):
                        result = measure(server.port, pid, request, load, args.seconds)
                    else:
                        result = measure_paced(server.port, pid, request, load, args.seconds)
                    child = children_cpu_seconds(pid) - child_before
                    result["child_cpu_us_per_request"] = 1e6 * child / max(result["answered"], 1)
                    diff = float(np.abs(decode_logits(result.pop("first_body")) - expected).max())
                    worst_diff = max(worst_diff, diff)
                    rounds[side][load_label(load)].append(result)
                    print(
                        f"round {index + 1}/{args.repeats} {side:9s} {load_label(load):7s}: "
                        f"{result['requests_per_s']:7,.0f} req/s  p50 {result['p50_ms']:.3f} ms  "
                        f"p99 {result['p99_ms']:.3f} ms  server CPU "
                        f"{result['server_cpu_us_per_request']:.0f} + "
                        f"{result['child_cpu_us_per_request']:.0f} us/req  errors {result['errors']}",
                        flush=True,
                    )
                if side == "shadow":
                    figures = server.shadow("DELETE")
                    shadows.append(figures)
                    print(
                        f"  shadow {figures['id']}: {figures['offered']} offered, "
                        f"{figures['sampled']} sampled, "
                        f"{figures['compared']} compared, {figures['dropped']} dropped, "
                        f"{figures['over_budget']} over budget, agreement {figures['agreement']}",
                        flush=True,
                    )
        memory = server.memory()
    finally:
        server.stop()
    info["loadavg_end"] = loadavg()
    table = comparison(rounds)
    totals = {
        key: sum(f[key] for f in shadows)
        for key in ("offered", "sampled", "compared", "dropped", "over_budget", "errors")
    }
    agreements = [f["agreement"] for f in shadows if f["agreement"] is not None]
    errors = sum(r["errors"] for per in rounds.values() for rs in per.values() for r in rs)
    text = render(table)
    summary = (
        f"Shadow runs ({len(shadows)}, sample {args.sample:g}, CPU budget 0.5 of a core): "
        f"{totals['offered']:,} requests offered, {totals['sampled']:,} sampled, {totals['compared']:,} "
        f"compared, {totals['dropped']:,} dropped (queue full), {totals['over_budget']:,} skipped over "
        f"the CPU budget, {totals['errors']} candidate errors; agreement "
        f"{min(agreements) if agreements else '-'} (lowest of the runs). Load generator errors: {errors}. "
        f"Server RSS after the load: {memory['rss_mib']:.0f} MiB."
    )
    print()
    print(text)
    print(summary)
    print(f"max abs difference of any answer from session.run: {worst_diff:.1e}")
    elapsed = round(time.perf_counter() - started, 1)
    report = {
        "benchmark": "agent_serving_shadow",
        "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": info,
        "bundle": f"{manifest.name} {manifest.version} {manifest.profile.id}",
        "candidate": candidate.name,
        "settings": {
            "repeats": args.repeats,
            "seconds_per_run": args.seconds,
            "warmup_s": WARMUP_S,
            "concurrency": list(args.concurrency),
            "paced_rates_per_s": list(args.rates),
            "paced_connections": PACED_CONNECTIONS,
            "workers": 0,
            "sample": args.sample,
            "cpu_budget": 0.5,
            "order": "per round, the two sides back to back, the first one rotating",
        },
        "comparison": table,
        "within_5_percent": all(row["within_5_percent"] for row in table.values()),
        "shadow_totals": totals,
        "shadow_runs": shadows,
        "rounds": rounds,
        "memory": memory,
        "answer_max_abs_diff": worst_diff,
        "errors": errors,
        "elapsed_s": elapsed,
    }
    args.results.mkdir(parents=True, exist_ok=True)
    json_path = args.results / "agent_serving_shadow.json"
    md_path = args.results / "agent_serving_shadow.md"
    png_path = args.results / "agent_serving_shadow.png"
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    drawn = plot(table, png_path, args.repeats, args.sample)
    md_path.write_text(
        "# Agent serving with and without a shadow run (digits, onnx fp32)\n\n"
        f"{info['cpu']} ({', '.join(info['cpu_flags'])}), {info['usable_cores']} cores, python "
        f"{info['python']}; "
        + ", ".join(f"{k} {v}" for k, v in info["versions"].items() if v)
        + f"; {report['created_at']}.\n\n"
        f"One agent server process, inline (`workers=0`), the served model digits 1.0.0 and in shadow "
        f"{candidate.name} (the same network built again), {args.sample:g} of the requests, the default "
        f"CPU budget. Median of {args.repeats} rounds of {args.seconds:g} s per side and concurrency; "
        f"in each round the two sides run back to back, which goes first rotating. Load average "
        f"{info['loadavg_start']} at the start, {info['loadavg_end']} at the end.\n\n"
        + text
        + "\n\n"
        + summary
        + "\n\n"
        + NOTES
        + (f"\n\n![p50 and p99, with and without a shadow run]({png_path.name})\n" if drawn else "\n")
    )
    print(f"\nwrote {json_path}\nwrote {md_path}" + (f"\nwrote {png_path}" if drawn else ""))
    print(f"({elapsed} s)")
    return 0 if not errors and totals["compared"] > 0 else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7, help="interleaved rounds (default 7)")
    parser.add_argument("--seconds", type=float, default=2.0, help="measured seconds per run (default 2)")
    parser.add_argument(
        "--sample", type=float, default=0.1, help="the shadow's share of requests (default 0.1)"
    )
    parser.add_argument(
        "--concurrency",
        type=lambda text: [int(c) for c in text.split(",") if c],
        default=list(CONCURRENCY),
        help="closed-loop loads, connections, comma-separated; empty for none (default 1,4,16)",
    )
    parser.add_argument(
        "--rates",
        type=lambda text: [float(r) for r in text.split(",")],
        default=[200.0, 1000.0],
        help="paced loads, requests/s, comma-separated (default 200,1000)",
    )
    parser.add_argument("--bundles", type=Path, default=ROOT / "build" / "bench" / "agent_serving_shadow")
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--serve", type=Path, help=argparse.SUPPRESS)  # internal: run the server
    parser.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        serve(args.serve, args.root)
        return 0
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
