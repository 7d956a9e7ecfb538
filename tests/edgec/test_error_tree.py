"""One error tree, named by fault and mapped by type.

Every exception class the product packages define is an ``EdgecError``, so a caller that
catches the tree catches everything edgec raises on purpose; none carries an exit code (the
command line chooses it by type); python-tuf's refusals reach the agent's callers as the
``TrustError`` subclass of their fault, built here from a real repository that is attacked.
"""

from __future__ import annotations

import datetime as dt
import importlib
import inspect
import pkgutil
from pathlib import Path

import pytest
from securesystemslib.signer import CryptoSigner
from tuf.api.metadata import Metadata

from agent.director import DirectorState, RepositoryFile, check_against_repository
from agent.mqtt_fetch import ResumableDownload
from agent.trust import FolderFetcher, TrustedRepository
from cli import exit_code, main
from edgec.director import Action, DirectorDocument, DirectorFile
from edgec.errors import (
    EXIT_BAD_INPUT,
    EXIT_INTERNAL,
    EXIT_SERVER,
    EXIT_TARGET_FAILED,
    BadSignatureError,
    ConflictError,
    EdgecError,
    ExpiredError,
    FetchError,
    GateError,
    HashMismatchError,
    NewerBundleError,
    NewerDirectorDocumentError,
    NewerSchemaError,
    NotFoundError,
    ProfileError,
    ProtocolError,
    RollbackError,
    ServerError,
    TrustError,
)
from ota_server.director import sign_document
from ota_server.repository import ImageRepository

PRODUCT_PACKAGES = (
    *("edgec", "cli", "localfleet", "agent", "ota_server"),
    *("compiler", "device_profiles", "bundle_runtime", "sim"),
)
PASS = b"correct horse battery staple"
NOW = dt.datetime(2026, 11, 29, 12, 0, tzinfo=dt.UTC)


# -- one tree ---------------------------------------------------------------------------------
def _exception_classes() -> dict[str, type[BaseException]]:
    """Every exception class defined in a module of the product packages, by qualified name."""
    found: dict[str, type[BaseException]] = {}
    for package_name in PRODUCT_PACKAGES:
        package = importlib.import_module(package_name)
        for module_info in pkgutil.walk_packages(package.__path__, f"{package_name}."):
            if module_info.name.endswith("__main__"):
                continue  # runs the command line
            module = importlib.import_module(module_info.name)
            for name, value in vars(module).items():
                if (
                    inspect.isclass(value)
                    and issubclass(value, BaseException)
                    and value.__module__ == module.__name__
                ):
                    found[f"{module.__name__}.{name}"] = value
    return found


def test_every_exception_class_the_product_defines_is_an_edgec_error():
    classes = _exception_classes()
    # the walk reaches the classes that once stood outside the tree (it is not vacuous)
    for name in (
        "agent._install_parts.Refused",
        "agent.slot.NoModelError",
        "agent.runtime.InputError",
        "agent._http_messages.HttpError",
        "ota_server._asgi_app.HttpError",
        "ota_server.ingest.ReportRefused",
        "compiler.runtime.RuntimeUnavailableError",
    ):
        assert name in classes, name
    outside = sorted(name for name, cls in classes.items() if not issubclass(cls, EdgecError))
    assert outside == []


def test_no_library_error_carries_an_exit_code():
    classes = _exception_classes()
    carrying = sorted(name for name, cls in classes.items() if hasattr(cls, "exit_code"))
    assert carrying == []


def test_the_operator_api_errors_are_user_input_by_type():
    from ota_server.registry import DeviceExistsError
    from ota_server.repository import RepositoryExistsError

    assert issubclass(DeviceExistsError, ConflictError)
    assert issubclass(RepositoryExistsError, ConflictError)


# -- exit codes, chosen by the command line ---------------------------------------------------
def _newer(kind: type[NewerSchemaError]) -> NewerSchemaError:
    return kind("written by a newer edgec", document="manifest", found="9.0", supported=1)


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (ProfileError("unknown profile 'x'"), EXIT_BAD_INPUT),
        (NotFoundError("no device 'x'"), EXIT_BAD_INPUT),
        (ConflictError("rollout r-1 is aborted"), EXIT_BAD_INPUT),
        (ProtocolError("bad topic"), EXIT_BAD_INPUT),
        (_newer(NewerBundleError), EXIT_BAD_INPUT),
        (GateError("cosine 0.9 under 0.99", ["cosine"]), EXIT_TARGET_FAILED),
        (TrustError("another device's document", "director"), EXIT_TARGET_FAILED),
        (ExpiredError("timestamp.json is expired", "timestamp"), EXIT_TARGET_FAILED),
        (_newer(NewerDirectorDocumentError), EXIT_TARGET_FAILED),
        (FetchError("connection reset"), EXIT_TARGET_FAILED),
        (ServerError("cannot reach the OTA server"), EXIT_SERVER),
        (EdgecError("a branch of its own"), EXIT_INTERNAL),
        (RuntimeError("a bug"), EXIT_INTERNAL),
    ],
    ids=lambda value: type(value).__name__ if isinstance(value, BaseException) else str(value),
)
def test_exit_code_is_chosen_by_the_errors_branch(error, code):
    assert exit_code(error) == code


def test_the_command_line_exits_by_type_with_the_message(capsys, tmp_path):
    missing = tmp_path / "no-bundle"
    assert main(["inspect", str(missing)]) == EXIT_BAD_INPUT  # a BundleError
    assert (
        capsys.readouterr().err
        == f"edgec: error: {missing} does not exist; give the path of a bundle folder\n"
    )
    assert main(["fleet", "ls", "--server", "http://127.0.0.1:9", "--token", "t"]) == EXIT_SERVER
    assert capsys.readouterr().err.startswith(
        "edgec: error: cannot reach the OTA server at http://127.0.0.1:9"
    )


# -- TUF refusals by fault, from a real repository -------------------------------------------
@pytest.fixture
def repo(tmp_path) -> ImageRepository:
    return ImageRepository.init(tmp_path / "repo", PASS, {}, keys=tmp_path / "keys")


def _device(tmp_path: Path, repo: ImageRepository, *, refresh: bool = True) -> TrustedRepository:
    state = tmp_path / "device"
    TrustedRepository.provision(state, (repo.metadata_dir / "1.root.json").read_bytes())
    device = TrustedRepository(state, FolderFetcher(repo.folder))
    if refresh:
        device.refresh()
    return device


def _resign_timestamp(repo: ImageRepository, edit, signers=None) -> None:
    md: Metadata = repo.load("timestamp")
    md.signed.version += 1
    edit(md.signed)
    md.signatures.clear()
    for signer in signers or repo._signers("timestamp", PASS):
        md.sign(signer, append=True)
    repo._write(md)


def test_expired_timestamp_is_an_expired_error(tmp_path, repo):
    device = _device(tmp_path, repo)
    repo.refresh(PASS, now=dt.datetime.now(dt.UTC) - dt.timedelta(days=30))  # signed, but expired
    with pytest.raises(ExpiredError) as err:
        device.refresh()
    assert err.value.role == "timestamp"
    assert "ExpiredMetadataError" in str(err.value)  # the message is what it was


def test_replayed_older_timestamp_is_a_rollback_error(tmp_path, repo):
    old = (repo.metadata_dir / "timestamp.json").read_bytes()
    repo.refresh(PASS)
    device = _device(tmp_path, repo)
    (repo.metadata_dir / "timestamp.json").write_bytes(old)
    with pytest.raises(RollbackError) as err:
        device.refresh()
    assert err.value.role == "timestamp"


def test_timestamp_signed_by_an_untrusted_key_is_a_bad_signature_error(tmp_path, repo):
    device = _device(tmp_path, repo)
    _resign_timestamp(repo, lambda signed: None, signers=[CryptoSigner.generate_ed25519()])
    with pytest.raises(BadSignatureError) as err:
        device.refresh()
    assert err.value.role == "timestamp"


def test_snapshot_that_misses_its_signed_hash_is_a_hash_mismatch_error(tmp_path, repo):
    device = _device(tmp_path, repo, refresh=False)  # a snapshot it trusts already is not checked again
    _resign_timestamp(repo, lambda signed: setattr(signed.snapshot_meta, "hashes", {"sha256": "0" * 64}))
    with pytest.raises(HashMismatchError, match="LengthOrHashMismatchError"):
        device.refresh()


# -- director documents and chunks by fault ---------------------------------------------------
def _doc(version: int, **changes: object) -> DirectorDocument:
    fields: dict[str, object] = {
        "fleet": "lab",
        "device": "pi-01",
        "profile": "x86-64-cpu",
        "version": version,
        "expires": NOW + dt.timedelta(hours=1),
        "rollout": "r1",
        "action": Action.INSTALL,
        "release": "model:1.0.0",
        "files": [DirectorFile(path="model/1.0.0/x86-64-cpu/model.onnx", sha256="a" * 64, length=10)],
    }
    fields.update(changes)
    return DirectorDocument(**fields)  # type: ignore[arg-type]


def test_director_refusals_are_named_by_fault(repo):
    signer = repo.director_signer(PASS)
    state = DirectorState(key=repo.director_key(), device="pi-01", profile="x86-64-cpu", version=5)
    with pytest.raises(ExpiredError, match="expired"):
        state.accept(sign_document(_doc(6, expires=NOW - dt.timedelta(seconds=1)), signer), NOW)
    with pytest.raises(RollbackError, match="not newer"):
        state.accept(sign_document(_doc(5), signer), NOW)
    with pytest.raises(BadSignatureError, match="not signed by the trusted director key"):
        state.accept(sign_document(_doc(6), CryptoSigner.generate_ed25519()), NOW)
    with pytest.raises(TrustError, match="not 'pi-01'") as other:
        state.accept(sign_document(_doc(6, device="pi-02"), signer), NOW)
    assert type(other.value) is TrustError  # no check named it: a plain refusal
    doc = _doc(6)
    signed = {doc.files[0].path: RepositoryFile("b" * 64, 10, "x86-64-cpu")}
    with pytest.raises(HashMismatchError, match="disagree"):
        check_against_repository(doc, signed)


class _Chunks:
    """A repository file served in chunks, tampered after it was signed."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    def chunk(self, path: str, offset: int) -> tuple[int, bytes]:
        return len(self.data), self.data[offset : offset + 4]


def test_tampered_chunk_is_a_hash_mismatch_error_and_nothing_is_put_in_place(tmp_path):
    import hashlib

    signed = b"abcdefgh"
    custom = {"chunk_bytes": 4, "chunks": [hashlib.sha256(signed[i : i + 4]).hexdigest() for i in (0, 4)]}
    dest = tmp_path / "model.onnx"
    download = ResumableDownload(
        _Chunks(b"abcdXfgh"), "m", dest, custom=custom, length=8, sha256=hashlib.sha256(signed).hexdigest()
    )
    with pytest.raises(HashMismatchError, match="chunk 1"):
        download.run()
    assert not dest.exists()
    assert download.good_bytes() == 4  # the good chunk is kept for the retry
    ResumableDownload(
        _Chunks(signed), "m", dest, custom=custom, length=8, sha256=hashlib.sha256(signed).hexdigest()
    ).run()
    assert dest.read_bytes() == signed
    assert not download.partial.exists()
