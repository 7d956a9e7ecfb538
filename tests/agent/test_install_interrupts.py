"""What stops an install that is waiting to retry a failed transfer: a newer director document
does, at once; the retained copy of the document being installed does not. The broker hands
that copy to the agent on every (re)connect, which after a restart comes while the resumed
install waits out its first failed fetch (``not connected``) — CI saw the device refuse its
own release there and never install it. The real ``DeviceCore``, runtime and signed folder
repository; the transfer fails by hand."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from agent.device import DeviceCore
from edgec.errors import FetchError
from edgec.reports import EventKind, InstallStep
from ota_server.repository import ImageRepository
from tests.agent.test_install import FolderChunks
from tests.agent.test_typed_reports import PASS, WireReporter, _device, _issuer


class FailsOnce(FolderChunks):
    """The first chunk request fails like a dropped broker link; ``during`` runs just before
    (what the broker delivers while the agent is offline and reconnecting)."""

    def __init__(self, folder: Path) -> None:
        super().__init__(folder)
        self.during: Callable[[], None] | None = None

    def chunk(self, path: str, offset: int, length: int | None = None) -> tuple[int, bytes]:
        if self.during is not None:
            during, self.during = self.during, None
            during()
            raise FetchError(f"cannot send a fetch request for {path}: not connected")
        return super().chunk(path, offset, length)


@pytest.fixture
def repo(tmp_path, releases) -> ImageRepository:
    repo = ImageRepository.init(tmp_path / "repo", PASS, {}, keys=tmp_path / "keys")
    repo.publish([releases["1.0.0"], releases["2.0.0"]], PASS)
    return repo


def _install(core: DeviceCore, payload: bytes) -> None:
    core.on_desired(payload)
    while (envelope := core.take_desired()) is not None:
        core.install(envelope)


def _events(reporter: WireReporter, kind: EventKind) -> list[str | None]:
    return [e.release for e in reporter.events if e.event is kind]


def test_the_retained_copy_of_the_running_document_does_not_stop_its_retry(tmp_path, repo):
    issue = _issuer(repo, tmp_path)
    chunks, reporter = FailsOnce(repo.folder), WireReporter()
    core = _device(tmp_path / "device", repo, chunks, reporter)  # type: ignore[arg-type]
    core.start()
    document = issue("digits:1.0.0")
    chunks.during = lambda: core.on_desired(document)  # the broker's retained copy, again
    _install(core, document)
    assert _events(reporter, EventKind.RETRYING) == ["digits:1.0.0"]
    assert _events(reporter, EventKind.REFUSED) == []
    assert _events(reporter, EventKind.COMMITTED) == ["digits:1.0.0"]
    assert core.slot.model is not None
    assert core.slot.model.manifest.version == "1.0.0"


def test_a_newer_document_stops_the_retry_at_once_and_installs(tmp_path, repo):
    issue = _issuer(repo, tmp_path)
    chunks, reporter = FailsOnce(repo.folder), WireReporter()
    core = _device(tmp_path / "device", repo, chunks, reporter)  # type: ignore[arg-type]
    core.start()
    first, newer = issue("digits:1.0.0"), issue("digits:2.0.0")
    chunks.during = lambda: core.on_desired(newer)
    _install(core, first)
    refused = [e for e in reporter.events if e.event is EventKind.REFUSED]
    assert [(e.release, e.step, e.detail) for e in refused] == [
        ("digits:1.0.0", InstallStep.FETCH, "a newer director document arrived")
    ]
    assert _events(reporter, EventKind.COMMITTED) == ["digits:2.0.0"]
    assert core.slot.model is not None
    assert core.slot.model.manifest.version == "2.0.0"
