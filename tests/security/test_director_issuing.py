"""Attacks on director issuing: concurrent assigns, the served counters, an older server's
counter file. A device refuses a document whose version is not above the last one it accepted,
so a duplicate or out-of-order version is a refused install, and a counter that goes back is a
device that refuses everything until the counter passes it again.

The HTTP tests run a real ``edgec server run`` against a real Mosquitto; the registry tests run
on SQLite and on PostgreSQL (``db_url``), with two registries standing for two server replicas.
"""

from __future__ import annotations

import datetime as dt
import itertools
import json
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
from securesystemslib.signer import CryptoSigner

from agent.director import DirectorState
from edgec.director import Action, DirectorFile, SignedDirectorDocument
from edgec.errors import UserInputError
from edgec.topics import device_topics
from ota_server.director import DirectorIssuer, import_versions_file
from ota_server.registry import Registry
from ota_server.repository import ImageRepository
from tests._services import needs_mosquitto, wait_for
from tests.conftest import ROOT
from tests.ota_server.conftest import db_url  # noqa: F401  (fixture)
from tests.ota_server.test_broker_acl import Client, broker  # noqa: F401  (fixture)
from tests.ota_server.test_server_process import _start, _stop, server_config  # noqa: F401  (fixture)
from tests.security.test_image_repository import PASS
from tests.security.test_image_repository import bundle as bundle  # noqa: PLC0414  (fixture)

RELEASE = "model:1.0.0"  # the bundle fixture, built for x86-64-cpu: dev-b's profile
CONCURRENT = 24


def _publish(config, bundle) -> ImageRepository:
    repo = ImageRepository(config["repo"], keys=config["repo"].parent / "keys")
    repo.publish([bundle], PASS)
    return repo


def _assign(config, device: str, action: str = "install") -> tuple[int, dict]:
    body = json.dumps({"release": RELEASE, "action": action}).encode()
    request = urllib.request.Request(
        f"http://127.0.0.1:{config['http']}/v1/devices/{device}/assign", data=body, method="POST"
    )
    request.add_header("Authorization", f"Bearer {config['token']}")
    request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def _all_at_once(config, actions: list[str]) -> list[tuple[int, dict]]:
    start = threading.Barrier(len(actions))

    def one(action: str) -> tuple[int, dict]:
        start.wait()
        return _assign(config, "dev-b", action)

    with ThreadPoolExecutor(len(actions)) as pool:
        return list(pool.map(one, actions))


def _registry(config) -> Registry:
    return Registry.open(config["db"])


# -- a real server over HTTP ------------------------------------------------------------------------
@needs_mosquitto
def test_concurrent_assigns_get_distinct_increasing_versions(broker, server_config, bundle):  # noqa: F811
    _publish(server_config, bundle)
    server = _start(server_config)
    try:
        answers = _all_at_once(server_config, ["install"] * CONCURRENT)
    finally:
        _stop(server)
    assert [status for status, _ in answers] == [200] * CONCURRENT, answers
    versions = sorted(body["signed"]["version"] for _, body in answers)
    assert versions == list(range(1, CONCURRENT + 1))  # no duplicate, no gap
    registry = _registry(server_config)
    assert registry.director_version("lab", "dev-b") == CONCURRENT  # never below one sent
    assert registry.get("dev-b").desired_release == RELEASE


@needs_mosquitto
def test_concurrent_assigns_never_answer_500(broker, server_config, bundle):  # noqa: F811
    _publish(server_config, bundle)
    server = _start(server_config)
    try:
        for _ in range(3):  # installs and rollbacks interleaved, three rounds
            answers = _all_at_once(server_config, ["install", "rollback"] * (CONCURRENT // 2))
            assert {status for status, _ in answers} == {200}, [a for a in answers if a[0] != 200]
    finally:
        _stop(server)
    log = (server_config["config"].parent / "server.log").read_text()
    assert "Traceback" not in log, log[-3000:]
    assert _registry(server_config).director_version("lab", "dev-b") == 3 * CONCURRENT


@needs_mosquitto
def test_retained_document_is_the_highest_version(broker, server_config, bundle):  # noqa: F811
    repo = _publish(server_config, bundle)
    server = _start(server_config)
    try:
        answers = _all_at_once(server_config, ["install"] * CONCURRENT)
    finally:
        _stop(server)
    assert [status for status, _ in answers] == [200] * CONCURRENT, answers
    highest = max(body["signed"]["version"] for _, body in answers)
    # a device that connects afterwards gets the retained document: the last one issued
    device = Client("dev-b", broker["passwords"]["dev-b"], broker["port"])
    assert device.ok()
    desired = device_topics("lab", "dev-b")["desired"]
    device.client.subscribe(desired, qos=1)
    assert wait_for(lambda: device.messages, 10)
    envelope = SignedDirectorDocument.model_validate_json(device.messages[0][1])
    state = DirectorState(key=repo.director_key(), device="dev-b", profile="x86-64-cpu")
    _, document = state.accept(envelope, dt.datetime.now(dt.UTC))
    assert document.version == highest == CONCURRENT
    device.close()


@needs_mosquitto
def test_director_counters_are_not_served(broker, server_config, bundle):  # noqa: F811
    _publish(server_config, bundle)
    counters = server_config["repo"] / "director" / "versions.json"  # as an older server left it
    counters.parent.mkdir()
    counters.write_text(json.dumps({"lab/dev-a": 3, "lab/dev-b": 5}))
    server = _start(server_config)
    try:
        assert _assign(server_config, "dev-b")[0] == 200
        base = f"http://127.0.0.1:{server_config['http']}/v1/repo/director/versions.json"
        for token in (None, server_config["token"]):
            request = urllib.request.Request(base)
            if token:
                request.add_header("Authorization", f"Bearer {token}")
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(request, timeout=10)
            assert refused.value.code == 404
    finally:
        _stop(server)
    assert not counters.parent.exists()  # the counters live in the registry, not the served folder


@needs_mosquitto
def test_existing_versions_file_is_imported(broker, server_config, bundle):  # noqa: F811
    _publish(server_config, bundle)
    counters = server_config["repo"] / "director" / "versions.json"
    counters.parent.mkdir()
    counters.write_text(json.dumps({"lab/dev-b": 41, "lab/retired": 7}))
    server = _start(server_config)
    try:
        status, body = _assign(server_config, "dev-b")
    finally:
        _stop(server)
    assert status == 200
    assert body["signed"]["version"] == 42  # above what devices already hold: not a replay
    assert not counters.exists()
    registry = _registry(server_config)
    assert registry.director_version("lab", "retired") == 7  # kept for a device that returns
    # the import ran once: a second start changes nothing
    server = _start(server_config)
    try:
        assert _assign(server_config, "dev-b")[1]["signed"]["version"] == 43
    finally:
        _stop(server)


@needs_mosquitto
def test_corrupted_versions_file_stops_the_server_instead_of_resetting_counters(broker, server_config):  # noqa: F811
    counters = server_config["repo"] / "director" / "versions.json"
    counters.parent.mkdir()
    counters.write_text('{"lab/dev-b": 41}": 12, "lab/dev-a": 3}')  # two writers' bytes mixed
    result = subprocess.run(
        [sys.executable, "-m", "edgec", "server", "run", "--config", str(server_config["config"])],
        cwd=ROOT,
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2, result.stderr
    assert "versions.json" in result.stderr
    assert "repair" in result.stderr
    assert counters.exists()  # left for the operator to repair


# -- the registry: SQLite and PostgreSQL ------------------------------------------------------------
def test_concurrent_issuing_on_the_registry_gives_distinct_versions(db_url):  # noqa: F811
    replicas = [Registry.open(db_url), Registry.open(db_url)]  # two servers sharing the database
    taken: list[int] = []

    def issue(registry: Registry) -> None:
        for _ in range(10):
            with registry.next_director_version("lab", "pi-1", RELEASE) as version:
                taken.append(version)

    threads = [threading.Thread(target=issue, args=(replicas[n % 2],)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert sorted(taken) == list(range(1, 81))
    assert replicas[0].director_version("lab", "pi-1") == 80
    for registry in replicas:
        registry.engine.dispose()


def test_one_devices_documents_are_issued_one_at_a_time(db_url):  # noqa: F811
    """Issue, sign and publish of one device never overlap, so documents reach the broker in
    version order: in one server, and across replicas sharing PostgreSQL."""
    replicas = [Registry.open(db_url)]
    if db_url.startswith("postgresql"):
        replicas.append(Registry.open(db_url))
    spans: list[tuple[float, float, int]] = []

    def issue(registry: Registry) -> None:
        for _ in range(4):
            with registry.next_director_version("lab", "pi-1", RELEASE) as version:
                began = time.monotonic()
                time.sleep(0.02)  # signing and publishing
                spans.append((began, time.monotonic(), version))

    threads = [threading.Thread(target=issue, args=(replicas[n % len(replicas)],)) for n in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    spans.sort()
    assert [version for _, _, version in spans] == list(range(1, 25))  # in version order
    for (_, ended, _), (began, _, _) in itertools.pairwise(spans):
        assert began >= ended  # never two at once
    for registry in replicas:
        registry.engine.dispose()


def test_imported_counters_never_go_back(db_url):  # noqa: F811
    registry = Registry.open(db_url)
    for _ in range(10):
        with registry.next_director_version("lab", "pi-1", RELEASE):
            pass
    registry.import_director_versions({("lab", "pi-1"): 3, ("lab", "pi-2"): 9})
    registry.import_director_versions({("lab", "pi-2"): 4})  # an older copy of the file
    assert registry.director_version("lab", "pi-1") == 10
    assert registry.director_version("lab", "pi-2") == 9
    with registry.next_director_version("lab", "pi-2", RELEASE) as version:
        assert version == 10
    registry.engine.dispose()


def test_a_failed_publish_never_lets_a_version_be_issued_twice(tmp_path):
    registry = Registry.open(f"sqlite:///{tmp_path / 'fleet.db'}")
    issuer = DirectorIssuer(registry, CryptoSigner.generate_ed25519())
    files = [DirectorFile(path="model/1.0.0/x86-64-cpu/model.onnx", sha256="0" * 64, length=1)]
    common = {"fleet": "lab", "device": "pi-1", "profile": "x86-64-cpu", "rollout": "manual"}

    def broker_gone(_document: SignedDirectorDocument) -> None:
        raise ConnectionError("the broker went away mid-publish")

    with pytest.raises(ConnectionError):  # it may have left anyway: its version is spent
        issuer.issue(action=Action.INSTALL, release=RELEASE, files=files, deliver=broker_gone, **common)
    again = issuer.issue(action=Action.INSTALL, release=RELEASE, files=files, **common)
    assert again.signed.version == 2


def test_unreadable_versions_file_is_refused_not_guessed(tmp_path):
    registry = Registry.open(f"sqlite:///{tmp_path / 'fleet.db'}")
    counters = tmp_path / "repo" / "director" / "versions.json"
    counters.parent.mkdir(parents=True)
    for broken in ('{"lab/pi-1": 4}}', '["lab/pi-1", 4]', '{"lab/pi-1": "4"}', '{"pi-1": 4}'):
        counters.write_text(broken)
        with pytest.raises(UserInputError, match="repair"):
            import_versions_file(registry, tmp_path / "repo")
        assert counters.exists()
    assert registry.director_version("lab", "pi-1") == 0
