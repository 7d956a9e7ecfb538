"""The install pipeline with real parts and no broker: a signed repository read from a folder
(python-tuf verifies it), director documents signed with the repository's director key, the
real runtime. Named after what each test stops or guarantees."""

from __future__ import annotations

import datetime as dt
import errno
from pathlib import Path

import pytest

from agent.config import InstallSettings
from agent.director import DirectorState
from agent.install import Installer, ProbationMonitor, Step
from agent.runtime import golden_samples, load_bundle, self_test
from agent.slot import ModelSlot
from agent.store import StateStore
from agent.trust import FolderFetcher, TrustedRepository
from edgec.director import Action, SignedDirectorDocument
from edgec.errors import TrustError
from ota_server.director import DirectorIssuer, release_files
from ota_server.registry import Registry
from ota_server.repository import ImageRepository

PASS = b"install tests"
PROFILE = "x86-64-cpu"


class Recorder:
    def __init__(self) -> None:
        self.events: list[dict] = []
        self.states: list[tuple[str, str | None]] = []

    def event(self, kind, release, detail=None, **figures) -> None:
        self.events.append({"event": kind, "release": release, "detail": detail, **figures})

    def state(self, status, installed, detail=None) -> None:
        self.states.append((status, installed))

    def kinds(self) -> list[str]:
        return [e["event"] for e in self.events]


class FolderChunks:
    """The repository's files, chunk by chunk, straight from its folder."""

    def __init__(self, folder: Path, chunk_bytes: int = 256 * 1024) -> None:
        self.folder = folder
        self.chunk_bytes = chunk_bytes

    def chunk(self, path: str, offset: int, length: int | None = None) -> tuple[int, bytes]:
        file = self.folder / path
        with file.open("rb") as f:
            f.seek(offset)
            return file.stat().st_size, f.read(min(self.chunk_bytes, length or self.chunk_bytes))


@pytest.fixture
def world(tmp_path, releases):
    repo = ImageRepository.init(tmp_path / "repo", PASS, {}, keys=tmp_path / "keys")
    repo.publish([releases[v] for v in ("1.0.0", "2.0.0", "3.0.0")], PASS)
    issuer = DirectorIssuer(Registry.open(f"sqlite:///{tmp_path / 'fleet.db'}"), repo.director_signer(PASS))

    def document(release: str, action: Action = Action.INSTALL) -> SignedDirectorDocument:
        files = release_files(repo.load("targets").signed.targets, release, PROFILE)
        return issuer.issue(
            fleet="lab",
            device="pi-1",
            profile=PROFILE,
            rollout="manual",
            action=action,
            release=release,
            files=files,
        )

    state = tmp_path / "device"
    TrustedRepository.provision(state, (repo.metadata_dir / "1.root.json").read_bytes())
    return {"repo": repo, "document": document, "state": state}


def _installer(world, slot=None, reporter=None, **overrides) -> Installer:
    state = world["state"]
    repo = world["repo"]
    if "director" in overrides:
        director = overrides["director"]
    else:
        director = DirectorState.load(state / "director.json", repo.director_key(), "pi-1", PROFILE)
    return Installer(
        settings=InstallSettings(probation_s=0.2, probation_min_requests=5, warmup_runs=2),
        store=StateStore(state),
        slot=slot or ModelSlot(),
        director=director,
        repository=TrustedRepository(state, FolderFetcher(repo.folder)),
        chunks=FolderChunks(repo.folder),
        reporter=reporter or Recorder(),
        loader=load_bundle,
        self_test=self_test,
        golden_inputs=lambda model, path: golden_samples(model, path)[0],
        probation=ProbationMonitor(),
    )


def test_an_assigned_release_is_verified_fetched_tested_swapped_and_committed(world):
    reporter, slot = Recorder(), ModelSlot()
    installer = _installer(world, slot, reporter)
    installer.handle(world["document"]("digits:1.0.0"))
    assert reporter.kinds()[0] == "accepted"
    assert reporter.kinds()[-2:] == ["swapped", "committed"]
    assert slot.model is not None
    assert slot.model.manifest.version == "1.0.0"
    store = StateStore(world["state"])
    assert store.active().release == "digits:1.0.0"
    assert store.journal() is None
    assert reporter.states[-1] == ("serving", "digits:1.0.0")
    committed = next(e for e in reporter.events if e["event"] == "committed")
    assert committed["requests"] >= 5  # probation watched real runs (golden probes here)


def test_the_retained_copy_of_an_accepted_document_after_a_restart_is_not_a_replay(world):
    document = world["document"]("digits:1.0.0")
    _installer(world).handle(document)
    reporter = Recorder()
    restarted = _installer(world, reporter=reporter)
    restarted.start_serving()
    restarted.handle(document)  # the broker delivers the retained document again
    assert "refused" not in reporter.kinds()
    assert reporter.kinds() == ["started"]


def test_a_kill_between_accepting_and_the_journal_still_installs_after_a_restart(world):
    document = world["document"]("digits:1.0.0")
    state = world["state"]
    director = DirectorState.load(state / "director.json", world["repo"].director_key(), "pi-1", PROFILE)
    accepted, _ = director.accept(document, dt.datetime.now(dt.UTC))
    store = StateStore(state)
    store.set_document(document.model_dump(mode="json"))  # what handle() writes before the journal
    accepted.save(state / "director.json")
    assert store.journal() is None  # killed here
    reporter, slot = Recorder(), ModelSlot()
    restarted = _installer(world, slot, reporter)
    restarted.handle(document)  # the broker delivers the retained document again
    assert reporter.kinds()[-1] == "committed"
    assert slot.model is not None
    assert slot.model.manifest.version == "1.0.0"


def test_an_older_director_document_replayed_is_refused(world):
    first = world["document"]("digits:1.0.0")
    second = world["document"]("digits:2.0.0")
    reporter, slot = Recorder(), ModelSlot()
    installer = _installer(world, slot, reporter)
    installer.handle(first)
    installer.handle(second)
    installer.handle(first)
    refusal = reporter.events[-1]
    assert (refusal["event"], refusal["step"]) == ("refused", "accept")
    assert "replay" in refusal["detail"]
    assert slot.model.manifest.version == "2.0.0"


def test_a_release_that_fails_its_self_test_never_serves(world):
    reporter, slot = Recorder(), ModelSlot()
    installer = _installer(world, slot, reporter)
    installer.handle(world["document"]("digits:2.0.0"))
    installer.handle(world["document"]("digits:3.0.0"))
    refusal = reporter.events[-1]
    assert (refusal["event"], refusal["step"]) == ("refused", "self-test")
    assert "swapped" not in [e["event"] for e in reporter.events if e["release"] == "digits:3.0.0"]
    assert slot.model.manifest.version == "2.0.0"
    store = StateStore(world["state"])
    assert store.active().release == "digits:2.0.0"
    assert not (store.models / "digits-3.0.0").exists()  # nothing of it is kept
    assert store.outcome(2).startswith("refused at self-test")


def test_a_rollback_document_reinstalls_the_previous_release_without_fetching(world):
    reporter, slot = Recorder(), ModelSlot()
    installer = _installer(world, slot, reporter)
    installer.handle(world["document"]("digits:1.0.0"))
    installer.handle(world["document"]("digits:2.0.0"))
    before = len(reporter.events)
    installer.handle(world["document"]("digits:1.0.0", Action.ROLLBACK))
    rolled_back = reporter.events[before:]
    assert "fetched" not in [e["event"] for e in rolled_back]  # the previous bundle was kept
    assert [e["event"] for e in rolled_back][-1] == "committed"
    assert slot.model.manifest.version == "1.0.0"


def test_steps_cannot_run_out_of_order(world):
    installer = _installer(world)
    journal = StateStore(world["state"]).journal()
    assert journal is None
    from agent.store import InstallJournal

    accepted = InstallJournal(1, "digits:1.0.0", int(Step.ACCEPTED))
    with pytest.raises(RuntimeError, match="SWAPPED after ACCEPTED"):
        installer._advance(accepted, Step.SWAPPED)


def test_a_full_disk_stops_the_install_with_an_event_and_the_model_keeps_serving(world, monkeypatch):
    reporter, slot = Recorder(), ModelSlot()
    installer = _installer(world, slot, reporter)
    installer.handle(world["document"]("digits:1.0.0"))
    import agent.mqtt_fetch

    def full(*_args, **_kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    document = world["document"]("digits:2.0.0")
    monkeypatch.setattr(agent.mqtt_fetch.os, "fsync", full)  # every fsync fails from here on
    installer.handle(document)
    error = reporter.events[-1]
    assert error["event"] == "error"
    assert "No space left on device" in error["detail"]
    assert slot.model.manifest.version == "1.0.0"
    assert StateStore(world["state"]).active().release == "digits:1.0.0"


def test_a_corrupt_state_file_refuses_installs_and_keeps_the_committed_model(world):
    _installer(world).handle(world["document"]("digits:1.0.0"))
    (world["state"] / "install.json").write_text("{not json")
    assert StateStore(world["state"]).journal() is None  # ignored, with a logged error
    (world["state"] / "director.json").write_text("garbage")
    with pytest.raises(TrustError, match="unreadable"):
        DirectorState.load(world["state"] / "director.json", world["repo"].director_key(), "pi-1", PROFILE)
    # what the daemon does then: serve what is committed, refuse installs, say why
    reporter, slot = Recorder(), ModelSlot()
    installer = _installer(world, slot, reporter, director=None)
    installer.start_serving()
    installer.handle(world["document"]("digits:2.0.0"))
    assert slot.model.manifest.version == "1.0.0"
    assert reporter.events[-1]["event"] == "refused"
    assert "re-provision" in reporter.events[-1]["detail"]
