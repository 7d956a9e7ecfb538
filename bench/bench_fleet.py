"""Fleet rollouts at scale: simulated devices, one broker, one or more OTA server replicas.

Run:  python bench/bench_fleet.py [--devices 100,1000,10000] [--setups base:sqlite:1,sqlite:1,postgresql:3]

For each fleet size and setup: a real Mosquitto (the generated config, one password per
device and the ACL), the OTA server (``REPLICAS`` replicas of ``edgec server run`` on a SQLite
file or on a PostgreSQL database of the run's own; ``base:`` runs the server of the baseline
commit, ``--baseline``, before the scale-out work), and that many ``sim`` devices in this
process, each a real MQTT client running the agent's install pipeline (director document,
TUF refresh over MQTT, chunked download with chunk hashes, stage, probation) with a
stand-in runtime. The digits sample at fp16 (an 84 KiB release) goes out with ``edgec
rollout start`` in four waves with no bake (``--bake 0s``: the time is the delivery's); the
devices send a telemetry window every 60 s (the agent's default). The clock runs from the
start command to the rollout's ``completed`` (polled from the rollout list, which costs the
server little). Recorded: time until every device is connected, time to 100%, devices lost
(not reporting the release at the end), the server's CPU seconds (every replica) and per
installed device, its peak resident memory (the largest replica), the broker's and
PostgreSQL's CPU seconds, and this process's CPU (the simulator) per device; the median of
``--repeats`` runs per cell (devices lost: the worst run). ``--sim-profile DIR`` records
py-spy profiles of this process and of the first replica during each rollout. Writes
bench/results/fleet.json and fleet.png.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import platform
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agent.config import InstallSettings, TrustSettings  # noqa: E402
from localfleet import LocalFleet, export_commit, run_edgec, wait_for  # noqa: E402
from localfleet.database import postgres_database  # noqa: E402
from localfleet.releases import DIGITS  # noqa: E402
from sim import SimBehaviours, SimFleet, SimSettings  # noqa: E402

RESULTS = ROOT / "bench" / "results"
PROFILE = "x86-64-cpu"
BASELINE = "7a6a829"  # main before issue 17: one server process, one transaction per report


@dataclasses.dataclass(frozen=True)
class Setup:
    database: str  # "sqlite" or "postgresql"
    replicas: int
    base: bool = False  # the baseline commit's server

    @classmethod
    def parse(cls, text: str) -> Setup:
        parts = text.split(":")
        base = parts[0] == "base"
        database, replicas = parts[1:] if base else parts
        if database not in ("sqlite", "postgresql") or not replicas.isdigit():
            raise SystemExit(f"--setups: {text!r} is not [base:]sqlite|postgresql:REPLICAS")
        if database == "sqlite" and int(replicas) > 1:
            raise SystemExit("--setups: replicas share a PostgreSQL registry, not a SQLite file")
        return cls(database, int(replicas), base)

    @property
    def label(self) -> str:
        who = "baseline" if self.base else "now"
        return f"{who}, {self.database}, {self.replicas} replica{'s' if self.replicas > 1 else ''}"


def _proc_cpu_s(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    ticks = int(fields[11]) + int(fields[12])  # utime + stime
    return ticks / os.sysconf("SC_CLK_TCK")


def _proc_rss_mib(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _postgres_cpu_s() -> float:
    """Every PostgreSQL process's CPU on this machine (the bench's database is its only load)."""
    total = 0.0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        if "(postgres)" in text:
            fields = text.rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def _machine() -> dict:
    """The CPU's model and the instruction-set features that matter here, and the cores."""
    model, flags = platform.machine(), []
    wanted = ("avx2", "avx512f", "avx512_vnni", "amx_tile")
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
        elif line.startswith("flags"):
            flags = [f for f in wanted if f in line.split()]
    return {"cpu": model, "flags": flags, "cores": os.cpu_count(), "load_at_start": os.getloadavg()[0]}


def _py_spy(pid: int, out: Path) -> subprocess.Popen[bytes]:
    """py-spy sampling ``pid`` (threads holding the GIL: Python's CPU) into ``out`` (raw stacks)."""
    exe = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(exe).exists():
        raise SystemExit("--sim-profile needs py-spy (pip install py-spy)")
    out.parent.mkdir(parents=True, exist_ok=True)
    command = [exe, "record", "--gil", "--nonblocking", "-r", "50", "-f", "raw", "-o", str(out)]
    return subprocess.Popen([*command, "-p", str(pid)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _stop_py_spy(recorders: list[subprocess.Popen[bytes]]) -> None:
    for recorder in recorders:
        recorder.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
    for recorder in recorders:
        try:
            recorder.wait(timeout=30)
        except subprocess.TimeoutExpired:
            recorder.kill()


def _bundle(out: Path) -> Path:
    result = run_edgec(
        "build", DIGITS / "model.onnx", "--name", "digits", "--version", "1.0.0", "--target", PROFILE,
        "--precision", "fp16", "--calibration", DIGITS / "calib.npz", "--eval", DIGITS / "eval.npz",
        "--out", out,
    )  # fmt: skip
    if result.returncode != 0:
        raise SystemExit(result.stderr)
    return out / f"digits-1.0.0-{PROFILE}"


def _rollout_state(fleet: LocalFleet, rollout_id: str) -> str:
    listed = fleet.api("/v1/rollouts")
    return str(next(r["state"] for r in listed if r["id"] == rollout_id))


def run_once(
    devices: int,
    setup: Setup,
    bundle: Path,
    args: argparse.Namespace,
    work: Path,
    *,
    baseline: Path | None = None,
    profile: Path | None = None,
) -> dict:
    with ExitStack() as stack:
        database = stack.enter_context(postgres_database()) if setup.database == "postgresql" else None
        fleet = LocalFleet.create(
            work / f"fleet-{devices}",
            database=database,
            replicas=setup.replicas,
            server_code=baseline if setup.base else None,
        )
        fleet.init_keys(b"bench passphrase")
        try:
            result = _rollout(fleet, devices, setup, bundle, args, work, profile)
        finally:
            fleet.down()
            if args.sim_state is not None:
                shutil.rmtree(args.sim_state / work.name, ignore_errors=True)
    return result


def _rollout(  # noqa: PLR0917
    fleet: LocalFleet,
    devices: int,
    setup: Setup,
    bundle: Path,
    args: argparse.Namespace,
    work: Path,
    profile: Path | None,
) -> dict:
    configs = fleet.add_sim_devices(devices, "bench", profile=PROFILE)
    if args.sim_state is not None:  # the devices' state folders (their "flash") elsewhere, e.g. tmpfs
        configs = [dataclasses.replace(c, state_dir=args.sim_state / work.name / c.device) for c in configs]
    fleet.up()
    fleet.publish(bundle)
    root, director_key = fleet.provisioning()
    settings = SimSettings(
        port=fleet.broker_port,
        window_s=60.0,
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
        if not sim.wait_connected(devices, 600):
            raise SystemExit(f"only {sim.summary().line()} after 600 s")
        connect_s = time.perf_counter() - started
        pids = [service.proc.pid for service in fleet.servers.values()]
        assert fleet.broker_service is not None
        broker_pid = fleet.broker_service.proc.pid
        cpu_before = sum(_proc_cpu_s(pid) for pid in pids)
        broker_before, db_before = _proc_cpu_s(broker_pid), _postgres_cpu_s()
        own_before = resource.getrusage(resource.RUSAGE_SELF)
        peak_rss = max(_proc_rss_mib(pid) for pid in pids)
        recorders = []
        if profile is not None:
            recorders = [
                _py_spy(os.getpid(), profile / f"sim-{devices}.raw"),
                _py_spy(pids[0], profile / f"server-{devices}.raw"),
            ]
        started = time.perf_counter()
        rollout_id = fleet.rollout(
            "digits:1.0.0", "--group", "bench", "--waves", args.waves, "--bake", args.bake
        )
        state, deadline = "running", time.monotonic() + args.timeout
        while state not in ("completed", "aborted") and time.monotonic() < deadline:
            time.sleep(1.0)
            state = _rollout_state(fleet, rollout_id)
            peak_rss = max(peak_rss, *(_proc_rss_mib(pid) for pid in pids))
            print(f"  {devices} devices, {setup.label}: {sim.summary().line()}", flush=True)
        elapsed = time.perf_counter() - started
        cpu = sum(_proc_cpu_s(pid) for pid in pids) - cpu_before
        broker_cpu = _proc_cpu_s(broker_pid) - broker_before
        db_cpu = _postgres_cpu_s() - db_before
        own_after = resource.getrusage(resource.RUSAGE_SELF)
        _stop_py_spy(recorders)
        sim_cpu = (own_after.ru_utime - own_before.ru_utime) + (own_after.ru_stime - own_before.ru_stime)
        wait_for(lambda: sim.summary().installed.get("digits:1.0.0", 0) == devices, 30)
        on_release = sim.summary().installed.get("digits:1.0.0", 0)
        status = fleet.rollout_status(rollout_id)
    finally:
        sim.stop()
    return {
        "devices": devices,
        "setup": setup.label,
        "database": setup.database,
        "replicas": setup.replicas,
        "baseline": setup.base,
        "waves": args.waves,
        "bake": args.bake,
        "state": state,
        "model_kib": round(sum(f.stat().st_size for f in bundle.iterdir()) / 1024, 1),
        "connect_s": round(connect_s, 1),
        "time_to_100_s": round(elapsed, 1),
        "lost": devices - on_release,
        "server_cpu_s": round(cpu, 1),
        "server_cpu_ms_per_device": round(cpu * 1000 / max(on_release, 1), 2),
        "server_rss_mib": round(peak_rss, 1),
        "broker_cpu_s": round(broker_cpu, 1),
        "db_cpu_s": round(db_cpu, 1) if setup.database == "postgresql" else None,
        "sim_cpu_s": round(sim_cpu, 1),
        "sim_cpu_ms_per_device": round(sim_cpu * 1000 / devices, 2),
        "sim_rss_mib": round(own_after.ru_maxrss / 1024, 1),  # this process's peak (kB on Linux)
        "wave_sizes": [w["devices"] for w in status["waves"]],
    }


FIGURES = (
    "connect_s", "time_to_100_s", "server_cpu_s", "server_cpu_ms_per_device", "server_rss_mib",
    "broker_cpu_s", "sim_cpu_s", "sim_cpu_ms_per_device", "sim_rss_mib",
)  # fmt: skip


def _median_run(repeats: list[dict]) -> dict:
    """The median of every figure over repeated runs (devices lost: the worst run's)."""
    merged = dict(repeats[0])
    for key in FIGURES:
        merged[key] = round(statistics.median(r[key] for r in repeats), 2)
    if repeats[0]["db_cpu_s"] is not None:
        merged["db_cpu_s"] = round(statistics.median(r["db_cpu_s"] for r in repeats), 1)
    merged["lost"] = max(r["lost"] for r in repeats)
    merged["repeats"] = len(repeats)
    merged["time_to_100_s_each"] = [r["time_to_100_s"] for r in repeats]
    merged["state"] = ",".join(sorted({r["state"] for r in repeats}))
    return merged


def plot(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for label in dict.fromkeys(r["setup"] for r in runs):
        mine = [r for r in runs if r["setup"] == label]
        style = "--" if mine[0]["baseline"] else "-"
        sizes = [r["devices"] for r in mine]
        left.plot(sizes, [r["time_to_100_s"] for r in mine], style, marker="o", label=label)
        right.plot(sizes, [r["server_cpu_ms_per_device"] for r in mine], style, marker="o", label=label)
    left.set_title("rollout to 100% (4 waves, no bake), s")
    right.set_title("server CPU per installed device, ms")
    right.axhline(5.0, color="grey", linewidth=0.8, linestyle=":")
    for axis in (left, right):
        axis.set_xscale("log")
        axis.set_yscale("log")
        axis.set_xlabel("simulated devices")
        axis.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", default="100,1000,10000")
    parser.add_argument(
        "--setups",
        default="base:sqlite:1,sqlite:1,postgresql:3",
        help="comma-separated [base:]sqlite|postgresql:REPLICAS (base: the --baseline commit's server)",
    )
    parser.add_argument("--baseline", default=BASELINE, help=f"the commit 'base:' runs (default {BASELINE})")
    parser.add_argument("--max-base-devices", type=int, default=1000, help="larger fleets skip the baseline")
    parser.add_argument("--waves", default="1%,10%,50%,100%")
    parser.add_argument("--bake", default="0s")
    parser.add_argument("--repeats", type=int, default=3, help="runs per cell below 10,000 devices; medians")
    parser.add_argument("--timeout", type=float, default=900, help="seconds a rollout may take")
    parser.add_argument(
        "--sim-profile", type=Path, metavar="DIR", help="py-spy profiles of the simulator and the server"
    )
    parser.add_argument(
        "--sim-state",
        type=Path,
        metavar="DIR",
        help="the simulated devices' state folders under DIR (e.g. /dev/shm: 10,000 devices' fsyncs "
        "then do not queue on this machine's one disk); default: in the fleet's work folder",
    )
    args = parser.parse_args()
    setups = [Setup.parse(s) for s in args.setups.split(",")]
    started_on = _machine()
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        bundle = _bundle(work / "bundles")
        baseline = export_commit(args.baseline, work / "baseline") if any(s.base for s in setups) else None
        if any(s.base for s in setups) and baseline is None:
            raise SystemExit(f"the baseline commit {args.baseline} is not in this clone's history")
        for devices in (int(n) for n in args.devices.split(",")):
            repeats_here = args.repeats if devices < 10_000 else 1
            for setup in setups:
                if setup.base and devices > args.max_base_devices:
                    continue
                repeats = []
                for n in range(repeats_here):
                    print(f"{devices} devices, {setup.label}, run {n + 1}/{repeats_here} ...", flush=True)
                    profile = args.sim_profile / f"{devices}-{n}" if args.sim_profile else None
                    cell = work / f"run-{devices}-{setup.database}-{setup.replicas}-{int(setup.base)}-{n}"
                    repeats.append(
                        run_once(devices, setup, bundle, args, cell, baseline=baseline, profile=profile)
                    )
                    print(json.dumps(repeats[-1]), flush=True)
                runs.append(_median_run(repeats))
    machine = {**started_on, "load_at_end": os.getloadavg()[0]}
    result = {
        "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": machine,
        "baseline": args.baseline,
        "runs": runs,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "fleet.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(runs, RESULTS / "fleet.png")
    header = ("devices", "setup", "to 100% s", "lost", "server ms/dev", "server RSS", "broker s", "db s")
    print(" | ".join(header))
    for r in runs:
        keys = ("devices", "setup", "time_to_100_s", "lost", "server_cpu_ms_per_device", "server_rss_mib")
        print(" | ".join(str(r[k]) for k in keys), "|", r["broker_cpu_s"], "|", r["db_cpu_s"])


if __name__ == "__main__":
    main()
