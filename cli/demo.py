"""``edgec demo``: the whole loop on one machine, driven through the real command line.

Builds the digits sample as two releases for two device profiles, signs them into an image
repository, registers devices, starts a broker (Mosquitto, else an embedded amqtt broker), the
OTA server and one agent process per device, rolls out 1.0.0 and then 2.0.0 in waves while a
small load generator calls the agents' inference APIs, and ends with the fleet table. Every
``edgec`` command it runs is printed as a user would type it (``$DEMO`` is the work folder),
so the output doubles as a walkthrough. Everything lives in one work folder, removed at the
end, on an error or on Ctrl-C, unless ``--keep``.
"""

from __future__ import annotations

import argparse
import contextlib
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cli._demo_output import plural, pump_lines, rollout_summary
from edgec.errors import OptionError
from localfleet import HarnessError, LoadGenerator, LocalFleet, choose_broker, free_port

__all__ = ["register"]

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "samples" / "digits"
PROFILES = {"x86-64-cpu": "x86", "raspberry-pi-4": "pi4"}  # profile -> device name prefix
DEFAULT_DEVICES = {"x86-64-cpu": 2, "raspberry-pi-4": 1}
GROUP = "demo"
BAKE = "5s"
V2_RULES = ("install_failure_rate>0.05", "p95_ms>3*control", "drift=drift")
TELEMETRY_WINDOW_S = 5.0  # long enough for steady p95 figures on a busy 2-core machine
ROLLOUT_TIMEOUT_S = 180.0
STEPS = 11
LOAD_PER_AGENT_PER_S = 50.0
# on top of what edgec devices add writes: short probation and telemetry windows, so the demo moves
AGENT_SETTINGS = {"install": {"probation_s": 2.0}, "telemetry": {"window_s": TELEMETRY_WINDOW_S}}


def register(commands: Any) -> None:
    demo = commands.add_parser(
        "demo",
        help="the whole loop on this machine: build, sign, broker, server, 3 agents, two rollouts",
        description="Build the digits sample as two releases, publish them, start a broker, the OTA "
        "server and agent processes, roll out 1.0.0 then 2.0.0 under load, and print the fleet table. "
        "Everything runs in one work folder, removed at the end unless --keep.",
    )
    demo.add_argument("--keep", action="store_true", help="keep the work folder (logs, keys, bundles)")
    demo.add_argument(
        "--workdir",
        type=Path,
        metavar="DIR",
        help="work in this empty or new folder instead of a temp one (removed too)",
    )
    demo.add_argument(
        "--devices-per-profile",
        action="append",
        default=[],
        metavar="PROFILE=N",
        help="devices of a profile (x86-64-cpu or raspberry-pi-4; default x86-64-cpu=2, raspberry-pi-4=1)",
    )
    demo.add_argument(
        "--broker",
        choices=["auto", "mosquitto", "embedded"],
        default="auto",
        help="the MQTT broker: Mosquitto, amqtt in this process (edgec[demo]), or auto (Mosquitto if here)",
    )
    demo.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    devices = _device_plan(args.devices_per_profile)
    broker = choose_broker(args.broker)
    if not (DIGITS / "model.onnx").exists():
        raise OptionError(f"the digits sample is not at {DIGITS}: run edgec demo from a checkout of edgec")
    workdir = _workdir(args.workdir)
    demo = Demo(workdir, devices, broker)
    outcome = "failed"
    # both set here: a shell that starts a job in the background (``edgec demo &``, CI) makes
    # it ignore SIGINT, and Python then keeps ignoring it
    previous = signal.signal(signal.SIGINT, _raise_interrupt), signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        demo.run()
        outcome = "done"
    except KeyboardInterrupt:
        outcome = "interrupted"
        raise
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the cleanup short
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            demo.close(keep=args.keep, outcome=outcome)
        finally:
            signal.signal(signal.SIGINT, previous[0] or signal.default_int_handler)
            signal.signal(signal.SIGTERM, previous[1] or signal.SIG_DFL)
    return 0


def _raise_interrupt(_signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt


def _device_plan(specs: list[str]) -> list[tuple[str, str]]:
    """``[(device id, profile)]`` from ``PROFILE=N`` options over the defaults."""
    counts = dict(DEFAULT_DEVICES)
    for spec in specs:
        profile, _, n = spec.partition("=")
        if profile not in PROFILES or not n.isdigit() or int(n) > 10:
            raise OptionError(
                f"bad --devices-per-profile {spec!r}: write PROFILE=N with PROFILE one of "
                f"{', '.join(PROFILES)} and N from 0 to 10"
            )
        counts[profile] = int(n)
    if not sum(counts.values()):
        raise OptionError("the demo needs at least one device")
    return [(f"{PROFILES[p]}-{i}", p) for p, n in counts.items() for i in range(1, n + 1)]


def _workdir(path: Path | None) -> Path:
    if path is None:
        return Path(tempfile.mkdtemp(prefix="edgec-demo-")).resolve()
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise OptionError(f"--workdir {path} is not an empty folder")
    path.mkdir(parents=True, exist_ok=True)
    return path.resolve()


class Demo:
    def __init__(self, workdir: Path, devices: list[tuple[str, str]], broker: str) -> None:
        self.dir = workdir
        self.plan = devices
        self.fleet = LocalFleet.create(
            workdir, fleet="default", broker=broker, echo=lambda text: self.say(text, indent=2)
        )
        self.started = time.perf_counter()
        self.step_no = 0
        self.load: LoadGenerator | None = None
        (workdir / "logs").mkdir()

    # -- output ---------------------------------------------------------------------------------
    def say(self, text: str = "", indent: int = 0) -> None:
        for line in text.splitlines() or [""]:
            print(" " * indent + line.replace(str(self.dir), "$DEMO"), flush=True)

    @contextlib.contextmanager
    def step(self, title: str) -> Iterator[None]:
        self.step_no += 1
        self.say(f"\n[{self.step_no}/{STEPS}] {title}")
        started = time.perf_counter()
        yield
        self.say(f"ok, {time.perf_counter() - started:.1f} s", indent=2)

    # -- the steps ------------------------------------------------------------------------------
    def run(self) -> None:
        print(f"edgec demo: working in {self.dir} (shown as $DEMO below)", flush=True)
        self.build("1.0.0", "the profiles' default precisions", ())
        self.build("2.0.0", "int8 for both (x86 was fp32)", ("--precision", "int8"))
        self.publish()
        self.register_devices()
        self.start_broker()
        self.start_server()
        self.start_agents()
        if self.rollout("digits:1.0.0", "100%", ()) != "completed":
            raise HarnessError("the first rollout did not complete (see its status above)")
        self.start_load()
        outcome = self.rollout("digits:2.0.0", "1,100%", V2_RULES)
        self.fleet_table(outcome)

    def build(self, version: str, why: str, extra: tuple[str, ...]) -> None:
        targets = [a for p in PROFILES for a in ("--target", p)]
        with self.step(f"build digits:{version} for {' and '.join(PROFILES)}: {why}"):
            self.fleet.edgec(
                "build", "samples/digits/model.onnx", "--name", "digits", "--version", version, *targets,
                *extra, "--calibration", "samples/digits/calib.npz", "--eval", "samples/digits/eval.npz",
                "--out", self.dir / "bundles",
            )  # fmt: skip

    def publish(self) -> None:
        with self.step("sign the four bundles into a TUF image repository"):
            # the operator's offline keys (root, targets) and the server's online ones
            # (snapshot, timestamp, director), each under its own passphrase
            self.fleet.init_keys(b"edgec demo passphrase", b"demo online")
            self.fleet.publish(*sorted((self.dir / "bundles").iterdir()))

    def register_devices(self) -> None:
        with self.step(f"register {plural(self.plan, 'device')} in group {GROUP} (SQLite registry)"):
            self.say(f"$ export EDGEC_DB={self.fleet.db}", indent=2)
            for device, profile in self.plan:
                self.fleet.add_agent(device, profile, GROUP, settings=AGENT_SETTINGS)
            self.say(
                "demo settings added to each agent config: its own state_dir and HTTP port, "
                f"[install] probation_s = 2, [telemetry] window_s = {TELEMETRY_WINDOW_S:g}",
                indent=4,
            )

    def start_broker(self) -> None:
        port = self.fleet.broker_port
        if self.fleet.broker == "embedded":
            title = (
                f"start an embedded amqtt broker on 127.0.0.1:{port} "
                "(no Mosquitto here: device passwords, no per-device ACL)"
            )
        else:
            title = f"start Mosquitto on 127.0.0.1:{port} with the ACL from the registry"
        with self.step(title):
            self.fleet.configure_broker()
            self.fleet.start_broker()
            name = "amqtt" if self.fleet.broker == "embedded" else "mosquitto"
            self.say(f"{name} listening on 127.0.0.1:{port}", indent=4)

    def start_server(self) -> None:
        self.fleet.http_port = free_port()
        with self.step(f"start the OTA server (operator API on http://127.0.0.1:{self.fleet.http_port})"):
            config = self.fleet.write_server_config()
            self.say("$DEMO/server.toml:", indent=2)
            self.say(config.read_text().rstrip(), indent=4)
            self.fleet.start_server()
            server = f"http://127.0.0.1:{self.fleet.http_port}"
            self.fleet.env.update(EDGEC_SERVER=server, EDGEC_TOKEN=self.fleet.token)
            self.say(f"$ export EDGEC_SERVER={server} EDGEC_TOKEN={self.fleet.token}", indent=2)

    def start_agents(self) -> None:
        with self.step(f"start {plural(self.plan, 'agent')}, one process per device"):
            self.fleet.start_agents()
            for agent in self.fleet.agents.values():
                self.say(
                    f"{agent.device} ({agent.profile}): inference API on http://127.0.0.1:{agent.http_port}/v2",
                    indent=4,
                )

    def rollout(self, release: str, waves: str, rules: tuple[str, ...]) -> str:
        """Start a rollout and follow it to its end; its final state."""
        under_load = " under load" if self.load else ""
        with self.step(f"roll out {release} to group {GROUP} in waves {waves}{under_load}"):
            abort = [a for rule in rules for a in ("--abort-if", rule)]
            rollout_id = self.fleet.rollout(
                release, "--group", GROUP, "--waves", waves, "--bake", BAKE, *abort
            )
            final = self.follow(rollout_id)
            self.say(final, indent=4)
        return final.split(" — ", 1)[-1].split(",")[0].strip()

    def follow(self, rollout_id: str) -> str:
        """``edgec rollout status ID --watch`` until the rollout ends: a line per change; its last
        drawing (the final status) is returned."""
        args = ("rollout", "status", rollout_id, "--watch", "--interval", "1")
        self.say("$ edgec " + " ".join(args), indent=2)
        proc = subprocess.Popen(
            [sys.executable, "-m", "edgec", *args], cwd=ROOT, env=self.fleet.env, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=pump_lines, args=(proc.stdout, lines), daemon=True).start()
        frame: list[str] = []
        shown, started = "", time.perf_counter()
        deadline = time.monotonic() + ROLLOUT_TIMEOUT_S
        try:
            while True:
                try:
                    line = lines.get(timeout=1.0)
                except queue.Empty:
                    if time.monotonic() > deadline:
                        raise HarnessError(
                            f"rollout {rollout_id} did not end in {ROLLOUT_TIMEOUT_S:.0f} s"
                        ) from None
                    continue
                if line is None:
                    break
                if line.startswith(f"rollout {rollout_id}:"):
                    frame = []
                frame.append(line.rstrip("\n"))
                summary = rollout_summary(frame)
                if summary and summary != shown:
                    shown = summary
                    self.say(f"[{time.perf_counter() - started:5.1f}s] {summary}", indent=4)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        if proc.returncode != 0:
            raise HarnessError("edgec rollout status failed:\n" + "\n".join(frame[-10:]))
        return "\n".join(frame).strip()

    def start_load(self) -> None:
        import numpy as np

        with self.step(
            f"send inference requests to every agent ({LOAD_PER_AGENT_PER_S:.0f}/s each), keep going"
        ):
            with np.load(DIGITS / "eval.npz") as data:
                inputs = data["x"]
            ports = [agent.http_port for agent in self.fleet.agents.values()]
            self.load = LoadGenerator(ports, inputs, rate_per_s=LOAD_PER_AGENT_PER_S)
            self.load.start()
            self.say("POST /v2/models/digits/infer with the digits eval inputs (KServe v2 JSON)", indent=4)
            self.wait_for_telemetry()

    def wait_for_telemetry(self, timeout_s: float = 60.0) -> None:
        """Until every device's latest telemetry window (in the registry) comes from the release it
        has installed, with latency figures and a drift verdict."""
        deadline = time.monotonic() + timeout_s
        pending = set(self.fleet.agents)
        while pending:
            for device in self.fleet.devices():
                t = device.get("telemetry") or {}
                release = device.get("installed_release")
                if release and t.get("model") == release and t.get("p95_ms") is not None and t.get("drift"):
                    if device["id"] in pending:
                        self.say(
                            f"{device['id']}: {t['requests']} requests in {t['window_s']:.1f} s, "
                            f"p50 {t['p50_ms']:.2f} ms, p95 {t['p95_ms']:.2f} ms, drift {t['drift']}",
                            indent=4,
                        )
                    pending.discard(device["id"])
            if pending and time.monotonic() > deadline:
                raise HarnessError(f"no telemetry from {', '.join(sorted(pending))} in {timeout_s:.0f} s")
            time.sleep(0.5)

    def fleet_table(self, outcome: str) -> None:
        with self.step("the fleet, as the operator sees it"):
            if outcome != "completed":  # the abort rules at work, not a failure of the demo
                self.say(
                    f"digits:2.0.0 was {outcome} by its abort rules: the devices it reached went back",
                    indent=4,
                )
            self.wait_for_telemetry()
            if self.load is not None:
                sent, failed = self.load.counts()
                self.say(f"load generator: {sent} requests, {failed} failed", indent=4)
            table = self.fleet.edgec("fleet", "ls", show=False).stdout
        took = time.perf_counter() - self.started
        self.say(f"\nedgec demo: built, signed, delivered and rolled out in {took:.0f} s:")
        self.say()
        self.say(table.rstrip())

    # -- cleanup --------------------------------------------------------------------------------
    def close(self, keep: bool, outcome: str) -> None:
        if outcome != "done":
            hint = "" if keep else f" and removing {self.dir} (--keep keeps it, with the logs)"
            print(f"\nedgec demo: {outcome}; stopping everything{hint}", file=sys.stderr, flush=True)
        if self.load is not None:
            self.load.stop()
        self.fleet.down()
        if keep:
            print(f"edgec demo: kept {self.dir} (logs in {self.dir / 'logs'})", flush=True)
        else:
            shutil.rmtree(self.dir, ignore_errors=True)
