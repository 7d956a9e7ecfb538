"""The agent emits its events and states as the wire contract's enums and models: a device
(the real ``DeviceCore`` with the real runtime, a signed repository read from its folder)
is taken through every path that reports — an install, a failing self-test, a tampered
document, a transport failure, garbage on the desired topic, restarts with a good and a
damaged state folder — and every report is built by ``agent.report``'s own builders,
turned into the bytes the broker would carry and read back by the server's parser.

It pins that every kind the agent emits is an ``EventKind`` (and every ``EventKind`` is
emitted by some path), that the statuses are ``DeviceStatus`` members, refusal steps
``InstallStep`` members, and that the bytes read exactly as the previous release's reports
(a dict with null fields, written by ``json.dumps``) did."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.config import InstallSettings
from agent.daemon import real_runtime
from agent.device import DeviceCore, DeviceIdentity, parse_director_key
from agent.report import install_event, offline_state, state_report, wire_json
from agent.trust import FolderFetcher
from edgec.director import Action, ShadowRequest, SignedDirectorDocument
from edgec.errors import FetchError
from edgec.reports import DeviceState, DeviceStatus, Event, EventKind, InstallStep
from ota_server.director import DirectorIssuer, release_files
from ota_server.ingest import ReportLimits, parse_report
from ota_server.registry import Registry
from ota_server.repository import ImageRepository
from tests.agent.test_install import FolderChunks

PASS = b"typed reports"
PROFILE = "x86-64-cpu"
DEVICE = "pi-1"
LIMITS = ReportLimits()


class WireReporter:
    """The agent's reports as the broker carries them, read back by the server's parser; also
    what the previous release wrote for the same call, read back the same way."""

    def __init__(self) -> None:
        self.kinds_passed: list[Any] = []  # what the agent handed the reporter, untouched
        self.statuses_passed: list[Any] = []
        self.events: list[Event] = []
        self.states: list[DeviceState] = []
        self.previous_events: list[Event] = []
        self.previous_states: list[DeviceState] = []

    def event(self, kind: EventKind, release: str | None, detail: str | None = None, **figures: Any) -> None:
        self.kinds_passed.append(kind)
        built = install_event(kind, release, detail, **figures)
        event = parse_report("events", wire_json(built).encode(), LIMITS)
        assert isinstance(event, Event)
        self.events.append(event)
        previous = {"event": kind, "release": release, "detail": detail, "at": built.at, **figures}
        old = parse_report("events", json.dumps(previous).encode(), LIMITS)
        assert isinstance(old, Event)
        self.previous_events.append(old)

    def state(self, status: DeviceStatus, installed: str | None, detail: str | None = None) -> None:
        self.statuses_passed.append(status)
        state = parse_report("state", wire_json(state_report(status, installed, detail)).encode(), LIMITS)
        assert isinstance(state, DeviceState)
        self.states.append(state)
        previous: dict[str, Any] = {"status": status, "installed": installed}
        if detail:
            previous["detail"] = detail
        old = parse_report("state", json.dumps(previous).encode(), LIMITS)
        assert isinstance(old, DeviceState)
        self.previous_states.append(old)


class FlakyChunks(FolderChunks):
    """The repository's chunks, or a broken transfer while ``broken`` is set; a failure also
    says a newer document arrived (so the retry ends at once instead of after its backoff)."""

    def __init__(self, folder: Path) -> None:
        super().__init__(folder)
        self.broken = False
        self.core: DeviceCore | None = None

    def chunk(self, path: str, offset: int, length: int | None = None) -> tuple[int, bytes]:
        if self.broken:
            assert self.core is not None
            self.core.installer.interrupted.set()
            raise FetchError(f"the broker dropped the transfer of {path}")
        return super().chunk(path, offset, length)


@pytest.fixture
def repo(tmp_path, releases) -> ImageRepository:
    repo = ImageRepository.init(tmp_path / "repo", PASS, {}, keys=tmp_path / "keys")
    repo.publish([releases[v] for v in ("1.0.0", "2.0.0", "3.0.0")], PASS)
    return repo


def _issuer(repo: ImageRepository, tmp_path: Path):
    issuer = DirectorIssuer(Registry.open(f"sqlite:///{tmp_path / 'fleet.db'}"), repo.director_signer(PASS))
    targets = repo.load("targets").signed.targets

    def issue(release: str, tamper: bool = False, shadow: ShadowRequest | None = None) -> bytes:
        files = release_files(targets, release, PROFILE)
        if tamper:  # the director names bytes the image repository never signed
            files = [files[0].model_copy(update={"sha256": "00" * 32}), *files[1:]]
        envelope: SignedDirectorDocument = issuer.issue(
            fleet="lab",
            device=DEVICE,
            profile=PROFILE,
            rollout="r1",
            action=Action.SHADOW if shadow else Action.INSTALL,
            release=release,
            files=files,
            shadow=shadow,
        )
        return json.dumps(envelope.wire_data()).encode()

    return issue


def _device(state: Path, repo: ImageRepository, chunks: FlakyChunks, reporter: WireReporter) -> DeviceCore:
    root, director_key = repo.provisioning()
    core = DeviceCore(
        state,
        DeviceIdentity(DEVICE, PROFILE, root, parse_director_key(director_key)),
        settings=InstallSettings(
            probation_s=0.2, probation_min_requests=5, warmup_runs=1, shadow_window_s=0.2
        ),
        fetcher=FolderFetcher(repo.folder),
        chunks=chunks,
        reporter=reporter,
        runtime=real_runtime(threads=1),
        url_prefix="edgec-folder:",  # FolderFetcher's
    )
    chunks.core = core
    return core


def _deliver(core: DeviceCore, payload: bytes) -> None:
    core.on_desired(payload)
    envelope = core.take_desired()
    if envelope is not None:
        core.install(envelope)


@contextlib.contextmanager
def _traffic(core: DeviceCore) -> Iterator[None]:
    """Requests served by the slot and offered to its shadow tap, as the serving path does."""
    stop = threading.Event()
    x = np.zeros((1, 1, 8, 8), dtype=np.float32)

    def serve() -> None:
        while not stop.wait(0.01):
            started = time.perf_counter()
            model, outputs = core.slot.infer({"x": x})
            core.shadow.offer(model.manifest.version, time.perf_counter() - started, True, {"x": x}, outputs)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def test_every_event_kind_the_agent_emits_is_an_event_kind_and_reads_as_before(tmp_path, repo):
    issue = _issuer(repo, tmp_path)
    state = tmp_path / "device"
    chunks = FlakyChunks(repo.folder)
    reporter = WireReporter()
    core = _device(state, repo, chunks, reporter)
    core.start()  # nothing installed: idle
    _deliver(core, issue("digits:1.0.0"))  # accepted, fetched..., swapped, committed
    with _traffic(core):  # shadow windows, then shadowed; 1.0.0 serves throughout
        _deliver(core, issue("digits:2.0.0", shadow=ShadowRequest(duration_s=1.0, sample=1.0)))
    _deliver(core, issue("digits:3.0.0"))  # its golden file is wrong: refused at the self-test
    _deliver(core, issue("digits:2.0.0", tamper=True))  # refused at verify
    chunks.broken = True
    _deliver(core, issue("digits:2.0.0"))  # retrying, then refused at fetch
    chunks.broken = False
    _deliver(core, b'{"signed": {"version": ')  # refused at accept, no release
    _device(state, repo, chunks, reporter).start()  # a restart: started, serving
    active = core.store.active()
    assert active is not None
    (core.store.model_path(active.folder) / "model.onnx").write_bytes(b"not a model")
    (state / "director.json").write_text("garbage")
    _device(state, repo, chunks, reporter).start()  # load-failed, an error state, an error event

    assert all(type(kind) is EventKind for kind in reporter.kinds_passed), reporter.kinds_passed
    assert all(type(status) is DeviceStatus for status in reporter.statuses_passed), reporter.statuses_passed
    kinds = [e.event for e in reporter.events]
    assert all(isinstance(kind, EventKind) for kind in kinds)  # the server reads each as known
    assert set(kinds) == set(EventKind), set(EventKind) - set(kinds)  # and no kind goes unexercised
    refusals = [(e.release, e.step) for e in reporter.events if e.event is EventKind.REFUSED]
    assert refusals == [
        ("digits:3.0.0", InstallStep.SELF_TEST),
        ("digits:2.0.0", InstallStep.VERIFY),
        ("digits:2.0.0", InstallStep.FETCH),
        (None, InstallStep.ACCEPT),
    ]
    statuses = [s.status for s in reporter.states]
    assert all(isinstance(status, DeviceStatus) for status in statuses)
    # every status the device reports itself; NEW is the registry's, OFFLINE the broker's will
    assert set(statuses) == set(DeviceStatus) - {DeviceStatus.NEW, DeviceStatus.OFFLINE}
    assert statuses[-1] is DeviceStatus.ERROR

    # the bytes read as the previous release's did (a missing field reads as null)
    assert [e.model_dump(exclude_none=True) for e in reporter.events] == [
        e.model_dump(exclude_none=True) for e in reporter.previous_events
    ]
    # the same but for the state's time, which this release adds (replicas order states by it)
    assert [s.model_dump(exclude={"at"}) for s in reporter.states] == [
        s.model_dump(exclude={"at"}) for s in reporter.previous_states
    ]
    assert all(s.at for s in reporter.states)
    assert all(s.at is None for s in reporter.previous_states)
    committed = next(e for e in reporter.events if e.event is EventKind.COMMITTED)
    assert committed.model_extra
    assert committed.model_extra["requests"] >= 5


def test_the_offline_will_is_a_device_state_the_previous_release_wrote_the_same():
    will = parse_report("state", offline_state().encode(), LIMITS)
    previous = parse_report("state", json.dumps({"status": "offline", "installed": None}).encode(), LIMITS)
    assert isinstance(will, DeviceState)
    assert will.status is DeviceStatus.OFFLINE
    assert will.model_dump() == previous.model_dump()
    assert json.loads(offline_state()) == {"status": "offline"}
