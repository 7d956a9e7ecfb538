"""Attacks on the image repository, each stopped by the real verifier (python-tuf ngclient).

A repository is initialised and a bundle published with the real signing code; the tests
then play the attacker on the repository folder the device fetches from, and check that
the device refuses, says why, and keeps its previously trusted state.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from securesystemslib.signer import CryptoSigner
from tuf.api.metadata import Metadata

from agent.trust import FolderFetcher, TrustedRepository
from edgec.errors import FetchError, TrustError
from ota_server.repository import ImageRepository
from tests.conftest import DIGITS, run_edgec

PASS = b"correct horse battery staple"
TARGET = "model/1.0.0/x86-64-cpu/model.onnx"


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bundle")
    result = run_edgec(
        "build", DIGITS / "model.onnx", "--target", "x86-64-cpu", "--precision", "fp32", "--out", out
    )
    assert result.returncode == 0, result.stderr
    return out / "model-1.0.0-x86-64-cpu"


@pytest.fixture
def repo(tmp_path, bundle) -> ImageRepository:
    repository = ImageRepository.init(
        tmp_path / "repo", PASS, {"root": 2, "timestamp": 1}, keys=tmp_path / "keys"
    )
    repository.publish([bundle], PASS)
    return repository


def _device(tmp_path: Path, repo: ImageRepository, fetcher=None) -> TrustedRepository:
    state = tmp_path / "device"
    root = (repo.metadata_dir / "1.root.json").read_bytes()
    TrustedRepository.provision(state, root)
    return TrustedRepository(state, fetcher or FolderFetcher(repo.folder))


def _resign(repo: ImageRepository, role: str, edit, signer_role: str | None = None) -> Metadata:
    md = repo.load(role)
    edit(md.signed)
    md.signatures.clear()
    for signer in repo._signers(signer_role or role, PASS):
        md.sign(signer, append=True)
    repo._write(md)
    return md


def test_honest_download_matches_the_bundle(tmp_path, repo, bundle):
    device = _device(tmp_path, repo)
    device.refresh()
    path = device.download(TARGET)
    assert path.read_bytes() == (bundle / "model.onnx").read_bytes()
    custom = repo.load("targets").signed.targets[TARGET].unrecognized_fields["custom"]["edgec"]
    assert custom["profile"] == "x86-64-cpu"
    assert len(custom["chunks"]) == -(-path.stat().st_size // custom["chunk_bytes"])


def test_tampered_target_bytes(tmp_path, repo):
    (stored,) = (repo.targets_dir / "model/1.0.0/x86-64-cpu").glob("*.model.onnx")
    data = bytearray(stored.read_bytes())
    data[100] ^= 0xFF
    stored.write_bytes(bytes(data))
    device = _device(tmp_path, repo)
    device.refresh()
    with pytest.raises(TrustError) as err:
        device.download(TARGET)
    assert err.value.role == "target"
    assert not list(device.targets_dir.glob("*model.onnx"))


class EndlessFetcher(FolderFetcher):
    """Serves targets followed by garbage that never ends."""

    def _fetch(self, url: str) -> Iterator[bytes]:
        inner = super()._fetch(url)
        if "targets/" not in url:
            return inner

        def endless() -> Iterator[bytes]:
            yield from inner
            while True:
                yield b"\0" * 65536

        return endless()


def test_endless_data_stops_at_the_signed_length(tmp_path, repo):
    device = _device(tmp_path, repo, EndlessFetcher(repo.folder))
    device.refresh()
    with pytest.raises(FetchError, match="length"):
        device.download(TARGET)


def test_unsigned_metadata(tmp_path, repo):
    device = _device(tmp_path, repo)
    device.refresh()
    md = repo.load("timestamp")
    md.signed.version += 1
    md.signatures.clear()
    repo._write(md)
    with pytest.raises(TrustError) as err:
        device.refresh()
    assert err.value.role == "timestamp"


def test_signature_by_an_untrusted_key(tmp_path, repo):
    device = _device(tmp_path, repo)
    device.refresh()
    before = device.trusted_version("timestamp")
    md = repo.load("timestamp")
    md.signed.version += 1
    md.signatures.clear()
    md.sign(CryptoSigner.generate_ed25519())
    repo._write(md)
    with pytest.raises(TrustError):
        device.refresh()
    assert device.trusted_version("timestamp") == before  # trusted state intact


def test_fewer_signatures_than_the_threshold(tmp_path, repo):
    device = _device(tmp_path, repo)
    root = repo.load("root")
    root.signed.version += 1
    root.signatures.clear()
    root.sign(repo._signers("root", PASS)[0])  # threshold is 2
    repo._write(root)
    with pytest.raises(TrustError) as err:
        device.refresh()
    assert err.value.role == "root"


def test_replayed_older_timestamp(tmp_path, repo, bundle):
    old = (repo.metadata_dir / "timestamp.json").read_bytes()
    repo.publish([bundle], PASS)  # timestamp v3
    device = _device(tmp_path, repo)
    device.refresh()
    assert device.trusted_version("timestamp") == 3
    (repo.metadata_dir / "timestamp.json").write_bytes(old)  # replay v2
    with pytest.raises(TrustError):
        device.refresh()
    assert device.trusted_version("timestamp") == 3


def test_expired_timestamp_freeze(tmp_path, repo):
    device = _device(tmp_path, repo)
    device.refresh()
    long_ago = dt.datetime.now(dt.UTC) - dt.timedelta(days=30)
    repo.refresh(PASS, now=long_ago)  # a new, properly signed, but expired timestamp
    with pytest.raises(TrustError) as err:
        device.refresh()
    assert "Expired" in str(err.value)


def test_new_targets_with_an_old_snapshot_mix_and_match(tmp_path, repo, bundle):
    snapshot_v = repo.load("snapshot").signed.version
    kept = (repo.metadata_dir / f"{snapshot_v}.snapshot.json").read_bytes()
    repo.publish([bundle], PASS)  # targets v3, snapshot and timestamp move on
    new_snapshot = repo.load("snapshot")
    # the attacker serves the new timestamp but the old snapshot under the new name
    (repo.metadata_dir / f"{new_snapshot.signed.version}.snapshot.json").write_bytes(kept)
    device = _device(tmp_path, repo)
    with pytest.raises(TrustError):
        device.refresh()


def test_a_target_the_repository_does_not_sign(tmp_path, repo):
    device = _device(tmp_path, repo)
    device.refresh()
    with pytest.raises(TrustError, match="not a signed target"):
        device.download("model/9.9.9/x86-64-cpu/model.onnx")


def test_private_keys_are_encrypted_and_0600(repo):
    keys = [*repo.offline_keys.glob("*.key"), *repo.online_keys.glob("*.key")]
    assert len(keys) == 6  # root x2, targets, snapshot, timestamp, director
    for key in keys:
        assert key.stat().st_mode & 0o777 == 0o600
        assert json.loads(key.read_bytes())["kdf"]["name"] == "scrypt"
    from ota_server.keys import SigningKeyError, load_signer

    with pytest.raises(SigningKeyError, match="wrong passphrase"):
        load_signer(next(repo.offline_keys.glob("targets-*.key")), b"guess")


def test_root_rotation_is_followed_and_the_old_root_key_is_no_longer_trusted(tmp_path, repo):
    device = _device(tmp_path, repo)
    device.refresh()
    old_root_signers = repo._signers("root", PASS)
    assert repo.rotate("root", PASS) == 2
    device.refresh()
    assert device.trusted_version("root") == 2
    # an attacker holding the old root keys signs a root v3: refused
    root = repo.load("root")
    root.signed.version = 3
    root.signatures.clear()
    for signer in old_root_signers:
        root.sign(signer, append=True)
    repo._write(root)
    with pytest.raises(TrustError) as err:
        device.refresh()
    assert err.value.role == "root"
    assert device.trusted_version("root") == 2


def test_fast_forward_attack_recovered_after_timestamp_key_rotation(tmp_path, repo):
    device = _device(tmp_path, repo)
    device.refresh()
    legit = (repo.metadata_dir / "timestamp.json").read_bytes()
    # an attacker with the stolen timestamp key serves a far-future version: validly signed
    _resign(repo, "timestamp", lambda signed: setattr(signed, "version", 1000))
    device.refresh()
    assert device.trusted_version("timestamp") == 1000
    # the operator's repository never had it; they rotate the timestamp key
    (repo.metadata_dir / "timestamp.json").write_bytes(legit)
    repo.rotate("timestamp", PASS)
    recovered = repo.load("timestamp").signed.version
    assert recovered < 1000
    device.refresh()  # the new root drops the timestamp the old key vouched for
    assert device.trusted_version("timestamp") == recovered


def test_threshold_padded_with_duplicate_key_ids(tmp_path, repo):
    device = _device(tmp_path, repo)
    root = repo.load("root")
    root.signed.version += 1
    root.signatures.clear()
    signer = repo._signers("root", PASS)[0]
    root.sign(signer, append=True)
    duplicate = next(iter(root.signatures.values()))
    root.signatures[duplicate.keyid + ""] = duplicate  # the same key id twice counts once
    repo._write(root)
    with pytest.raises(TrustError):
        device.refresh()


def test_replayed_older_snapshot_and_targets(tmp_path, repo, bundle):
    device = _device(tmp_path, repo)
    device.refresh()
    old_targets = repo.load("targets")
    repo.publish([bundle], PASS)
    device.refresh()
    trusted = device.trusted_version("targets")
    # a new snapshot that points back at the older targets version (a rollback)
    _resign(
        repo,
        "snapshot",
        lambda signed: (
            setattr(signed, "version", signed.version + 1),
            signed.meta["targets.json"].__setattr__("version", old_targets.signed.version),
        ),
    )
    _resign(
        repo,
        "timestamp",
        lambda signed: (
            setattr(signed, "version", signed.version + 1),
            signed.snapshot_meta.__setattr__("version", repo.load("snapshot").signed.version),
        ),
    )
    with pytest.raises(TrustError):
        device.refresh()
    assert device.trusted_version("targets") == trusted


@pytest.mark.parametrize("role", ["snapshot", "targets", "root"])
def test_expired_metadata_freeze(tmp_path, repo, role):
    device = _device(tmp_path, repo)
    long_ago = dt.datetime.now(dt.UTC) - dt.timedelta(days=400)

    def expire(signed) -> None:
        signed.version += 1
        signed.expires = long_ago

    md = _resign(repo, role, expire)
    if role == "targets":
        _resign(
            repo,
            "snapshot",
            lambda s: (
                setattr(s, "version", s.version + 1),
                s.meta["targets.json"].__setattr__("version", md.signed.version),
            ),
        )
    if role != "root":
        _resign(
            repo,
            "timestamp",
            lambda s: (
                setattr(s, "version", s.version + 1),
                s.snapshot_meta.__setattr__("version", repo.load("snapshot").signed.version),
            ),
        )
    with pytest.raises(TrustError, match="Expired"):
        device.refresh()


def test_wrong_length_target(tmp_path, repo):
    (stored,) = (repo.targets_dir / "model/1.0.0/x86-64-cpu").glob("*.model.onnx")
    stored.write_bytes(stored.read_bytes()[:-10])
    device = _device(tmp_path, repo)
    device.refresh()
    with pytest.raises((TrustError, FetchError)):
        device.download(TARGET)
    assert not list(device.targets_dir.glob("*model.onnx"))


def test_revoked_root_key_no_longer_counts(tmp_path):
    repository = ImageRepository.init(tmp_path / "repo2", PASS, {"root": 2}, keys=tmp_path / "keys2")
    with pytest.raises(Exception, match="threshold"):  # 2 keys, threshold 2: revoking one is refused
        repository.revoke("root", repository.load("root").signed.roles["root"].keyids[0], PASS)
    root = repository.load("root")
    root.signed.roles["root"].threshold = 1
    root.signed.version += 1
    root.signatures.clear()
    for signer in repository._signers("root", PASS):
        root.sign(signer, append=True)
    repository._write(root)
    keyid = root.signed.roles["root"].keyids[0]
    assert repository.revoke("root", keyid, PASS) == 3
    assert keyid not in repository.load("root").signed.roles["root"].keyids
    assert len(list(repository.offline_keys.glob("root-*.key"))) == 1
    device = _device(tmp_path / "d", repository)
    device.refresh()
    assert device.trusted_version("root") == 3


def test_replayed_older_snapshot(tmp_path, repo, bundle):
    repo.publish([bundle], PASS)  # snapshot v3
    device = _device(tmp_path, repo)
    device.refresh()
    trusted = device.trusted_version("snapshot")
    # a validly signed timestamp that points back at the older snapshot v2, still on the server
    _resign(
        repo,
        "timestamp",
        lambda signed: (
            setattr(signed, "version", signed.version + 1),
            signed.snapshot_meta.__setattr__("version", trusted - 1),
        ),
    )
    with pytest.raises(TrustError) as err:
        device.refresh()
    assert err.value.role in ("timestamp", "snapshot")
    assert device.trusted_version("snapshot") == trusted
