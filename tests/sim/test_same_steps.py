"""A simulated device runs the agent's own device core: given the same signed director
documents as a real agent (``agent.daemon``'s core with the real runtime), it goes through
the same install steps and reports the same events and states. Only the runtime differs,
and the simulated one is told to fail the self-test where the real one fails it.

Both devices read one signed repository from its folder (python-tuf verifies it) and the
documents arrive as bytes, as from the desired topic, through ``DeviceCore.on_desired``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from agent.config import InstallSettings
from agent.daemon import real_runtime
from agent.device import DeviceCore, DeviceIdentity, Runtime, parse_director_key
from agent.trust import FolderFetcher
from edgec.director import Action, SignedDirectorDocument
from ota_server.director import DirectorIssuer, release_files
from ota_server.registry import Registry
from ota_server.repository import ImageRepository
from sim.behaviour import SimBehaviours
from sim.runtime import sim_runtime
from tests.agent.test_install import FolderChunks

PASS = b"same steps"
PROFILE = "x86-64-cpu"
DEVICE = "pi-1"


class Journal:
    """What a device reports, without the times and figures that differ between runtimes."""

    def __init__(self) -> None:
        self.reports: list[tuple[Any, ...]] = []

    def event(self, kind: str, release: str | None, detail: str | None = None, **figures: Any) -> None:
        where = figures.get("step", figures.get("file"))  # the failed step; the fetched file
        self.reports.append(("event", kind, release, where))

    def state(self, status: str, installed: str | None, detail: str | None = None) -> None:
        self.reports.append(("state", status, installed))

    def events(self, leave_out: str = "fetched") -> list[tuple[Any, ...]]:
        return [r[1:] for r in self.reports if r[0] == "event" and r[1] != leave_out]


@pytest.fixture
def repo(tmp_path, releases) -> ImageRepository:
    repo = ImageRepository.init(tmp_path / "repo", PASS, {}, keys=tmp_path / "keys")
    repo.publish([releases[v] for v in ("1.0.0", "2.0.0", "3.0.0")], PASS)
    return repo


def _documents(repo: ImageRepository, tmp_path: Path) -> list[bytes]:
    """The day's documents, as the desired topic carries them: installs, a failing release,
    a replay of an old document, garbage, and an operator's rollback."""
    issuer = DirectorIssuer(Registry.open(f"sqlite:///{tmp_path / 'fleet.db'}"), repo.director_signer(PASS))
    targets = repo.load("targets").signed.targets

    def issue(release: str, action: Action = Action.INSTALL) -> SignedDirectorDocument:
        files = release_files(targets, release, PROFILE)
        return issuer.issue(
            fleet="lab",
            device=DEVICE,
            profile=PROFILE,
            rollout="r1",
            action=action,
            release=release,
            files=files,
        )

    first = issue("digits:1.0.0")
    signed = [
        first,
        issue("digits:2.0.0"),
        issue("digits:3.0.0"),
        first,
        issue("digits:1.0.0", Action.ROLLBACK),
    ]
    wire = [json.dumps(envelope.wire_data()).encode() for envelope in signed]
    return [*wire[:4], b'{"signed": {"version": ', wire[4]]


def _device(state: Path, repo: ImageRepository, runtime: Runtime) -> tuple[DeviceCore, Journal]:
    root, director_key = repo.provisioning()
    journal = Journal()
    core = DeviceCore(
        state,
        DeviceIdentity(DEVICE, PROFILE, root, parse_director_key(director_key)),
        settings=InstallSettings(probation_s=0.2, probation_min_requests=5, warmup_runs=1),
        fetcher=FolderFetcher(repo.folder),
        chunks=FolderChunks(repo.folder),
        reporter=journal,
        runtime=runtime,
        url_prefix="edgec-folder:",  # FolderFetcher's
    )
    return core, journal


def _run(core: DeviceCore, payloads: list[bytes]) -> None:
    core.start()
    for payload in payloads:
        core.on_desired(payload)
        envelope = core.take_desired()
        if envelope is not None:
            core.install(envelope)


def test_a_simulated_device_takes_the_real_agents_install_steps_and_reports_the_same_events(tmp_path, repo):
    payloads = _documents(repo, tmp_path)
    real, real_journal = _device(tmp_path / "real", repo, real_runtime(threads=1))
    behaviours = SimBehaviours({"3.0.0": {"self_test": "fail"}})  # the real 3.0.0's golden file is wrong
    simulated, sim_journal = _device(tmp_path / "sim", repo, sim_runtime(behaviours))

    _run(real, payloads)
    _run(simulated, payloads)

    assert real_journal.events() == [
        ("accepted", "digits:1.0.0", None),
        ("swapped", "digits:1.0.0", None),
        ("committed", "digits:1.0.0", None),
        ("accepted", "digits:2.0.0", None),
        ("swapped", "digits:2.0.0", None),
        ("committed", "digits:2.0.0", None),
        ("accepted", "digits:3.0.0", None),
        ("refused", "digits:3.0.0", "self-test"),
        ("refused", "digits:1.0.0", "accept"),  # the replayed first document
        ("refused", None, "accept"),  # the garbage never reaches the installer
        ("accepted", "digits:1.0.0", None),  # the operator's rollback
        ("swapped", "digits:1.0.0", None),
        ("committed", "digits:1.0.0", None),
    ]
    assert [e for e in real_journal.events(leave_out="") if e[0] == "fetched"][:2] == [
        ("fetched", "digits:1.0.0", 1),
        ("fetched", "digits:1.0.0", 2),
    ]
    assert sim_journal.reports == real_journal.reports  # events and states, in the same order
    for core in (real, simulated):
        assert core.store.active().release == "digits:1.0.0"
        assert core.store.journal() is None
        assert core.slot.model is not None
        assert core.slot.model.manifest.version == "1.0.0"
