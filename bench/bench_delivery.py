"""Delivery throughput over MQTT (chunked, through Mosquitto) and over HTTP, side by side.

Run:  python bench/bench_delivery.py [--repeats 5] [--mb 20] [--devices 1,10,100] [--sweep-mb 2]

Starts a real Mosquitto on free ports with the configuration ``edgec broker config`` writes
(ACL, passwords), the server's MQTT fetch responder and its HTTP server, then downloads as
devices would: one ``--mb`` blob by one device, alternating MQTT and HTTP in every round;
then ``--devices`` devices at once (each with its own credentials), each fetching its own
copy of a ``--sweep-mb`` blob. Reports medians side by side (MB/s in all, and the slowest
device's time) and writes bench/results/delivery.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import pwd
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import paho.mqtt.client as mqtt  # noqa: E402

from agent.mqtt_fetch import ChunkClient  # noqa: E402
from ota_server.broker import SERVER_USER, write_broker_config  # noqa: E402
from ota_server.fetch import FetchServer  # noqa: E402
from ota_server.http_api import HttpApi  # noqa: E402
from ota_server.registry import Registry  # noqa: E402
from ota_server.repository import ImageRepository  # noqa: E402

RESULTS = ROOT / "bench" / "results"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _client(user: str, password: str, port: int) -> mqtt.Client:
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
    client.username_pw_set(user, password)
    connected = threading.Event()
    client.on_connect = lambda *_args: connected.set()
    client.connect("127.0.0.1", port)
    client.loop_start()
    if not connected.wait(10):
        raise SystemExit("could not connect to the broker")
    return client


def _mqtt_download(chunks: ChunkClient, path: str) -> bytes:
    parts, offset, total = [], 0, 1
    while offset < total:
        total, data = chunks.chunk(path, offset)
        parts.append(data)
        offset += len(data)
    return b"".join(parts)


def _http_download(port: int, path: str) -> bytes:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/repo/{path}", timeout=120) as r:
        return bytes(r.read())


def _at_once(jobs: list, check: str) -> tuple[float, float]:
    """Run every job in its own thread; (wall seconds for all, slowest job's seconds)."""
    times: list[float] = []
    errors: list[BaseException] = []

    def run(job) -> None:
        started = time.perf_counter()
        try:
            if hashlib.sha256(job()).hexdigest() != check:
                raise AssertionError("downloaded bytes differ")
        except BaseException as e:  # reported after the round
            errors.append(e)
        times.append(time.perf_counter() - started)

    threads = [threading.Thread(target=run, args=(job,)) for job in jobs]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise SystemExit(f"{len(errors)} downloads failed: {errors[0]!r}")
    return time.perf_counter() - started, max(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--mb", type=int, default=20)
    parser.add_argument("--devices", default="1,10,100", help="concurrent devices to sweep")
    parser.add_argument("--sweep-mb", type=float, default=2.0, help="blob size in the sweep")
    args = parser.parse_args()
    sweep = [int(n) for n in args.devices.split(",") if n]
    mosquitto = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        repo = ImageRepository(folder / "repo")
        (repo.targets_dir).mkdir(parents=True)
        blob = repo.targets_dir / "blob.bin"
        blob.write_bytes(os.urandom(args.mb * 1024 * 1024))
        digest = hashlib.sha256(blob.read_bytes()).hexdigest()
        small = repo.targets_dir / "small.bin"
        small.write_bytes(os.urandom(int(args.sweep_mb * 1024 * 1024)))
        small_digest = hashlib.sha256(small.read_bytes()).hexdigest()
        registry = Registry.open(f"sqlite:///{folder / 'fleet.db'}")
        _, password = registry.add_device("bench-device", "bench", "g", "x86-64-cpu")
        passwords = {
            f"dev-{n:03d}": registry.add_device(f"dev-{n:03d}", "bench", "g", "x86-64-cpu")[1]
            for n in range(max(sweep, default=0))
        }
        port = _free_port()
        user = pwd.getpwuid(os.getuid()).pw_name
        files = write_broker_config(
            registry, folder / "broker", port=port, tls_port=_free_port(), run_as=user
        )
        broker = subprocess.Popen(
            [mosquitto, "-c", str(files.config)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        time.sleep(0.5)
        try:
            server = _client(SERVER_USER, files.server_password, port)
            FetchServer(repo.folder, server).start()
            device = _client("bench-device", password, port)
            chunks = ChunkClient(device, "bench", "bench-device", timeout_s=30)
            api = HttpApi(repo, registry, {})
            http_port = api.serve()
            time.sleep(0.3)
            mqtt_s, http_s = [], []
            for _ in range(args.repeats):
                started = time.perf_counter()
                data = _mqtt_download(chunks, "targets/blob.bin")
                mqtt_s.append(time.perf_counter() - started)
                assert hashlib.sha256(data).hexdigest() == digest
                started = time.perf_counter()
                data = _http_download(http_port, "targets/blob.bin")
                http_s.append(time.perf_counter() - started)
                assert hashlib.sha256(data).hexdigest() == digest
            devices = {
                d: ChunkClient(_client(d, pw, port), "bench", d, timeout_s=60) for d, pw in passwords.items()
            }
            time.sleep(0.5)
            rounds: dict[int, dict[str, list[tuple[float, float]]]] = {}
            for n in sweep:
                rounds[n] = {"mqtt": [], "http": []}
                clients = list(devices.values())[:n]
                for _ in range(args.repeats):
                    jobs = [lambda c=c: _mqtt_download(c, "targets/small.bin") for c in clients]
                    rounds[n]["mqtt"].append(_at_once(jobs, small_digest))
                    jobs = [lambda: _http_download(http_port, "targets/small.bin") for _ in clients]
                    rounds[n]["http"].append(_at_once(jobs, small_digest))
                print(f"  {n} devices: done", flush=True)
            api.close()
        finally:
            broker.terminate()
            broker.wait(timeout=10)
    mb = args.mb
    result = {
        "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "blob_mb": mb,
        "repeats": args.repeats,
        "mqtt_s": [round(t, 3) for t in mqtt_s],
        "http_s": [round(t, 3) for t in http_s],
        "mqtt_mb_per_s": round(mb / statistics.median(mqtt_s), 1),
        "http_mb_per_s": round(mb / statistics.median(http_s), 1),
    }
    print(f"one {mb} MB blob, {args.repeats} rounds alternating, on this machine (loopback):")
    print(
        f"  MQTT (256 KiB chunks via Mosquitto): median {statistics.median(mqtt_s):.2f} s = "
        f"{result['mqtt_mb_per_s']} MB/s"
    )
    print(
        f"  HTTP (one GET):                      median {statistics.median(http_s):.2f} s = "
        f"{result['http_mb_per_s']} MB/s"
    )
    result["sweep_mb"] = args.sweep_mb
    result["sweep"] = {}
    print(f"\n{args.sweep_mb:g} MB each, N devices at once, median of {args.repeats} rounds:")
    print(f"  {'devices':>7}  {'MQTT MB/s':>10}  {'slowest s':>9}  {'HTTP MB/s':>10}  {'slowest s':>9}")
    for n, sides in rounds.items():
        row = {}
        for side, measured in sides.items():
            wall = statistics.median(w for w, _ in measured)
            row[f"{side}_mb_per_s"] = round(n * args.sweep_mb / wall, 1)
            row[f"{side}_slowest_s"] = round(statistics.median(s for _, s in measured), 3)
        result["sweep"][str(n)] = row
        print(
            f"  {n:>7}  {row['mqtt_mb_per_s']:>10}  {row['mqtt_slowest_s']:>9}  "
            f"{row['http_mb_per_s']:>10}  {row['http_slowest_s']:>9}"
        )
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "delivery.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
