"""Attacks on the signing keys: stolen files, guessed passphrases, a compromised server.

Root and targets keys are offline (the operator's ``--keys`` folder); the server holds only
the online ones (snapshot, timestamp, director). Each test is named after what it stops.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from tuf.api.metadata import TargetFile

from agent.slot import ModelSlot
from agent.trust import FolderFetcher, TrustedRepository
from edgec.director import Action, DirectorDocument, DirectorFile
from edgec.errors import TrustError
from edgec.reports import InstallStep
from ota_server.director import release_files, sign_document
from ota_server.keys import (
    DEFAULT_KDF,
    TEST_KDF,
    TEST_KDF_ENV,
    ScryptCost,
    SigningKeyError,
    generate,
    load_private,
    load_signer,
    read_kdf,
    read_public,
)
from ota_server.repository import DIRECTOR_PUBLIC, ImageRepository, KeyFolderError
from tests.agent.test_install import PROFILE, Recorder, _installer
from tests.conftest import run_edgec
from tests.security.test_image_repository import bundle as bundle  # noqa: PLC0414  (fixture)

PASS = b"offline passphrase"
ONLINE = b"online passphrase"


def _init(tmp_path: Path, **thresholds: int) -> ImageRepository:
    return ImageRepository.init(
        tmp_path / "repo", PASS, thresholds, keys=tmp_path / "operator-keys", online_passphrase=ONLINE
    )


def _metadata(repo: ImageRepository) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in repo.metadata_dir.iterdir()}


# -- key files ------------------------------------------------------------------------------
def test_key_file_uses_memory_hard_kdf(tmp_path):
    repo = _init(tmp_path)
    files = sorted([*repo.offline_keys.glob("*.key"), *repo.online_keys.glob("*.key")])
    assert [f.name for f in files] == [
        "root-1.key",
        "targets-1.key",
        "director-1.key",
        "snapshot-1.key",
        "timestamp-1.key",
    ]
    for path in files:
        document = json.loads(path.read_bytes())
        assert document["kdf"]["name"] == "scrypt"
        assert read_kdf(path) == TEST_KDF  # the suite's cheap cost, recorded in the file
        assert document["aead"]["name"] == "aes-256-gcm"
        assert b"PRIVATE KEY" not in path.read_bytes()
        assert path.stat().st_mode & 0o777 == 0o600
        private = load_private(path, PASS if path.parent == repo.offline_keys else ONLINE)
        raw = private.private_bytes(
            serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
        )
        assert raw.hex() not in path.read_text()
        assert base64.b64encode(raw).decode() not in path.read_text()
        public = private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        assert read_public(path).keyval["public"] == public.hex()  # readable without the passphrase
    assert not list(repo.offline_keys.glob(".*.tmp"))
    assert not list(repo.online_keys.glob(".*.tmp"))


def test_default_kdf_cost_is_what_the_threat_model_states(tmp_path, monkeypatch):
    # docs/threat-model.md: scrypt n=2**17, r=8, p=1: 128 MiB and 0.3-0.7 s of a core per guess
    assert (DEFAULT_KDF.n, DEFAULT_KDF.r, DEFAULT_KDF.p) == (2**17, 8, 1)
    assert DEFAULT_KDF.memory_bytes == 128 * 2**20
    monkeypatch.delenv(TEST_KDF_ENV, raising=False)
    path = tmp_path / "k" / "root-1.key"
    signer = generate(path, PASS)
    assert read_kdf(path) == DEFAULT_KDF  # what keys init writes outside the test-suite
    assert load_signer(path, PASS).public_key.keyid == signer.public_key.keyid


def test_wrong_passphrase_is_refused(tmp_path, monkeypatch, bundle):
    repo = _init(tmp_path)
    for path, wrong in (
        (repo.offline_keys / "targets-1.key", ONLINE),
        (repo.online_keys / "director-1.key", PASS),
    ):
        with pytest.raises(SigningKeyError, match="wrong passphrase"):
            load_signer(path, wrong)
    before = _metadata(repo)
    monkeypatch.setenv("EDGEC_KEY_PASSPHRASE", "a guess")
    monkeypatch.setenv("EDGEC_ONLINE_KEY_PASSPHRASE", ONLINE.decode())
    result = run_edgec("publish", bundle, "--repo", repo.folder, "--keys", repo.offline_keys)
    assert result.returncode == 2
    assert "wrong passphrase" in result.stderr
    assert _metadata(repo) == before
    assert not any(repo.targets_dir.iterdir())  # nothing copied either


def test_key_file_with_a_swapped_public_key_or_cost_does_not_open(tmp_path):
    path = tmp_path / "targets-1.key"
    generate(path, PASS)
    other = generate(tmp_path / "other.key", PASS)
    original = json.loads(path.read_bytes())
    for edit in (
        lambda d: d.__setitem__("public", json.loads((tmp_path / "other.key").read_bytes())["public"]),
        lambda d: d["kdf"].__setitem__("n", d["kdf"]["n"] // 2),
        lambda d: d["kdf"].__setitem__("salt", base64.b64encode(b"\0" * 16).decode()),
    ):
        document = json.loads(json.dumps(original))
        edit(document)
        path.write_text(json.dumps(document))
        with pytest.raises(SigningKeyError):
            load_signer(path, PASS)
    assert other.public_key.keyid  # the swapped-in key is a real one


@pytest.mark.parametrize(
    ("n", "r", "p"), [(2**40, 8, 1), (2**17, 10**6, 1), (2**17, 8, 10**6), (3, 8, 1), ("16", 8, 1)]
)
def test_hostile_key_file_cannot_make_the_kdf_take_the_machine(tmp_path, n, r, p):
    path = tmp_path / "root-1.key"
    generate(path, PASS)
    document = json.loads(path.read_bytes())
    document["kdf"].update(n=n, r=r, p=p)
    path.write_text(json.dumps(document))
    with pytest.raises(SigningKeyError, match="scrypt"):
        load_signer(path, PASS)
    with pytest.raises(SigningKeyError):
        ScryptCost(2**23, 8, 1).check()


# -- where the keys live ----------------------------------------------------------------------
def test_repository_folder_holds_no_private_key(tmp_path, monkeypatch, bundle):
    monkeypatch.setenv("EDGEC_KEY_PASSPHRASE", PASS.decode())
    monkeypatch.setenv("EDGEC_ONLINE_KEY_PASSPHRASE", ONLINE.decode())
    repo, keys, online = (
        tmp_path / "srv" / "repo",
        tmp_path / "operator" / "keys",
        tmp_path / "srv" / "online",
    )
    init = run_edgec("keys", "init", "--repo", repo, "--keys", keys, "--online-keys", online)
    assert init.returncode == 0, init.stderr
    published = run_edgec("publish", bundle, "--repo", repo, "--keys", keys, "--online-keys", online)
    assert published.returncode == 0, published.stderr
    assert sorted(p.name for p in keys.iterdir()) == ["root-1.key", "targets-1.key"]
    assert sorted(p.name for p in online.iterdir()) == ["director-1.key", "snapshot-1.key", "timestamp-1.key"]

    def secrets(folder: Path, passphrase: bytes) -> list[bytes]:
        found = []
        for path in folder.glob("*.key"):
            raw = load_private(path, passphrase).private_bytes(
                serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
            )
            found += [raw, raw.hex().encode(), base64.b64encode(raw)]
        return found

    offline_secrets, online_secrets = secrets(keys, PASS), secrets(online, ONLINE)
    server_side = [p for folder in (repo, online) for p in folder.rglob("*") if p.is_file()]
    assert len(server_side) > 10
    for path in server_side:
        data = path.read_bytes()
        assert not any(secret in data for secret in offline_secrets), path
        if path.is_relative_to(repo):  # the served folder holds nothing secret at all
            assert path.suffix not in (".key", ".pem"), path
            assert b"PRIVATE KEY" not in data, path
            assert b'"ciphertext"' not in data, path
            assert not any(secret in data for secret in online_secrets), path
    # and the server's passphrase does not open the offline keys
    for path in keys.glob("*.key"):
        with pytest.raises(SigningKeyError):
            load_signer(path, ONLINE)


def test_publish_needs_offline_targets_key(tmp_path, monkeypatch, bundle):
    repo = _init(tmp_path)
    before = _metadata(repo)
    server = ImageRepository(repo.folder)  # what the server holds: REPO and its online keys
    with pytest.raises(KeyFolderError, match="--keys"):
        server.publish([bundle], ONLINE)
    monkeypatch.setenv("EDGEC_KEY_PASSPHRASE", ONLINE.decode())
    # no --keys: the default folder in the (empty) config dir has no targets key
    result = run_edgec("publish", bundle, "--repo", repo.folder)
    assert result.returncode == 2
    assert "no targets keys" in result.stderr
    online_only = run_edgec("publish", bundle, "--repo", repo.folder, "--keys", repo.online_keys)
    assert online_only.returncode == 2
    assert _metadata(repo) == before
    assert not any(repo.targets_dir.iterdir())


def test_rotate_and_revoke_need_the_offline_root_keys(tmp_path):
    repo = _init(tmp_path)
    server = ImageRepository(repo.folder)
    before = _metadata(repo)
    keyid = repo.load("root").signed.roles["snapshot"].keyids[0]
    with pytest.raises(KeyFolderError, match="--keys"):
        server.rotate("timestamp", ONLINE)
    with pytest.raises(KeyFolderError, match="--keys"):
        server.revoke("snapshot", keyid, ONLINE)
    with pytest.raises(SigningKeyError, match="wrong passphrase"):  # the server's passphrase
        ImageRepository(repo.folder, keys=repo.offline_keys).rotate("timestamp", ONLINE)
    assert _metadata(repo) == before
    # the operator, with the offline root keys: a new snapshot key lands in the online folder
    state = tmp_path / "device"
    TrustedRepository.provision(state, (repo.metadata_dir / "1.root.json").read_bytes())
    device = TrustedRepository(state, FolderFetcher(repo.folder))
    device.refresh()
    old = read_public(repo.online_keys / "snapshot-1.key").keyid
    assert repo.rotate("snapshot", PASS, online_passphrase=ONLINE) == 2
    assert read_public(repo.online_keys / "snapshot-1.key").keyid != old
    assert (repo.online_keys / "retired" / "snapshot-v1" / "snapshot-1.key").is_file()
    assert not list(repo.offline_keys.glob("snapshot-*"))
    device.refresh()
    assert device.trusted_version("root") == 2
    ImageRepository(repo.folder).refresh(ONLINE)  # the server re-signs with the new online key
    device.refresh()


def test_server_refuses_offline_keys_among_its_online_keys(tmp_path):
    repo = _init(tmp_path)
    shutil.copy(repo.offline_keys / "targets-1.key", repo.online_keys / "targets-1.key")
    config = _server_toml(tmp_path, repo.folder)
    result = run_edgec("server", "run", "--config", config)
    assert result.returncode == 2
    assert "holds offline keys (targets-1.key)" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def _server_toml(tmp_path: Path, repo: Path) -> Path:
    config = tmp_path / "server.toml"
    config.write_text(
        f'repo = "{repo}"\ndb = "sqlite:///{tmp_path / "fleet.db"}"\n\n'
        f'[mqtt]\nport = 1\npassword_file = "{tmp_path / "absent.secret"}"\n'
    )
    return config


def _old_layout(tmp_path: Path) -> Path:
    """A repository as edgec wrote it before offline keys: every key in REPO/keys, PKCS#8."""
    repo = ImageRepository.init(tmp_path / "repo", PASS, {"root": 2}, keys=tmp_path / "new-keys")
    old = repo.folder / "keys"
    old.mkdir()
    for folder in (repo.offline_keys, repo.online_keys):
        for key in folder.glob("*.key"):
            pem = load_private(key, PASS).private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.BestAvailableEncryption(PASS),
            )
            (old / key.with_suffix(".pem").name).write_bytes(pem)
        shutil.rmtree(folder)
    os.replace(repo.folder / DIRECTOR_PUBLIC, old / DIRECTOR_PUBLIC)
    return repo.folder


def test_server_refuses_to_serve_a_folder_holding_private_keys_until_migrated(tmp_path, monkeypatch, bundle):
    repo = _old_layout(tmp_path)
    result = run_edgec("server", "run", "--config", _server_toml(tmp_path, repo))
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1
    assert "edgec keys migrate" in result.stderr
    monkeypatch.setenv("EDGEC_KEY_PASSPHRASE", PASS.decode())
    keys = tmp_path / "operator-keys"
    migrated = run_edgec("keys", "migrate", "--repo", repo, "--keys", keys)
    assert migrated.returncode == 0, migrated.stderr
    assert "rotate" in migrated.stdout
    assert not (repo / "keys").exists()
    assert sorted(p.name for p in keys.glob("*.key")) == ["root-1.key", "root-2.key", "targets-1.key"]
    online = tmp_path / "repo-online-keys"
    assert sorted(p.name for p in online.glob("*.key")) == [
        "director-1.key",
        "snapshot-1.key",
        "timestamp-1.key",
    ]
    assert all(read_kdf(p) == TEST_KDF for p in [*keys.glob("*.key"), *online.glob("*.key")])
    migrated_repo = ImageRepository(repo, keys=keys)
    migrated_repo.check_server_side()
    migrated_repo.publish([bundle], PASS)
    root, director = migrated_repo.provisioning()
    assert json.loads(director)["keyid"] == read_public(online / "director-1.key").keyid
    state = tmp_path / "device"
    TrustedRepository.provision(state, root.encode())
    device = TrustedRepository(state, FolderFetcher(repo))
    device.refresh()
    assert device.target("model/1.0.0/x86-64-cpu/model.onnx").length > 0


# -- the promise: a server with only online keys cannot get an unsigned blob installed ------------
@pytest.mark.slow
@pytest.mark.parametrize("forgery", ["targets signed with every key the server holds", "director alone"])
def test_server_with_online_keys_only_cannot_install_unsigned_blob(tmp_path, releases, forgery):
    repo = _init(tmp_path)
    repo.publish([releases["1.0.0"]], PASS, online_passphrase=ONLINE)
    state = tmp_path / "device"
    TrustedRepository.provision(state, (repo.metadata_dir / "1.root.json").read_bytes())
    world = {"repo": repo, "state": state}
    reporter, slot = Recorder(), ModelSlot()
    installer = _installer(world, slot, reporter)

    # the attacker holds everything the server reads: REPO, the online keys, their passphrase
    server = ImageRepository(repo.folder)
    director = server.director_signer(ONLINE)
    stolen = [
        load_signer(path, ONLINE)
        for folder in (server.folder, server.online_keys)
        for path in folder.rglob("*")
        if path.suffix in (".key", ".pem")
    ]
    version = [1]

    def send(release: str, files: list[DirectorFile]) -> None:
        document = DirectorDocument(
            fleet="lab",
            device="pi-1",
            profile=PROFILE,
            version=version[0],
            expires=dt.datetime.now(dt.UTC) + dt.timedelta(days=1),
            rollout="manual",
            action=Action.INSTALL,
            release=release,
            files=files,
        )
        version[0] += 1
        installer.handle(sign_document(document, director))

    send("digits:1.0.0", release_files(server.load("targets").signed.targets, "digits:1.0.0", PROFILE))
    assert reporter.kinds()[-1] == "committed"  # the honest release, as the operator signed it

    blob = os.urandom(64 * 1024)
    digest = hashlib.sha256(blob).hexdigest()
    target = f"digits/6.6.6/{PROFILE}/model.onnx"
    stored = server.targets_dir / "digits" / "6.6.6" / PROFILE / f"{digest}.model.onnx"
    stored.parent.mkdir(parents=True)
    stored.write_bytes(blob)
    if forgery.startswith("targets"):
        targets = server.load("targets")
        custom = {"name": "digits", "version": "6.6.6", "profile": PROFILE, "format": "onnx"}
        custom |= {"precision": "fp32", "chunk_bytes": len(blob), "chunks": [digest]}
        targets.signed.targets[target] = TargetFile(
            len(blob), {"sha256": digest}, target, unrecognized_fields={"custom": {"edgec": custom}}
        )
        targets.signed.version += 1
        targets.signatures.clear()
        for signer in stolen:
            targets.sign(signer, append=True)
        server._write(targets)
    server.refresh(ONLINE)  # a new snapshot and timestamp, validly signed with the online keys
    send("digits:6.6.6", [DirectorFile(path=target, sha256=digest, length=len(blob))])

    refused = reporter.events[-1]
    assert (refused["event"], refused["step"]) == ("refused", InstallStep.VERIFY)
    expected = "UnsignedMetadataError: targets" if forgery.startswith("targets") else "not a signed target"
    assert expected in refused["detail"]
    assert slot.model is not None
    assert slot.model.manifest.version == "1.0.0"  # the honest release keeps serving
    device_files = [p for p in state.rglob("*") if p.is_file()]
    assert not any(p.read_bytes() == blob for p in device_files)
    with pytest.raises(TrustError):
        TrustedRepository(state, FolderFetcher(repo.folder)).target(target)
