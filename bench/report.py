"""Collect the benchmarks' results into bench/REPORT.md (``make bench`` runs it last).

Run:  python bench/report.py

Reads bench/results/*.json (and the markdown tables some benchmarks write), and writes one
report: the machine, when each benchmark ran, its figures side by side with its baseline,
and links to the plots. A benchmark that has not run is listed as missing, not invented.
"""

from __future__ import annotations

import datetime as dt
import json
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results"
REPORT = BENCH / "REPORT.md"


def _load(name: str) -> dict[str, Any] | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def _when(data: dict[str, Any]) -> str:
    """When the benchmark ran, as it recorded it (a file's date says only when it was checked out)."""
    return str(data.get("created_at") or "at a time it did not record")


def _table(headers: tuple[str, ...], rows: list[tuple[Any, ...]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join("-" if v is None else str(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _image(name: str) -> str:
    return f"\n\n![{name}](results/{name}.png)\n" if (RESULTS / f"{name}.png").exists() else ""


def onnx_precision(data: dict[str, Any]) -> str:
    rows = [
        (
            r["precision"],
            f"{r['size_bytes'] / 2**20:.2f} MiB",
            f"{r['size_ratio_vs_fp32']:.3f}",
            f"{r['latency_ms']['median']:.2f}",
            f"{r['latency_ms']['p90']:.2f}",
            f"{r['metrics'].get('cosine', 0):.5f}",
            r["metrics"].get("top1_agreement"),
        )
        for r in data["results"]
    ]
    table = _table(("precision", "size", "x fp32", "median ms", "p90 ms", "cosine", "top-1 agree"), rows)
    return (
        f"MobileNetV2-sized model, x86-64-cpu, onnxruntime ({data['machine']['threads']} threads).\n\n{table}"
    )


def formats(data: dict[str, Any]) -> str:
    rows = []
    for r in data["results"]:
        latency = r.get("latency_ms") or {}
        median = latency.get("median")
        rows.append(
            (
                r["label"],
                r.get("status") or "baseline",
                f"{r['size_bytes'] / 2**20:.2f} MiB",
                "-" if median is None else f"{median:.2f}",
                r.get("latency_runtime") or r.get("latency_note") or "-",
                (r.get("metrics") or {}).get("cosine"),
            )
        )
    table = _table(("bundle", "status", "size", "median ms", "timed with", "cosine"), rows)
    build = data["build"]
    return (
        f"The MobileNetV2-sized model for every profile's default format, one build call "
        f"({build['wall_s']} s for {len(build['targets'])} targets).\n\n{table}{_image('formats')}"
    )


def markdown(name: str) -> Callable[[dict[str, Any]], str]:
    def render(_data: dict[str, Any]) -> str:
        path = RESULTS / f"{name}.md"
        text = path.read_text() if path.exists() else ""
        # its own title and image links (relative to results/) give way to the report's
        body = "\n".join(line for line in text.splitlines() if not line.startswith(("# ", "![")))
        return body.strip() + _image(name)

    return render


def hot_swap(data: dict[str, Any]) -> str:
    rows = [
        ("calm (no install running)", data["p50_ms_calm"], data["p99_ms_calm"]),
        ("while an install runs", data["p50_ms_during_installs"], data["p99_ms_during_installs"]),
    ]
    return (
        f"{data['swaps']} installs through the whole pipeline under {data['requests_per_s']} requests/s "
        f"({data['requests']} requests): **{data['failed']} failed**, "
        f"{data['answers_not_from_the_model_they_name']} answers not from the model they name; "
        f"median install {data['install_s_median']} s (assign to commit, probation included).\n\n"
        + _table(("requests sent", "p50 ms", "p99 ms"), rows)
        + _image("hot_swap")
    )


def delivery(data: dict[str, Any]) -> str:
    text = (
        f"One {data['blob_mb']} MB blob, one device: MQTT {data['mqtt_mb_per_s']} MB/s "
        f"(256 KiB chunks through Mosquitto), HTTP {data['http_mb_per_s']} MB/s (one GET)."
    )
    sweep = data.get("sweep")
    if sweep:
        rows = [
            (n, r["mqtt_mb_per_s"], r["mqtt_slowest_s"], r["http_mb_per_s"], r["http_slowest_s"])
            for n, r in sweep.items()
        ]
        headers = (
            "devices at once",
            "MQTT MB/s (all)",
            "MQTT slowest s",
            "HTTP MB/s (all)",
            "HTTP slowest s",
        )
        text += f"\n\n{data['sweep_mb']:g} MB each, every device its own credentials:\n\n" + _table(
            headers, rows
        )
    return text


def cache(data: dict[str, Any]) -> str:
    return (
        f"The same build with an empty cache vs repeated: median {data['cold_median_s']} s vs "
        f"{data['cached_median_s']} s ({data['speedup']}x)."
    )


def fleet(data: dict[str, Any]) -> str:
    machine = data.get("machine", {})
    lines = []
    if machine:
        flags = ", ".join(machine.get("flags", [])) or "?"
        lines = [f"{machine.get('cpu', '?')} ({flags}), {machine.get('cores', '?')} cores.", ""]
    if data.get("baseline"):
        baseline = data["baseline"]
        lines += [f"Baseline: the server of commit {baseline} (before issue 17), same simulator.", ""]
    rows = [
        (
            r["devices"],
            r.get("setup", "now, sqlite, 1 replica"),
            r["time_to_100_s"],
            r["lost"],
            r.get("server_cpu_ms_per_device", round(r["server_cpu_s"] * 1000 / r["devices"], 1)),
            r["server_cpu_s"],
            r["server_rss_mib"],
            r.get("broker_cpu_s"),
            r.get("db_cpu_s"),
            r.get("sim_cpu_ms_per_device"),
            r.get("repeats", 1),
        )
        for r in data["runs"]
    ]
    headers = (
        "devices", "server", "rollout to 100% s", "devices lost", "server CPU ms per device",
        "server CPU s", "server peak RSS MiB", "broker CPU s", "PostgreSQL CPU s",
        "simulator CPU ms per device", "runs",
    )  # fmt: skip
    return ("\n".join(lines) + "\n" if lines else "") + _table(headers, rows) + _image("fleet")


SECTIONS: list[tuple[str, str, str, Callable[[dict[str, Any]], str]]] = [
    ("compile_matrix", "Compile matrix (samples)", "bench_compile_matrix.py", markdown("compile_matrix")),
    ("onnx_precision", "ONNX precisions (MobileNetV2-sized)", "bench_onnx_precision.py", onnx_precision),
    ("formats", "Every profile's default format (MobileNetV2-sized)", "bench_formats.py", formats),
    ("agent_serving", "Serving", "bench_agent_serving.py", markdown("agent_serving")),
    ("agent_serving_baseline", "Serving: the agent against its HTTP layer before llhttp",
     "bench_agent_serving.py --baseline 1a6018d", markdown("agent_serving_baseline")),
    ("agent_serving_metrics", "Serving: Prometheus metrics on against off",
     "bench_agent_serving.py --metrics-overhead", markdown("agent_serving_metrics")),
    ("agent_serving_shadow", "Serving: with a shadow run against without",
     "bench_agent_serving_shadow.py", markdown("agent_serving_shadow")),
    ("agent_instructions",
     "Serving: instructions per request against the HTTP layer before llhttp (callgrind)",
     "bench_agent_instructions.py", markdown("agent_instructions")),
    ("hot_swap", "Hot swap under load", "bench_hot_swap.py", hot_swap),
    ("delivery", "Delivery: MQTT vs HTTP", "bench_delivery.py", delivery),
    ("delta", "Delta downloads: bytes fetched for a release built from the one installed",
     "bench_delta.py", markdown("delta")),
    ("fleet", "Fleet rollouts with simulated devices", "bench_fleet.py", fleet),
    ("cache", "Build cache", "bench_cache.py", cache),
    ("kdf", "Key files: passphrase guesses per second", "bench_kdf.py", markdown("kdf")),
    ("zoo", "Real models from PyPI wheels through edgec build", "bench_zoo.py", markdown("zoo")),
]  # fmt: skip


def main() -> None:
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=BENCH, check=False
    ).stdout.strip()
    machine = (_load("agent_serving") or _load("formats") or {}).get("machine", {})
    lines = [
        "# edgec benchmark report",
        "",
        f"Written {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M UTC} at commit {commit or '?'} by `make bench`, on "
        f"{machine.get('cpu', '?')}, {machine.get('cores', '?')} cores, Python {machine.get('python', '?')}. "
        "Every figure is a median of repeated runs, measured side by side with its baseline in the "
        "same run; each section names the script that measures it and when it last ran.",
        "",
    ]
    for name, title, script, render in SECTIONS:
        data = _load(name)
        lines += [f"## {title}", ""]
        if data is None:
            lines += [f"Not measured yet: `python bench/{script}`.", ""]
            continue
        lines += [f"`python bench/{script}` — ran {_when(data)}.", "", render(data), ""]
    REPORT.write_text("\n".join(lines).rstrip() + "\n")
    print(f"wrote {REPORT}")


if __name__ == "__main__":
    main()
