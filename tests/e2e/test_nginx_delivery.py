"""The image repository delivered by nginx, as a CDN's origin would: a real nginx with the
config ``edgec repo cdn-config`` makes (``ota_server.cdn``) serves the fleet's repository folder,
and a real agent with ``install.transport = "http"`` downloads from it, never from the server.
The agent's TUF checks are the same: a download interrupted by kill -9 resumes with a Range
request, a tampered file in the served folder is refused, and nginx serves nothing but the
metadata and the targets."""

from __future__ import annotations

import hashlib
import http.client
import urllib.request

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests._cli import DIGITS
from tests._fleet import Fleet, up
from tests._nginx import Nginx, Request, needs_nginx, running_nginx
from tests._services import needs_mosquitto, wait_for

pytestmark = [pytest.mark.slow, needs_mosquitto, needs_nginx]

CHUNK = 256 * 1024  # the agent's HTTP Range chunk
# nginx's limit_rate is per request and lets a request's first second's worth through at once:
# a 256 KiB chunk takes about (256 KiB - RATE) / RATE s, the 6 MB target about 8 s
RATE = 200_000


@pytest.fixture
def nginx(fleet: Fleet, tmp_path):
    with running_nginx(fleet.repo_dir, tmp_path / "nginx", limit_rate_bytes_per_s=RATE) as server:
        yield server


def _installed(fleet: Fleet, device: str, release: str) -> bool:
    row = fleet.device(device)
    return row["installed_release"] == release and row["status"] == "serving"


def _refused(fleet: Fleet, device: str, release: str) -> list[dict]:
    assert fleet.monitor is not None
    return [e for e in fleet.monitor.events(device, "refused") if e.get("release") == release]


def _one_input() -> np.ndarray:
    with np.load(DIGITS / "eval.npz") as data:
        return data["x"][:1]


def _target(fleet: Fleet, release: str, file: str = "model.onnx") -> tuple[str, int, str]:
    """``(URL path under the prefix, signed length, signed sha256)`` of one file of a release."""
    name, version = release.split(":")
    info = fleet.repo.load("targets").signed.targets[f"{name}/{version}/x86-64-cpu/{file}"]
    sha = info.hashes["sha256"]
    return f"targets/{name}/{version}/x86-64-cpu/{sha}.{file}", info.length, sha


def _first_new_chunk(fleet: Fleet, held: str, new: str) -> int:
    """The offset of the first chunk of ``new``'s model that ``held``'s model does not have."""
    targets = fleet.repo.load("targets").signed.targets

    def table(release: str) -> list[str]:
        name, version = release.split(":")
        custom = targets[f"{name}/{version}/x86-64-cpu/model.onnx"].unrecognized_fields["custom"]
        return custom["edgec"]["cdc"]["chunks"]

    have = {entry.split(":")[1] for entry in table(held)}
    offset = 0
    for entry in table(new):
        size, digest = entry.split(":")
        if digest not in have:
            return offset
        offset += int(size)
    raise AssertionError(f"{new} holds no chunk that {held} lacks")


def _for(requests: list[Request], path: str) -> list[Request]:
    return [r for r in requests if r.path == "/v1/repo/" + path]


def _server_fetch_bytes(fleet: Fleet) -> float:
    """The repository bytes the OTA server itself sent (over MQTT or its own HTTP)."""
    request = urllib.request.Request(f"http://127.0.0.1:{fleet.http_port}/metrics")
    request.add_header("Authorization", f"Bearer {fleet.token}")
    with urllib.request.urlopen(request, timeout=10) as response:
        text = response.read().decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert "edgec_server_fetch_bytes" in families  # the counter exists: a 0 below means none sent
    return sum(s.value for s in families["edgec_server_fetch_bytes"].samples if s.name.endswith("_total"))


def _raw_status(nginx: Nginx, path: str) -> tuple[int, bytes]:
    """``GET path`` sent as written (``..`` not resolved by the client)."""
    conn = http.client.HTTPConnection("127.0.0.1", nginx.port, timeout=10)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def test_agent_installs_through_nginx_and_resumes_after_kill_9_with_a_range_request(fleet, releases, nginx):
    agent = fleet.add_agent("pi-1", install={"transport": "http", "http_url": nginx.url})
    up(fleet)
    fleet.publish(releases["1.0.0"], releases["5.0.0"])
    agent.start()

    # (a) the install comes through nginx; the server hands out no byte of the repository
    fleet.assign("pi-1", "digits:1.0.0")
    assert wait_for(lambda: _installed(fleet, "pi-1", "digits:1.0.0"), 60), agent.log.read_text()[-3000:]
    small, small_length, _ = _target(fleet, "digits:1.0.0")
    got = _for(nginx.requests(), small)
    assert got
    assert all(r.status in (200, 206) for r in got), got
    assert sum(r.sent for r in got) >= small_length
    assert any(r.path == "/v1/repo/metadata/timestamp.json" and r.status == 200 for r in nginx.requests())
    assert _server_fetch_bytes(fleet) == 0

    # (b) kill -9 in the middle of a 6 MB download held to RATE by nginx, then a restart
    big, big_length, big_sha = _target(fleet, "digits:5.0.0")
    fleet.assign("pi-1", "digits:5.0.0")
    partial = agent.state / "staging" / "digits-5.0.0" / "model.onnx.partial"
    assert wait_for(lambda: partial.exists() and partial.stat().st_size > 2_000_000, 60)
    agent.kill9()
    had = partial.stat().st_size
    assert had < big_length - CHUNK  # the kill did interrupt the download
    before = len(_for(nginx.requests(), big))
    assert before >= 2  # chunk by chunk, so far
    agent.start()
    assert wait_for(lambda: _installed(fleet, "pi-1", "digits:5.0.0"), 90), agent.log.read_text()[-3000:]
    after = _for(nginx.requests(), big)[before:]
    assert after, "no request for the target after the restart"
    starts = [r.range_start for r in after]
    assert all(s is not None and s >= had - CHUNK for s in starts), (had, starts)  # never from 0
    assert after[0].status == 206
    assert sum(r.sent for r in after) <= big_length - had + 2 * CHUNK  # the rest, not all again
    fetched = [e for e in fleet.monitor.events("pi-1", "fetched") if e["detail"] == "model.onnx"]
    assert fetched[-1]["resumed_at"] >= had - CHUNK
    resumed = {
        "partial_at_kill": had,
        "first_range": after[0].range,
        "bytes_after_restart": sum(r.sent for r in after),
    }
    print(f"resumed through nginx ({big_length:,} bytes):", resumed)
    installed = agent.state / "models" / "digits-5.0.0" / "model.onnx"
    assert hashlib.sha256(installed.read_bytes()).hexdigest() == big_sha
    assert agent.infer(_one_input())[0] == "5.0.0"
    assert _server_fetch_bytes(fleet) == 0


def test_a_tampered_target_in_the_served_folder_is_refused_and_never_installed(fleet, releases, nginx):
    agent = fleet.add_agent("pi-1", install={"transport": "http", "http_url": nginx.url})
    up(fleet)
    fleet.publish(releases["1.0.0"], releases["2.0.0"])
    agent.start()
    fleet.assign("pi-1", "digits:1.0.0")
    assert wait_for(lambda: _installed(fleet, "pi-1", "digits:1.0.0"), 60), agent.log.read_text()[-3000:]

    # (c) the blob on the CDN's origin is changed after signing (same name, same length), in a
    # chunk the agent downloads (it copies the chunks 1.0.0 holds from disk: delta downloads)
    path, length, _ = _target(fleet, "digits:2.0.0")
    blob = fleet.repo_dir / path
    data = bytearray(blob.read_bytes())
    assert len(data) == length
    data[_first_new_chunk(fleet, "digits:1.0.0", "digits:2.0.0") + 5] ^= 0xFF
    blob.write_bytes(bytes(data))
    fleet.assign("pi-1", "digits:2.0.0")
    assert wait_for(lambda: _refused(fleet, "pi-1", "digits:2.0.0"), 60), agent.log.read_text()[-3000:]
    detail = _refused(fleet, "pi-1", "digits:2.0.0")[0]["detail"]
    print("refused through nginx:", detail)
    assert "signed hash" in detail or "sha256" in detail or "length" in detail, detail
    served = _for(nginx.requests(), path)
    assert served
    assert served[-1].status in (200, 206)
    assert not (agent.state / "models" / "digits-2.0.0").exists()
    assert fleet.device("pi-1")["installed_release"] == "digits:1.0.0"
    assert agent.infer(_one_input())[0] == "1.0.0"

    # (d) nothing but metadata/ and targets/: not the keys beside the folder, not the folder
    online = fleet.online_keys
    key = next(p for p in online.iterdir() if p.is_file())
    assert key.read_bytes()
    assert online.parent == fleet.repo_dir.parent  # beside the served folder: one ../ away
    assert _raw_status(nginx, "/v1/repo/metadata/timestamp.json")[0] == 200  # the control
    for refused in (
        f"/v1/repo/../{online.name}/{key.name}",
        f"/v1/repo/targets/../../{online.name}/{key.name}",
        f"/v1/repo/%2e%2e/{online.name}/{key.name}",
        f"/{online.name}/{key.name}",
        "/v1/repo/director.pub.json",
        "/v1/repo/",
        "/v1/repo/targets/digits/",
        "/v1/repo/metadata/",
        "/v1/repo/targets/digits/2.0.0/x86-64-cpu",
    ):
        status, body = _raw_status(nginx, refused)
        assert status in (403, 404), (refused, status)
        assert key.read_bytes() not in body
