"""Fleet rollouts at scale: simulated devices on one Mosquitto, time to 100% and the server's cost.

Run:  python bench/bench_fleet.py [--devices 100,1000] [--waves 1%,10%,50%,100%] [--bake 2s]

For each fleet size: a real Mosquitto (the generated config, one password per device and the
ACL), the OTA server process, and that many ``sim`` devices in this process, each a real
MQTT client running the agent's install pipeline (director document, TUF refresh over MQTT,
chunked download with chunk hashes, stage, probation) with a stand-in runtime. The digits
sample at fp16 (a release of about 100 KB) goes out with ``edgec rollout start`` in four
waves; the clock runs from the start command to the rollout's ``completed``. Recorded: time
until every device is connected, time to 100%, devices lost (not reporting the release at
the end), the server process's CPU seconds and peak resident memory during the rollout, and
this process's CPU (the simulator); the median of ``--repeats`` runs per size (devices lost:
the worst run). Writes bench/results/fleet.json and fleet.png.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agent.config import InstallSettings, TrustSettings  # noqa: E402
from localfleet import LocalFleet, run_edgec, wait_for  # noqa: E402
from localfleet.releases import DIGITS  # noqa: E402
from sim import SimBehaviours, SimFleet, SimSettings  # noqa: E402

RESULTS = ROOT / "bench" / "results"
PROFILE = "x86-64-cpu"


def _proc_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12])  # utime + stime
    return ticks / 100.0


def _proc_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _bundle(out: Path) -> Path:
    result = run_edgec(
        "build", DIGITS / "model.onnx", "--name", "digits", "--version", "1.0.0", "--target", PROFILE,
        "--precision", "fp16", "--calibration", DIGITS / "calib.npz", "--eval", DIGITS / "eval.npz",
        "--out", out,
    )  # fmt: skip
    if result.returncode != 0:
        raise SystemExit(result.stderr)
    return out / f"digits-1.0.0-{PROFILE}"


def run_once(devices: int, bundle: Path, waves: str, bake: str, work: Path) -> dict:
    fleet = LocalFleet.create(work / f"fleet-{devices}")
    fleet.init_keys(b"bench passphrase")
    try:
        configs = fleet.add_sim_devices(devices, "bench", profile=PROFILE)
        fleet.up()
        fleet.publish(bundle)
        root, director_key = fleet.provisioning()
        settings = SimSettings(
            port=fleet.broker_port,
            window_s=5.0,
            install=InstallSettings(probation_s=0.5, probation_min_requests=3, warmup_runs=1),
            seed=1,
        )
        behaviours = SimBehaviours({"*": {"latency_ms": 4.0, "infer_sleeps": False}})
        sim = SimFleet(
            configs,
            trust=TrustSettings(root=root, director_key=director_key),
            behaviours=behaviours,
            settings=settings,
        )
        started = time.perf_counter()
        sim.start()
        try:
            if not sim.wait_connected(devices, 300):
                raise SystemExit(f"only {sim.summary().line()} after 300 s")
            connect_s = time.perf_counter() - started
            assert fleet.server is not None
            pid = fleet.server.proc.pid
            cpu_before, own_before = _proc_cpu_s(pid), resource.getrusage(resource.RUSAGE_SELF)
            peak_rss = _proc_rss_mib(pid)
            started = time.perf_counter()
            rollout_id = fleet.rollout("digits:1.0.0", "--group", "bench", "--waves", waves, "--bake", bake)
            state = "running"
            while state not in ("completed", "aborted"):
                time.sleep(1.0)
                state = fleet.rollout_status(rollout_id)["state"]
                peak_rss = max(peak_rss, _proc_rss_mib(pid))
                print(f"  {devices} devices: {sim.summary().line()}", flush=True)
            elapsed = time.perf_counter() - started
            cpu = _proc_cpu_s(pid) - cpu_before
            own_after = resource.getrusage(resource.RUSAGE_SELF)
            sim_cpu = (own_after.ru_utime + own_after.ru_stime) - (own_before.ru_utime + own_before.ru_stime)
            wait_for(lambda: sim.summary().installed.get("digits:1.0.0", 0) == devices, 30)
            on_release = sim.summary().installed.get("digits:1.0.0", 0)
            status = fleet.rollout_status(rollout_id)
        finally:
            sim.stop()
    finally:
        fleet.down()
    return {
        "devices": devices,
        "waves": waves,
        "bake": bake,
        "state": status["state"],
        "model_kib": round(sum(f.stat().st_size for f in bundle.iterdir()) / 1024, 1),
        "connect_s": round(connect_s, 1),
        "time_to_100_s": round(elapsed, 1),
        "lost": devices - on_release,
        "server_cpu_s": round(cpu, 1),
        "server_rss_mib": round(peak_rss, 1),
        "sim_cpu_s": round(sim_cpu, 1),
        "wave_sizes": [w["devices"] for w in status["waves"]],
    }


def _median_run(repeats: list[dict]) -> dict:
    """The median of every figure over repeated runs (devices lost: the worst run's)."""
    merged = dict(repeats[0])
    for key in ("connect_s", "time_to_100_s", "server_cpu_s", "server_rss_mib", "sim_cpu_s"):
        merged[key] = round(statistics.median(r[key] for r in repeats), 1)
    merged["lost"] = max(r["lost"] for r in repeats)
    merged["repeats"] = len(repeats)
    merged["time_to_100_s_each"] = [r["time_to_100_s"] for r in repeats]
    merged["state"] = ",".join(sorted({r["state"] for r in repeats}))
    return merged


def plot(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    labels = [str(r["devices"]) for r in runs]
    left.bar(labels, [r["time_to_100_s"] for r in runs], color="tab:blue")
    left.set_title("rollout to 100% (4 waves, s)")
    left.set_xlabel("simulated devices")
    right.bar(labels, [r["server_cpu_s"] for r in runs], color="tab:orange", label="server CPU s")
    right.bar(
        labels,
        [r["sim_cpu_s"] for r in runs],
        bottom=[r["server_cpu_s"] for r in runs],
        color="tab:grey",
        label="simulator CPU s",
    )
    right.set_title("CPU seconds during the rollout")
    right.set_xlabel("simulated devices")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", default="100,1000")
    parser.add_argument("--waves", default="1%,10%,50%,100%")
    parser.add_argument("--bake", default="2s")
    parser.add_argument("--repeats", type=int, default=3, help="runs per fleet size; medians reported")
    args = parser.parse_args()
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        bundle = _bundle(work / "bundles")
        for devices in (int(n) for n in args.devices.split(",")):
            repeats = []
            for n in range(args.repeats):
                print(f"{devices} simulated devices, run {n + 1}/{args.repeats} ...", flush=True)
                repeats.append(run_once(devices, bundle, args.waves, args.bake, work / f"run-{n}"))
                print(json.dumps(repeats[-1]), flush=True)
            runs.append(_median_run(repeats))
    result = {"created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "runs": runs}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "fleet.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(runs, RESULTS / "fleet.png")
    header = ("devices", "connect s", "to 100% s", "lost", "server CPU s", "server RSS MiB")
    print(" ".join(f"{h:>14}" for h in header))
    for r in runs:
        keys = ("devices", "connect_s", "time_to_100_s", "lost", "server_cpu_s", "server_rss_mib")
        print(" ".join(f"{r[k]:>14}" for k in keys))


if __name__ == "__main__":
    main()
