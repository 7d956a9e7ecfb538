"""Delivery throughput: one 20 MB blob over MQTT (chunked, through Mosquitto) and over HTTP.

Run:  python bench/bench_delivery.py [--repeats 5] [--mb 20]

Starts a real Mosquitto on free ports with the configuration ``edgec broker config`` writes
(ACL, passwords), the server's MQTT fetch responder and its HTTP server, then downloads the
same blob as a device would, alternating MQTT and HTTP in every round. Reports the median
MB/s of each side by side and writes bench/results/delivery.json.
"""

from __future__ import annotations

import argparse
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--mb", type=int, default=20)
    args = parser.parse_args()
    mosquitto = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        repo = ImageRepository(folder / "repo")
        (repo.targets_dir).mkdir(parents=True)
        blob = repo.targets_dir / "blob.bin"
        blob.write_bytes(os.urandom(args.mb * 1024 * 1024))
        digest = hashlib.sha256(blob.read_bytes()).hexdigest()
        registry = Registry.open(f"sqlite:///{folder / 'fleet.db'}")
        _, password = registry.add_device("bench-device", "bench", "g", "x86-64-cpu")
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
                parts, offset, total = [], 0, 1
                while offset < total:
                    total, data = chunks.chunk("targets/blob.bin", offset)
                    parts.append(data)
                    offset += len(data)
                mqtt_s.append(time.perf_counter() - started)
                assert hashlib.sha256(b"".join(parts)).hexdigest() == digest
                started = time.perf_counter()
                with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/v1/repo/targets/blob.bin") as r:
                    data = r.read()
                http_s.append(time.perf_counter() - started)
                assert hashlib.sha256(data).hexdigest() == digest
            api.close()
        finally:
            broker.terminate()
            broker.wait(timeout=10)
    mb = args.mb
    result = {
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
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "delivery.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
