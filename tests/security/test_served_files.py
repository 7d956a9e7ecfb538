"""Attacks on what the server hands out: keys, director state and other files of the server,
asked for by a device over MQTT fetch or by anyone over HTTP. What is served is an allowlist
(``ota_server.served``): TUF metadata by the names ngclient asks for, and targets.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from agent.trust import FolderFetcher, TrustedRepository
from edgec.fetch_protocol import decode_response, encode_request
from edgec.topics import fetch_request, fetch_response
from ota_server.fetch import FetchServer, _Request
from ota_server.repository import ImageRepository
from ota_server.served import served_file
from tests._services import needs_mosquitto, wait_for
from tests.ota_server.test_broker_acl import Client, broker  # noqa: F401  (fixture)
from tests.ota_server.test_server_process import _start, _stop
from tests.ota_server.test_server_process import server_config as server_config  # noqa: PLC0414
from tests.security.test_image_repository import PASS
from tests.security.test_image_repository import bundle as bundle  # noqa: PLC0414  (fixture)


def _forbidden(repo: Path, offline: Path, online: Path) -> list[str]:
    """Paths a device or a stranger might ask for, relative to the served folder."""
    return [
        "keys/root-1.pem",  # where every key lived before
        "keys/targets-1.pem",
        "keys/director-1.pem",
        "keys/director.pub.json",
        f"../{offline.name}/root-1.key",
        f"../{offline.name}/targets-1.key",
        f"../{online.name}/director-1.key",
        f"../{online.name}/snapshot-1.key",
        str(online / "timestamp-1.key"),  # absolute
        str(offline / "root-1.key"),
        "metadata/../../" + f"{offline.name}/root-1.key",
        "targets/../director.pub.json",
        "targets/../../" + f"{online.name}/director-1.key",
        "director.pub.json",
        "director/versions.json",  # director state: who runs what
        "metadata/../director/versions.json",
        "metadata/1.root.json/../../director.pub.json",
        "metadata/1.root.json\x00",
        "metadata/01.root.json",
        "metadata/root.json.tmp",
        "./metadata/1.root.json",
        "metadata//1.root.json",
        "targets/",
        "targets/.hidden",
        "targets\\..\\director.pub.json",
        "metadata/" + "9" * 1500 + ".root.json",
        "",
        ".",
        "..",
        "/",
    ]


@pytest.fixture
def layout(tmp_path, bundle) -> dict[str, Any]:
    repo = ImageRepository.init(tmp_path / "repo", PASS, {}, keys=tmp_path / "keys")
    repo.publish([bundle], PASS)
    (repo.folder / "director").mkdir()
    (repo.folder / "director" / "versions.json").write_text('{"lab/pi-1": 7}')
    (repo.targets_dir / ".hidden").write_text("not a target")
    return {"repo": repo, "forbidden": _forbidden(repo.folder, repo.offline_keys, repo.online_keys)}


def _allowed(repo: ImageRepository) -> list[str]:
    targets = [p.relative_to(repo.folder).as_posix() for p in repo.targets_dir.rglob("*.model.onnx")]
    return ["metadata/1.root.json", "metadata/timestamp.json", "metadata/2.targets.json", *targets]


def test_traversal_paths_are_not_served(layout):
    repo = layout["repo"]
    for path in layout["forbidden"]:
        assert served_file(repo.folder, path) is None, path
    for path in _allowed(repo):
        assert served_file(repo.folder, path) == (repo.folder / path).resolve(), path


def test_symlinks_leaving_metadata_or_targets_are_not_served(layout):
    repo = layout["repo"]
    (repo.metadata_dir / "9.root.json").symlink_to(repo.online_keys / "director-1.key")
    (repo.targets_dir / "key.bin").symlink_to(repo.offline_keys / "targets-1.key")
    (repo.targets_dir / "state.bin").symlink_to(repo.folder / "director" / "versions.json")
    (repo.targets_dir / "up").symlink_to(repo.folder)
    (repo.targets_dir / "loop").symlink_to(repo.targets_dir / "loop")
    for path in ("metadata/9.root.json", "targets/key.bin", "targets/state.bin", "targets/loop"):
        assert served_file(repo.folder, path) is None, path
    assert served_file(repo.folder, "targets/up/director.pub.json") is None
    assert served_file(repo.folder, "targets/up/metadata/1.root.json") is None  # outside targets/
    inside = next(repo.targets_dir.rglob("*.model.onnx"))
    (repo.targets_dir / "alias.onnx").symlink_to(inside)  # a link within targets/ is fine
    assert served_file(repo.folder, "targets/alias.onnx") == inside.resolve()


class _Recorder:
    """Stands in for the server's MQTT client: keeps what the fetch server publishes."""

    def __init__(self) -> None:
        self.published: list[bytes] = []

    def message_callback_add(self, *_: Any) -> None: ...

    def subscribe(self, *_: Any, **__: Any) -> None: ...

    def publish(self, _topic: str, payload: bytes, qos: int = 0) -> SimpleNamespace:
        self.published.append(payload)
        return SimpleNamespace(mid=len(self.published))  # paho's MQTTMessageInfo has the message id


def test_fetch_server_answers_not_found_outside_the_allowlist(layout):
    repo = layout["repo"]
    client = _Recorder()
    server = FetchServer(repo.folder, client)  # type: ignore[arg-type]
    for path in layout["forbidden"]:
        server._answer(_Request("lab", "pi-1", "1", path, 0))
        header, data = decode_response(client.published[-1])
        assert (header["status"], data) == (404, b""), path
    server._answer(_Request("lab", "pi-1", "1", "metadata/1.root.json", 0))
    header, data = decode_response(client.published[-1])
    assert header["status"] == 200
    assert data == (repo.metadata_dir / "1.root.json").read_bytes()


class _AllowlistFetcher(FolderFetcher):
    """Hands ngclient only what the server would serve."""

    def _fetch(self, url: str) -> Iterator[bytes]:
        from tuf.api import exceptions as tuf_errors

        path = served_file(self.folder, url.removeprefix("edgec-folder:"))
        if path is None:
            raise tuf_errors.DownloadHTTPError(f"{url} not served", 404)
        return self._chunks(path)


def test_every_file_the_agent_asks_for_is_served(tmp_path, layout, bundle):
    repo = layout["repo"]
    repo.rotate("root", PASS)  # 2.root.json: the device walks the chain
    repo.rotate("timestamp", PASS)
    repo.publish([bundle], PASS)
    state = tmp_path / "device"
    TrustedRepository.provision(state, (repo.metadata_dir / "1.root.json").read_bytes())
    device = TrustedRepository(state, _AllowlistFetcher(repo.folder))
    device.refresh()
    assert device.trusted_version("root") == 3
    assert (
        device.download("model/1.0.0/x86-64-cpu/model.onnx").read_bytes()
        == (bundle / "model.onnx").read_bytes()
    )


# -- on the real server process ---------------------------------------------------------------
def _live(server_config: dict[str, Any]) -> tuple[ImageRepository, list[str]]:
    repo = ImageRepository(server_config["repo"], keys=server_config["repo"].parent / "keys")
    (repo.folder / "director").mkdir(exist_ok=True)
    (repo.folder / "director" / "versions.json").write_text('{"lab/dev-a": 3}')
    forbidden = _forbidden(repo.folder, repo.offline_keys, repo.online_keys)
    return repo, [p for p in forbidden if len(p) < 1000]


@needs_mosquitto
@pytest.mark.slow
def test_device_cannot_fetch_signing_keys_over_mqtt(broker, server_config):  # noqa: F811
    repo, forbidden = _live(server_config)
    server = _start(server_config)
    device = Client("dev-a", broker["passwords"]["dev-a"], broker["port"])  # a device's own login
    assert device.ok()
    answers: dict[str, tuple[dict[str, Any], bytes]] = {}

    def on_answer(_c: Any, _u: Any, message: Any) -> None:
        header, data = decode_response(message.payload)
        answers[header["id"]] = (header, data)

    device.client.message_callback_add(fetch_response("lab", "dev-a"), on_answer)
    device.client.subscribe(fetch_response("lab", "dev-a"), qos=1)
    time.sleep(0.3)
    try:
        good = ["metadata/1.root.json", "metadata/timestamp.json"]
        asked = {f"good-{n}": path for n, path in enumerate(good)}
        asked |= {f"bad-{n}": path for n, path in enumerate(forbidden)}
        ids = list(asked)
        for batch in (ids[i : i + 6] for i in range(0, len(ids), 6)):  # within the per-device queue
            for request_id in batch:
                request = encode_request(request_id, asked[request_id], 0)
                device.client.publish(fetch_request("lab", "dev-a"), request, qos=1)
            # each is answered (404) or dropped as malformed
            wait_for(lambda batch=batch: set(batch) <= set(answers), 1.5)
        assert answers["good-0"][1] == (repo.metadata_dir / "1.root.json").read_bytes()  # the channel works
        assert answers["good-1"][0]["status"] == 200
        for request_id, (header, data) in answers.items():
            if request_id.startswith("bad-"):
                assert (header["status"], data) == (404, b""), asked[request_id]
        answered = {asked[request_id] for request_id in answers}
        # well-formed paths to files that exist reach the allowlist, and get only a 404
        assert {"director.pub.json", "director/versions.json", "keys/root-1.pem"} <= answered
        assert server.poll() is None
    finally:
        device.close()
        _stop(server)


@needs_mosquitto
@pytest.mark.slow
def test_http_serves_only_metadata_and_targets(broker, server_config):  # noqa: F811
    repo, forbidden = _live(server_config)
    server = _start(server_config)
    base = f"http://127.0.0.1:{server_config['http']}/v1/repo/"
    secrets = [p.read_bytes() for folder in (repo.offline_keys, repo.online_keys) for p in folder.iterdir()]

    def get(path: str, method: str = "GET") -> tuple[int, bytes]:
        quoted = path.replace("\x00", "%00").replace(" ", "%20")
        request = urllib.request.Request(base + quoted, method=method)
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    try:
        status, body = get("metadata/1.root.json")
        assert (status, body) == (200, (repo.metadata_dir / "1.root.json").read_bytes())
        assert get("metadata/timestamp.json")[0] == 200
        for path in [*forbidden, "%2e%2e/keys/root-1.key", "director.pub.json?x=1"]:
            for method in ("GET", "HEAD"):
                status, body = get(path, method)
                assert status == 404, (path, method)
                assert not any(secret in body for secret in secrets)
                if method == "GET":
                    assert "error" in json.loads(body)
        assert server.poll() is None
    finally:
        _stop(server)
    assert "Traceback" not in (server_config["config"].parent / "server.log").read_text()
