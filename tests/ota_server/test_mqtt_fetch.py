"""Targets over MQTT through a real Mosquitto with the generated ACL: resumable, verified."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from agent.mqtt_fetch import SCHEME, ChunkClient, MqttFetcher, ResumableDownload
from agent.trust import TrustedRepository
from edgec.errors import FetchError, TrustError
from ota_server.fetch import FetchServer
from ota_server.repository import ImageRepository, chunk_hashes
from tests._services import MOSQUITTO
from tests.ota_server.test_broker_acl import Client, broker  # noqa: F401  (fixture)
from tests.security.test_image_repository import PASS
from tests.security.test_image_repository import bundle as bundle  # noqa: PLC0414  (fixture)

pytestmark = pytest.mark.skipif(MOSQUITTO is None, reason="the mosquitto binary is not installed")
CHUNK = 256 * 1024


@pytest.fixture
def served(tmp_path, broker):  # noqa: F811
    from ota_server.broker import SERVER_USER

    folder = tmp_path / "served"
    (folder / "targets").mkdir(parents=True)
    blob = folder / "targets" / "big.bin"
    blob.write_bytes(os.urandom(5 * 1024 * 1024 + 12345))
    server = Client(SERVER_USER, broker["files"].server_password, broker["port"])
    assert server.ok()
    fetch = FetchServer(folder, server.client, chunk_bytes=CHUNK)
    fetch.start()
    time.sleep(0.3)
    yield {"folder": folder, "blob": blob, "server": server, "fetch": fetch}
    fetch.stop()
    server.close()


class CuttingChunks(ChunkClient):
    """The device's connection drops after ``cut_after`` chunks (a real disconnect)."""

    def __init__(self, client: mqtt.Client, cut_after: int) -> None:
        super().__init__(client, "lab", "dev-a", timeout_s=3)
        self.cut_after = cut_after
        self.served = 0

    def chunk(self, path: str, offset: int) -> tuple[int, bytes]:
        if self.served == self.cut_after:
            self.client.disconnect()
        result = super().chunk(path, offset)
        self.served += 1
        return result


def _device(broker) -> Client:  # noqa: F811
    device = Client("dev-a", broker["passwords"]["dev-a"], broker["port"])
    assert device.ok()
    return device


def test_download_cut_halfway_resumes_from_the_last_good_chunk(tmp_path, broker, served):  # noqa: F811
    blob: Path = served["blob"]
    length, digest = blob.stat().st_size, hashlib.sha256(blob.read_bytes()).hexdigest()
    custom = {"chunk_bytes": CHUNK, "chunks": chunk_hashes(blob, CHUNK)}
    dest = tmp_path / "dest" / "big.bin"
    dest.parent.mkdir()
    first = _device(broker)
    time.sleep(0.2)
    cut = CuttingChunks(first.client, cut_after=10)
    download = ResumableDownload(cut, "targets/big.bin", dest, custom=custom, length=length, sha256=digest)
    with pytest.raises(FetchError):
        download.run()
    first.close()
    kept = download.good_bytes()
    assert kept == 10 * CHUNK  # ten verified chunks on disk, nothing more
    second = _device(broker)
    time.sleep(0.2)
    chunks = CuttingChunks(second.client, cut_after=-1)
    resumed = ResumableDownload(chunks, "targets/big.bin", dest, custom=custom, length=length, sha256=digest)
    assert resumed.run().read_bytes() == blob.read_bytes()
    assert chunks.served == len(custom["chunks"]) - 10  # only the missing chunks were asked for
    second.close()


def test_a_corrupted_chunk_is_refused_and_not_kept(tmp_path, broker, served):  # noqa: F811
    blob: Path = served["blob"]
    custom = {"chunk_bytes": CHUNK, "chunks": chunk_hashes(blob, CHUNK)}
    custom["chunks"][3] = "0" * 64  # the signed hash of chunk 3 says something else
    device = _device(broker)
    time.sleep(0.2)
    dest = tmp_path / "big.bin"
    download = ResumableDownload(
        ChunkClient(device.client, "lab", "dev-a", timeout_s=3),
        "targets/big.bin",
        dest,
        custom=custom,
        length=blob.stat().st_size,
        sha256="f" * 64,
    )
    with pytest.raises(TrustError, match="chunk 3"):
        download.run()
    assert download.good_bytes() == 3 * CHUNK
    device.close()


def test_ngclient_over_mqtt_end_to_end(tmp_path, broker, bundle):  # noqa: F811
    from ota_server.broker import SERVER_USER

    repo = ImageRepository.init(tmp_path / "repo", PASS, {}, keys=tmp_path / "keys")
    repo.publish([bundle], PASS)
    server = Client(SERVER_USER, broker["files"].server_password, broker["port"])
    assert server.ok()
    FetchServer(repo.folder, server.client).start()
    device = _device(broker)
    time.sleep(0.3)
    state = tmp_path / "device"
    TrustedRepository.provision(state, (repo.metadata_dir / "1.root.json").read_bytes())
    fetcher = MqttFetcher(ChunkClient(device.client, "lab", "dev-a", timeout_s=5))
    trusted = TrustedRepository(state, fetcher, url_prefix=SCHEME)
    trusted.refresh()
    path = trusted.download("model/1.0.0/x86-64-cpu/model.onnx")
    assert path.read_bytes() == (bundle / "model.onnx").read_bytes()
    for client in (device, server):
        client.close()


def test_malformed_requests_are_dropped_and_the_server_keeps_serving(broker, served):  # noqa: F811
    device = _device(broker)
    time.sleep(0.2)
    topic = "edgec/v1/lab/fetch/dev-a/request"
    for payload in (b"\xff\x00garbage", b"{}", b'{"id": 1, "path": "x", "offset": -5}', b"[" * 5000):
        for _ in range(500):
            device.client.publish(topic, payload, qos=0)
    time.sleep(2.0)
    assert served["fetch"].dropped > 1000
    total, data = ChunkClient(device.client, "lab", "dev-a", timeout_s=5).chunk("targets/big.bin", 0)
    assert total == served["blob"].stat().st_size
    assert data == served["blob"].read_bytes()[:CHUNK]
    device.close()
