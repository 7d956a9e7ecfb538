"""The fetch server's scheduling: a bounded worker pool, one chunk per device in turn.

The MQTT client is a recording stand-in here (the scheduling is what is under test; the
transfers themselves are tested on a real broker in test_mqtt_fetch.py)."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from types import SimpleNamespace

from edgec.fetch_protocol import decode_response
from ota_server.fetch import FetchServer


class RecordingClient:
    def __init__(self) -> None:
        self.answers: list[tuple[str, dict]] = []
        self.lock = threading.Lock()
        self.active = 0
        self.most_active = 0
        self.mid = 0
        self.on_publish = None

    def message_callback_add(self, *_args) -> None:
        pass

    def subscribe(self, *_args, **_kwargs) -> None:
        pass

    def ack(self, *_args) -> None:
        pass

    def publish(self, topic: str, payload: bytes, qos: int = 0) -> SimpleNamespace:
        with self.lock:
            self.active += 1
            self.most_active = max(self.most_active, self.active)
            self.mid += 1
            mid = self.mid
        time.sleep(0.002)  # a publish that takes a moment, so workers overlap
        header, _ = decode_response(payload)
        with self.lock:
            self.active -= 1
            self.answers.append((topic.split("/")[4], header))
        # written to the broker a moment later, from another thread (paho's network thread)
        threading.Timer(0.001, self.on_publish, (self, None, mid, None, None)).start()
        return SimpleNamespace(mid=mid)


class Message:
    def __init__(self, device: str, request_id: str, offset: int) -> None:
        self.topic = f"edgec/v1/lab/fetch/{device}/request"
        self.mid, self.qos = 1, 1
        self.payload = json.dumps({"id": request_id, "path": "targets/blob", "offset": offset}).encode()


def _folder(tmp_path: Path) -> Path:
    (tmp_path / "targets").mkdir()
    (tmp_path / "targets" / "blob").write_bytes(bytes(range(256)) * 64)
    return tmp_path


def _wait_for(client: RecordingClient, count: int) -> None:
    deadline = time.monotonic() + 10
    while len(client.answers) < count and time.monotonic() < deadline:
        time.sleep(0.01)


def test_a_greedy_device_cannot_starve_another(tmp_path):
    client = RecordingClient()
    server = FetchServer(_folder(tmp_path), client, chunk_bytes=1024, workers=1, queue_per_device=8)
    for i in range(200):  # device A asks for 200 chunks at once
        server.on_request(client, None, Message("dev-a", f"a{i}", (i % 16) * 1024))
    server.on_request(client, None, Message("dev-b", "b0", 0))  # then B asks for one
    server.start()
    _wait_for(client, 9)
    server.stop()
    order = [device for device, _ in client.answers]
    assert order.count("dev-a") == 8, "A's queue is bounded; the rest were dropped"
    assert server.dropped == 192
    assert order.index("dev-b") <= 1, f"B waited behind A: {order}"


def test_devices_take_turns_and_workers_bound_concurrency(tmp_path):
    client = RecordingClient()
    server = FetchServer(_folder(tmp_path), client, chunk_bytes=1024, workers=3, queue_per_device=4)
    for i in range(4):
        for device in ("dev-a", "dev-b", "dev-c", "dev-d", "dev-e"):
            server.on_request(client, None, Message(device, f"{device}-{i}", i * 1024))
    server.start()
    _wait_for(client, 20)
    server.stop()
    assert len(client.answers) == 20
    assert all(header["status"] == 200 for _, header in client.answers)
    assert client.most_active <= 3
    # round robin: every device got its first chunk before any device got its third
    order = [device for device, _ in client.answers]
    third_chunks = [i for i, d in enumerate(order) if order[: i + 1].count(d) == 3]
    first_chunks = [order.index(d) for d in set(order)]
    assert max(first_chunks) < min(third_chunks), order


class SlowBroker(RecordingClient):
    """A broker that takes the answers only when the test lets it (paho's on_publish then)."""

    def __init__(self) -> None:
        super().__init__()
        self.unwritten: list[int] = []

    def publish(self, topic: str, payload: bytes, qos: int = 0) -> SimpleNamespace:
        with self.lock:
            self.mid += 1
            self.unwritten.append(self.mid)
            self.answers.append((topic.split("/")[4], {}))
            return SimpleNamespace(mid=self.mid)

    def write_all(self) -> None:
        with self.lock:
            written, self.unwritten = self.unwritten, []
        for mid in written:
            self.on_publish(self, None, mid, None, None)


def test_answers_wait_while_the_broker_has_not_taken_the_earlier_ones(tmp_path):
    client = SlowBroker()
    server = FetchServer(_folder(tmp_path), client, chunk_bytes=1024, workers=2, max_unsent_bytes=4096)
    server.start()
    try:
        for i in range(20):
            server.on_request(client, None, Message(f"dev-{i}", f"r{i}", 0))
        time.sleep(0.5)
        held = len(client.answers)
        assert held <= 6  # ~4 KiB of 1 KiB answers handed over (+ one per worker), not 20
        deadline = time.monotonic() + 10
        while (len(client.answers) < 20 or client.unwritten) and time.monotonic() < deadline:
            client.write_all()  # the broker catches up: the rest go
            time.sleep(0.02)
        assert len(client.answers) == 20
        assert server._unsent == 0
    finally:
        server.stop()
