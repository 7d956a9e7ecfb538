"""Attacks through names: release names, versions, ids and file paths that would reach the
filesystem, MQTT topics or the broker's files. Each is refused where it enters (build,
publish, the registry, the server, the device) before any path is made, and nothing is written
or deleted outside the folder it belongs in.

The command line runs as a user runs it; the agent's attacks use a director document signed
with the real director key, bypassing the server's checks, as a compromised server would.
"""

from __future__ import annotations

import datetime as dt
import json
import os
from pathlib import Path

import pytest
from pydantic import ValidationError

from agent.config import InstallSettings
from agent.director import DirectorState
from agent.install import Installer, ProbationMonitor
from agent.slot import ModelSlot
from agent.store import StateStore
from agent.trust import FolderFetcher, TrustedRepository
from edgec.director import (
    Action,
    DirectorDocument,
    DirectorFile,
    DirectorSignature,
    SignedDirectorDocument,
    canonical,
    parse_signed_document,
)
from edgec.errors import BundleError, InvalidNameError, PathOutsideRootError, ProtocolError, TrustError
from edgec.fetch_protocol import decode_request, decode_response, encode_response
from edgec.manifest import parse_manifest
from edgec.names import parse_release, remove_inside, resolve_inside
from edgec.rollout_spec import RolloutSpec
from edgec.topics import device_topics
from ota_server.registry import Registry
from ota_server.repository import ImageRepository
from tests._cli import DIGITS, run_edgec
from tests.security.test_image_repository import bundle  # noqa: F401  (fixture)

PASS = b"names tests"
PROFILE = "x86-64-cpu"
NOW = dt.datetime(2026, 11, 29, 12, 0, tzinfo=dt.UTC)
TRAVERSAL = "../../../pwn"


def _files_under(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*")}


# -- build ----------------------------------------------------------------------------------
def test_build_name_with_dotdot_is_refused_and_writes_nothing(tmp_path):
    out = tmp_path / "a" / "b" / "out"
    before = _files_under(tmp_path)
    result = run_edgec("build", DIGITS / "model.onnx", "--name", "../../x", "--target", PROFILE, "--out", out)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "--name" in lines[0]
    assert "'../../x'" in lines[0]
    assert _files_under(tmp_path) == before  # nothing outside --out, nothing half-written in it


def test_build_version_with_slashes_is_exit_2_not_internal_error(tmp_path):
    out = tmp_path / "out"
    result = run_edgec(
        "build", DIGITS / "model.onnx", "--version", "1/../../..", "--target", PROFILE, "--out", out
    )
    assert result.returncode == 2, result.stderr
    assert "internal error" not in result.stderr
    assert "--version" in result.stderr
    assert not out.exists()
    assert _files_under(tmp_path) == set()


# -- the manifest ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def manifest_json(bundle) -> dict:  # noqa: F811
    return json.loads((bundle / "manifest.json").read_text())


def test_manifest_file_path_outside_bundle_is_refused(manifest_json):
    for path in ("../../../etc/cron.d/x", "/etc/passwd", "model/../../x", "", "a//b", ".hidden"):
        edited = {**manifest_json, "files": [{**manifest_json["files"][0], "path": path}]}
        with pytest.raises(BundleError, match=r"files\.0\.path"):
            parse_manifest(json.dumps(edited))
    with pytest.raises(BundleError, match="model_file"):
        parse_manifest(json.dumps({**manifest_json, "model_file": "/etc/passwd"}))


def test_manifest_with_traversal_name_version_or_profile_is_refused(manifest_json):
    for field, value in (("name", TRAVERSAL), ("version", "1/../../.."), ("name", "a b"), ("version", "")):
        with pytest.raises(BundleError, match=field):
            parse_manifest(json.dumps({**manifest_json, field: value}))
    profile = {**manifest_json["profile"], "id": "../x86-64-cpu"}
    with pytest.raises(BundleError, match=r"profile\.id"):
        parse_manifest(json.dumps({**manifest_json, "profile": profile}))
    assert parse_manifest(json.dumps(manifest_json)).name == manifest_json["name"]  # the honest one


def test_publish_refuses_manifest_with_traversal_name(tmp_path, bundle, monkeypatch):  # noqa: F811
    import shutil

    monkeypatch.setenv("EDGEC_KEY_PASSPHRASE", PASS.decode())
    work = tmp_path / "w" / "x" / "y"
    repo, keys = work / "repo", work / "keys"
    init = run_edgec("keys", "init", "--repo", repo, "--keys", keys)
    assert init.returncode == 0, init.stderr
    copy = work / "bundle"
    shutil.copytree(bundle, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["name"] = TRAVERSAL  # the files and their hashes still match
    (copy / "manifest.json").write_text(json.dumps(manifest))
    before = _files_under(tmp_path)
    result = run_edgec("publish", copy, "--repo", repo, "--keys", keys)
    assert result.returncode == 2, result.stderr
    assert "name" in result.stderr
    assert "'../../../pwn'" in result.stderr
    assert _files_under(tmp_path) == before  # nothing in the repository, nothing beside it
    assert not list(tmp_path.rglob("pwn"))


def test_publish_of_a_good_and_a_traversal_bundle_copies_nothing(tmp_path, bundle, monkeypatch):  # noqa: F811
    import shutil

    monkeypatch.setenv("EDGEC_KEY_PASSPHRASE", PASS.decode())
    repo, keys = tmp_path / "repo", tmp_path / "keys"
    assert run_edgec("keys", "init", "--repo", repo, "--keys", keys).returncode == 0
    bad = tmp_path / "bad"
    shutil.copytree(bundle, bad)
    manifest = json.loads((bad / "manifest.json").read_text())
    manifest["name"] = TRAVERSAL
    (bad / "manifest.json").write_text(json.dumps(manifest))
    before = _files_under(repo)
    result = run_edgec("publish", bundle, bad, "--repo", repo, "--keys", keys)
    assert result.returncode == 2, result.stderr
    assert _files_under(repo) == before  # the good bundle's files were not copied either


# -- the device -------------------------------------------------------------------------------
def _attack_document(signer, release: str, path: str, now: dt.datetime = NOW) -> SignedDirectorDocument:
    """A director document signed with the director key, built without the model's checks (a
    compromised server sends whatever bytes it likes)."""
    doc = DirectorDocument.model_construct(
        schema_version=1,
        fleet="lab",
        device="pi-1",
        profile=PROFILE,
        version=1,
        expires=now + dt.timedelta(days=1),
        rollout="attack",
        action=Action.INSTALL,
        release=release,
        files=[DirectorFile.model_construct(path=path, sha256="0" * 64, length=100)],
    )
    signature = signer.sign(canonical(doc))
    return SignedDirectorDocument.model_construct(
        signed=doc, signatures=[DirectorSignature(keyid=signature.keyid, sig=signature.signature)]
    )


def _payload(envelope: SignedDirectorDocument) -> bytes:
    return json.dumps(envelope.model_dump(mode="json")).encode()


class Recorder:
    def __init__(self) -> None:
        self.events: list[dict] = []

    def event(self, kind, release, detail=None, **figures) -> None:
        self.events.append({"event": kind, "release": release, "detail": detail, **figures})

    def state(self, status, installed, detail=None) -> None:
        pass


class NoChunks:
    def chunk(self, path: str, offset: int) -> tuple[int, bytes]:
        raise AssertionError(f"the agent asked for {path}")


@pytest.fixture
def device(tmp_path):
    """A repository (nothing published), and a device whose state folder is three levels down."""
    repo = ImageRepository.init(tmp_path / "repo", PASS, {}, keys=tmp_path / "keys")
    state = tmp_path / "a" / "b" / "state"
    TrustedRepository.provision(state, (repo.metadata_dir / "1.root.json").read_bytes())
    return repo, state


def _installer(repo: ImageRepository, state: Path, reporter: Recorder) -> Installer:
    def never(*_args):
        raise AssertionError("nothing may be loaded")

    return Installer(
        settings=InstallSettings(probation_s=0.1, probation_min_requests=1, warmup_runs=0),
        store=StateStore(state),
        slot=ModelSlot(),
        director=DirectorState.load(state / "director.json", repo.director_key(), "pi-1", PROFILE),
        repository=TrustedRepository(state, FolderFetcher(repo.folder)),
        chunks=NoChunks(),
        reporter=reporter,
        loader=never,
        self_test=never,
        golden_inputs=never,
        probation=ProbationMonitor(),
        now=lambda: NOW,
    )


def test_agent_refuses_release_named_traversal_and_deletes_nothing_outside(tmp_path, device):
    repo, state = device
    sentinel = tmp_path / "a" / "pwn-1"  # where state/staging/../../../pwn-1 lands
    (sentinel / "precious").mkdir(parents=True)
    (sentinel / "precious" / "data.txt").write_text("keep me")
    envelope = _attack_document(
        repo.director_signer(PASS), f"{TRAVERSAL}:1", f"{TRAVERSAL}/1/{PROFILE}/model.onnx"
    )
    reporter = Recorder()
    _installer(repo, state, reporter).handle(envelope)
    assert (sentinel / "precious" / "data.txt").read_text() == "keep me"
    refusal = reporter.events[-1]
    assert (refusal["event"], refusal["step"]) == ("refused", "accept")
    assert "'../../../pwn'" in refusal["detail"]
    assert StateStore(state).journal() is None  # not accepted: nothing recorded, nothing staged
    assert list((state / "staging").iterdir()) == []


def test_signed_director_document_with_traversal_release_does_not_parse(device):
    repo, _ = device
    payload = _payload(
        _attack_document(repo.director_signer(PASS), f"{TRAVERSAL}:1", f"{PROFILE}/model.onnx")
    )
    with pytest.raises(ValidationError, match="release"):
        SignedDirectorDocument.model_validate_json(payload)
    with pytest.raises(TrustError, match=r"malformed director document.*release") as err:
        parse_signed_document(payload)
    assert err.value.role == "director"
    assert "\n" not in str(err.value)


def test_director_document_with_absolute_file_path_is_refused(device):
    repo, _ = device
    signer = repo.director_signer(PASS)
    for path in ("/etc/cron.d/pwn", f"digits/1.0.0/{PROFILE}/../../../../../../tmp/pwn", "C:\\pwn"):
        payload = _payload(_attack_document(signer, "digits:1.0.0", path))
        with pytest.raises(ValidationError, match=r"files\.0\.path"):
            SignedDirectorDocument.model_validate_json(payload)
        with pytest.raises(TrustError):
            parse_signed_document(payload)


def test_agent_refuses_file_path_climbing_out_of_its_bundle_before_fetching(tmp_path, device):
    repo, state = device
    path = f"digits/1.0.0/{PROFILE}/../../../../../../../pwn.txt"
    envelope = _attack_document(repo.director_signer(PASS), "digits:1.0.0", path)
    reporter = Recorder()
    _installer(repo, state, reporter).handle(envelope)
    assert reporter.events[-1]["event"] == "refused"
    assert reporter.events[-1]["step"] == "accept"
    assert not list(tmp_path.rglob("pwn.txt"))


def test_symlinked_staging_folder_out_of_state_is_not_followed_for_delete(tmp_path):
    state = tmp_path / "state"
    outside = tmp_path / "outside"
    (outside / "victim").mkdir(parents=True)
    (outside / "victim" / "data.txt").write_text("keep me")
    state.mkdir()
    (state / "staging").symlink_to(outside, target_is_directory=True)  # planted by another local user
    store = StateStore(state)
    store.prune(keep=set())
    assert (outside / "victim" / "data.txt").read_text() == "keep me"
    with pytest.raises(PathOutsideRootError):
        store.staging_folder("victim:1")


def test_symlink_out_of_state_folder_is_not_followed_for_delete(tmp_path):
    state = tmp_path / "state"
    store = StateStore(state)
    outside = tmp_path / "outside"
    (outside / "victim").mkdir(parents=True)
    (outside / "victim" / "data.txt").write_text("keep me")
    (store.models / "digits-1.0.0").symlink_to(outside / "victim", target_is_directory=True)
    with pytest.raises(PathOutsideRootError):
        store.model_folder("digits:1.0.0")  # nothing is written through it
    store.discard("models", "digits-1.0.0")
    assert (outside / "victim" / "data.txt").read_text() == "keep me"
    assert not (store.models / "digits-1.0.0").is_symlink()  # the link itself is gone


def test_path_helper_refuses_every_way_out_of_its_root(tmp_path):
    root = tmp_path / "root"
    (root / "inside").mkdir(parents=True)
    (root / "link-out").symlink_to(tmp_path)
    (root / "loop").symlink_to(root / "loop")
    assert resolve_inside(root, "inside", "new-file") == (root / "inside" / "new-file").resolve()
    for parts in (
        ("..",),
        ("/etc/passwd",),
        ("inside", "..", ".."),
        ("link-out", "x"),
        ("",),
        (".",),
        ("loop",),
    ):
        with pytest.raises(PathOutsideRootError):
            resolve_inside(root, *parts)
    for parts in (("..",), ("link-out", "x"), ("inside", ".."), ()):
        with pytest.raises(PathOutsideRootError):
            remove_inside(root, *parts)
    assert remove_inside(root, "link-out")  # the link, not what it points at
    assert tmp_path.is_dir()
    assert (root / "inside").is_dir()


# -- registry, topics, rollouts, fetch ---------------------------------------------------------
def test_device_id_with_mqtt_wildcard_is_refused(tmp_path):
    registry = Registry.open(f"sqlite:///{tmp_path / 'fleet.db'}")
    for device_id in ("pi-#", "pi+1", "pi/1", "..", "pi 1", "pi-1\ntopic readwrite #", "pi:1", ""):
        with pytest.raises(InvalidNameError, match="device id"):
            registry.add_device(device_id, "lab", "g", PROFILE)
        with pytest.raises(InvalidNameError):
            device_topics("lab", device_id)
    for field, args in (("fleet", ("pi-1", "+", "g", PROFILE)), ("group", ("pi-1", "lab", "a/b", PROFILE))):
        with pytest.raises(InvalidNameError, match=field):
            registry.add_device(*args)
    assert registry.devices() == []
    registry.add_device("pi-1", "lab", "g", PROFILE)  # an honest one


def test_devices_add_with_traversal_id_writes_no_config_outside(tmp_path):
    cwd = tmp_path / "a" / "b"
    cwd.mkdir(parents=True)
    db = f"sqlite:///{tmp_path / 'fleet.db'}"
    result = run_edgec(
        "devices", "add", "../../pwn", "--profile", PROFILE, "--group", "g", "--db", db, cwd=cwd
    )
    assert result.returncode == 2, result.stderr
    assert "device id" in result.stderr
    assert not (tmp_path / "pwn.agent.toml").exists()
    assert list(cwd.iterdir()) == []


def test_rollout_of_traversal_release_or_wildcard_group_is_refused():
    for spec in (
        {"release": f"{TRAVERSAL}:1", "group": "g"},
        {"release": "digits:1/../..", "group": "g"},
        {"release": "digits:1.0.0", "group": "#"},
        {"release": "digits:1.0.0", "group": "../g"},
    ):
        with pytest.raises(ValidationError):
            RolloutSpec.model_validate(spec)
    assert RolloutSpec.model_validate({"release": "digits:1.0.0+cpu", "group": "g"}).group == "g"


def test_fleet_assign_of_traversal_release_is_exit_2_before_any_request():
    result = run_edgec(
        "fleet", "assign", "pi-1", f"{TRAVERSAL}:1", "--server", "http://127.0.0.1:9", "--token", "t"
    )
    assert result.returncode == 2, result.stderr
    assert "release name" in result.stderr


def test_fetch_request_for_a_parent_path_is_refused_when_decoded():
    for path in ("../keys/root.pem", "/etc/passwd", "metadata/../../x", "", None, 7):
        payload = json.dumps({"id": "1", "path": path, "offset": 0}).encode()
        with pytest.raises(ProtocolError):
            decode_request(payload)
    assert decode_request(b'{"id":"1","path":"metadata/timestamp.json","offset":0}').offset == 0


def test_fetch_response_with_a_deep_or_lying_header_is_a_protocol_error():
    deep = b"[" * 100_000
    attacks = [
        len(deep).to_bytes(4, "big") + deep,  # RecursionError in json before
        encode_response({"id": "1", "status": 200, "total": "lots", "offset": 0}),
        encode_response({"id": "1", "status": 200, "total": -1, "offset": 0}),
        (10**6).to_bytes(4, "big") + b"{}",  # a header longer than the payload
    ]
    for payload in attacks:
        with pytest.raises(ProtocolError):
            decode_response(payload)


def test_release_names_that_cannot_be_split_safely_are_refused():
    for value in (f"{TRAVERSAL}:1", "a:b:c", "digits", ":1", "digits:", "digits:1\n", "dígits:1"):
        with pytest.raises(InvalidNameError, match="release") as err:
            parse_release(value)
        assert "\n" not in str(err.value)
    assert parse_release("digits:1.0.0+cuda12") == ("digits", "1.0.0+cuda12")
    with pytest.raises(InvalidNameError) as long:
        parse_release("x" * 10_000 + ":1")
    assert len(str(long.value)) < 400  # the value is shown truncated


# -- a real agent process ------------------------------------------------------------------------
@pytest.mark.slow
def test_agent_process_told_to_install_traversal_release_deletes_nothing_outside(tmp_path):
    from tests._fleet import PASS as FLEET_PASS
    from tests._fleet import down, new_fleet, up
    from tests._services import MOSQUITTO, wait_for

    if MOSQUITTO is None:
        pytest.skip("the mosquitto binary is not installed")
    fleet = new_fleet(tmp_path / "a" / "fleet")
    agent = fleet.add_agent("pi-1")
    sentinel = tmp_path / "a" / "fleet" / "pwn-1"  # fleet/state/pi-1/staging/../../../pwn-1
    (sentinel / "precious").mkdir(parents=True)
    (sentinel / "precious" / "data.txt").write_text("keep me")
    try:
        up(fleet)
        agent.start()
        envelope = _attack_document(
            fleet.repo.director_signer(FLEET_PASS),
            f"{TRAVERSAL}:1",
            f"{TRAVERSAL}/1/{PROFILE}/model.onnx",
            now=dt.datetime.now(dt.UTC),
        )
        assert fleet.monitor is not None
        topic = device_topics("lab", "pi-1")["desired"]
        fleet.monitor.client.publish(topic, _payload(envelope), qos=1, retain=True).wait_for_publish(10)
        assert wait_for(lambda: fleet.monitor.events("pi-1", "refused"), 60), agent.log.read_text()[-3000:]
        assert (sentinel / "precious" / "data.txt").read_text() == "keep me"
        refusal = fleet.monitor.events("pi-1", "refused")[-1]
        assert "release" in refusal["detail"]
        assert agent.proc is not None
        assert agent.proc.poll() is None  # still running
        assert not any(p.name.startswith("pwn") for p in (agent.state / "staging").iterdir())
    finally:
        down(fleet)
    assert os.path.isdir(sentinel)
