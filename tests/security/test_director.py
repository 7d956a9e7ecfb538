"""Attacks on director documents: each refused by the device's director state machine.

The documents are signed by the real director key from a real repository; the image
repository side is the one ngclient verified (test_image_repository.py).
"""

from __future__ import annotations

import datetime as dt

import pytest
from securesystemslib.signer import CryptoSigner

from agent.director import DirectorState, RepositoryFile, check_against_repository
from edgec.director import Action, DirectorDocument, DirectorFile
from edgec.errors import TrustError
from ota_server.director import sign_document
from ota_server.repository import ImageRepository
from tests.security.test_image_repository import PASS, bundle  # noqa: F401  (fixture)

NOW = dt.datetime(2026, 11, 29, 12, 0, tzinfo=dt.UTC)
TARGET = "model/1.0.0/x86-64-cpu/model.onnx"


@pytest.fixture
def repo(tmp_path, bundle):  # noqa: F811
    repository = ImageRepository.init(tmp_path / "repo", PASS, {}, keys=tmp_path / "keys")
    repository.publish([bundle], PASS)
    return repository


def _doc(repo: ImageRepository, version: int, **changes: object) -> DirectorDocument:
    info = repo.load("targets").signed.targets[TARGET]
    fields: dict[str, object] = {
        "fleet": "lab",
        "device": "pi-01",
        "profile": "x86-64-cpu",
        "version": version,
        "expires": NOW + dt.timedelta(hours=1),
        "rollout": "r1",
        "action": Action.INSTALL,
        "release": "model:1.0.0",
        "files": [DirectorFile(path=TARGET, sha256=info.hashes["sha256"], length=info.length)],
    }
    fields.update(changes)
    return DirectorDocument(**fields)  # type: ignore[arg-type]


def _state(repo: ImageRepository, version: int = 0) -> DirectorState:
    return DirectorState(key=repo.director_key(), device="pi-01", profile="x86-64-cpu", version=version)


def _signed_targets(repo: ImageRepository) -> dict[str, RepositoryFile]:
    found = {}
    for path, info in repo.load("targets").signed.targets.items():
        custom = info.unrecognized_fields["custom"]["edgec"]
        found[path] = RepositoryFile(info.hashes["sha256"], info.length, custom["profile"])
    return found


def test_valid_document_is_accepted_and_agrees_with_the_repository(repo):
    state, doc = _state(repo).accept(sign_document(_doc(repo, 1), repo.director_signer(PASS)), NOW)
    assert state.version == 1
    check_against_repository(doc, _signed_targets(repo))


def test_replayed_older_director_document(repo):
    signer = repo.director_signer(PASS)
    state, _ = _state(repo).accept(sign_document(_doc(repo, 5), signer), NOW)
    with pytest.raises(TrustError, match="not newer"):
        state.accept(sign_document(_doc(repo, 4), signer), NOW)
    with pytest.raises(TrustError, match="not newer"):
        state.accept(sign_document(_doc(repo, 5), signer), NOW)
    assert state.version == 5  # the refusal left the trusted state as it was


def test_expired_director_document(repo):
    doc = _doc(repo, 1, expires=NOW - dt.timedelta(seconds=1))
    with pytest.raises(TrustError, match="expired"):
        _state(repo).accept(sign_document(doc, repo.director_signer(PASS)), NOW)


def test_director_document_signed_by_the_wrong_key(repo):
    with pytest.raises(TrustError, match="not signed by the trusted director key"):
        _state(repo).accept(sign_document(_doc(repo, 1), CryptoSigner.generate_ed25519()), NOW)


def test_director_document_tampered_after_signing(repo):
    envelope = sign_document(_doc(repo, 1), repo.director_signer(PASS))
    forged = envelope.model_copy(update={"signed": _doc(repo, 1, device="pi-01", rollout="evil")})
    with pytest.raises(TrustError, match="not signed"):
        _state(repo).accept(forged, NOW)


def test_director_names_a_target_the_image_repository_does_not_have(repo):
    doc = _doc(
        repo, 1, files=[DirectorFile(path="model/6.6.6/x86-64-cpu/model.onnx", sha256="0" * 64, length=1)]
    )
    with pytest.raises(TrustError, match="does not sign"):
        check_against_repository(doc, _signed_targets(repo))


def test_director_and_image_repository_disagree_on_hashes(repo):
    doc = _doc(repo, 1)
    wrong = doc.model_copy(update={"files": [doc.files[0].model_copy(update={"sha256": "f" * 64})]})
    with pytest.raises(TrustError, match="disagree"):
        check_against_repository(wrong, _signed_targets(repo))


def test_target_built_for_another_profile(repo):
    doc = _doc(repo, 1, profile="raspberry-pi-4")
    state = DirectorState(key=repo.director_key(), device="pi-01", profile="raspberry-pi-4")
    _, accepted = state.accept(sign_document(doc, repo.director_signer(PASS)), NOW)
    with pytest.raises(TrustError, match="built for x86-64-cpu"):
        check_against_repository(accepted, _signed_targets(repo))


def test_document_for_another_device(repo):
    with pytest.raises(TrustError, match="for device"):
        _state(repo).accept(sign_document(_doc(repo, 1, device="pi-02"), repo.director_signer(PASS)), NOW)


def test_operator_rollback_is_a_new_document_naming_an_older_target(repo, bundle):  # noqa: F811
    signer = repo.director_signer(PASS)
    state, _ = _state(repo).accept(sign_document(_doc(repo, 7), signer), NOW)
    rollback = _doc(repo, 8, action=Action.ROLLBACK, release="model:1.0.0")
    state, doc = state.accept(sign_document(rollback, signer), NOW)
    assert (state.version, doc.action) == (8, Action.ROLLBACK)
    check_against_repository(doc, _signed_targets(repo))


def test_refusal_leaves_the_persisted_state_intact(tmp_path, repo):
    signer = repo.director_signer(PASS)
    path = tmp_path / "director.json"
    state, _ = _state(repo).accept(sign_document(_doc(repo, 3), signer), NOW)
    state.save(path)
    before = path.read_bytes()
    loaded = DirectorState.load(path, repo.director_key(), "pi-01", "x86-64-cpu")
    assert loaded.version == 3
    with pytest.raises(TrustError):
        loaded.accept(sign_document(_doc(repo, 2), signer), NOW)
    assert path.read_bytes() == before
    with pytest.raises(TrustError, match="another device"):
        DirectorState.load(path, repo.director_key(), "pi-02", "x86-64-cpu")


def test_issuer_versions_increase_strictly_per_device_across_restarts(tmp_path, repo):
    from ota_server.director import DirectorIssuer
    from ota_server.registry import Registry

    files = _doc(repo, 1).files
    db = f"sqlite:///{tmp_path / 'fleet.db'}"
    issuer = DirectorIssuer(Registry.open(db), repo.director_signer(PASS))
    common = {
        "fleet": "lab",
        "profile": "x86-64-cpu",
        "rollout": "r1",
        "release": "model:1.0.0",
        "files": files,
    }
    first = issuer.issue(device="pi-01", action=Action.INSTALL, now=NOW, **common)
    other = issuer.issue(device="pi-02", action=Action.INSTALL, now=NOW, **common)
    restarted = DirectorIssuer(Registry.open(db), repo.director_signer(PASS))  # a server restart
    second = restarted.issue(device="pi-01", action=Action.ROLLBACK, now=NOW, **common)
    assert (first.signed.version, other.signed.version, second.signed.version) == (1, 1, 2)
    device, _ = _state(repo).accept(first, NOW)
    device, doc = device.accept(second, NOW)
    assert doc.action is Action.ROLLBACK
