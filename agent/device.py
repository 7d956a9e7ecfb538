"""One device's core: the wiring that the daemon and the fleet simulator share.

Given a state folder, the device's identity and trust, a fetcher, a reporter and a runtime,
``DeviceCore`` owns the state store, the trusted metadata (provisioned from the root on first
start), the director state, the model slot and the installer, and it handles a desired-state
document from the bytes that arrive to the installer: parse (bounded), refuse and report
what cannot be read, keep the newest, interrupt the install it replaces.

What it leaves to its host: the process and its threads, the MQTT client (or the simulator's
network loop), the serving, and the runtime that loads and runs models (``agent.daemon`` the
real one, ``sim`` a stand-in). The host reads the newest document with ``take_desired`` under
``work`` and hands it to ``install``.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from securesystemslib.signer import Key, SSlibKey
from tuf.ngclient import FetcherInterface

from agent.config import InstallSettings
from agent.director import DirectorState
from agent.install import Installer, ProbationMonitor, Reporter
from agent.mqtt_fetch import SCHEME, ChunkSource
from agent.shadow import ShadowTap
from agent.slot import LoadedModel, ModelSlot
from agent.store import StateStore
from agent.trust import TrustedRepository
from edgec.director import SignedDirectorDocument, parse_signed_document
from edgec.errors import NewerSchemaError, TrustError
from edgec.reports import EventKind, InstallStep

__all__ = ["DeviceCore", "DeviceIdentity", "Runtime", "parse_director_key"]

logger = logging.getLogger(__name__)


def _plain_probation(_slot: ModelSlot) -> ProbationMonitor:
    return ProbationMonitor()


@dataclass(frozen=True)
class Runtime:
    """How a device runs models: the hooks the install pipeline calls, and the probation
    monitor it judges a new model with (built for the device's slot)."""

    load: Callable[[Path], LoadedModel]
    self_test: Callable[[Any, Path], Any]  # agent.runtime.self_test
    golden_inputs: Callable[[Any, Path], list[dict[str, np.ndarray]]]  # warm-up and probes
    probation: Callable[[ModelSlot], ProbationMonitor] = field(default=_plain_probation)


@dataclass(frozen=True)
class DeviceIdentity:
    """Who the device is and whom it trusts: the image repository's root it was provisioned
    with (JSON text) and the director's public key."""

    device: str
    profile: str
    trust_root: str
    director_key: Key


def parse_director_key(text: str) -> SSlibKey:
    """The director's public key as provisioning writes it (securesystemslib JSON + keyid)."""
    data = json.loads(text)
    keyid = data.pop("keyid")
    return SSlibKey.from_dict(keyid, data)


class DeviceCore:
    """The store, trust, director state, slot and installer of one device, and the handling
    of its desired-state documents."""

    def __init__(
        self,
        state_dir: Path,
        identity: DeviceIdentity,
        *,
        settings: InstallSettings,
        fetcher: FetcherInterface,
        chunks: ChunkSource,
        reporter: Reporter,
        runtime: Runtime,
        url_prefix: str = SCHEME,
        on_work: Callable[[], None] | None = None,
    ) -> None:
        """``on_work`` is called (under ``work``) when a new document is waiting."""
        self.device = identity.device
        self.reporter = reporter
        self.store = StateStore(state_dir)
        if not (state_dir / "metadata" / "root.json").exists():
            TrustedRepository.provision(state_dir, identity.trust_root.encode())
        repository = TrustedRepository(state_dir, fetcher, settings.max_target_bytes, url_prefix)
        self.startup_problem: str | None = None
        director: DirectorState | None = None
        try:
            director = DirectorState.load(
                state_dir / "director.json", identity.director_key, identity.device, identity.profile
            )
        except TrustError as e:  # keep serving what is committed; refuse installs, say why
            logger.error("%s: %s", identity.device, e)
            self.startup_problem = str(e)
        self.slot = ModelSlot()
        self.probation = runtime.probation(self.slot)
        self.shadow = ShadowTap()  # the serving callback feeds it; a shadow document's run listens
        self.installer = Installer(
            settings=settings,
            store=self.store,
            slot=self.slot,
            director=director,
            repository=repository,
            chunks=chunks,
            reporter=reporter,
            loader=runtime.load,
            self_test=runtime.self_test,
            golden_inputs=runtime.golden_inputs,
            probation=self.probation,
            shadow=self.shadow,
        )
        self.work = threading.Condition()  # guards the waiting document
        self._desired: SignedDirectorDocument | None = None
        self._on_work = on_work

    def start(self) -> None:
        """Serve the committed model; report a trust state that could not be read."""
        self.installer.start_serving()
        if self.startup_problem:
            self.reporter.event(EventKind.ERROR, None, self.startup_problem)

    # -- desired-state documents ------------------------------------------------------------
    def on_desired(self, payload: bytes | bytearray) -> None:
        """A document from the desired topic: the newest readable one waits for ``install``."""
        if not payload:
            return  # a cleared retained message
        try:
            envelope = parse_signed_document(payload)  # bounded, every name checked
        except TrustError as e:
            logger.warning("%s: dropped a director document: %s", self.device, e)
            release = e.release if isinstance(e, NewerSchemaError) else None  # settles its rollout
            self.reporter.event(EventKind.REFUSED, release, str(e), step=InstallStep.ACCEPT)
            return
        with self.work:
            self._desired = envelope  # the newest wins
            if self.installer.superseded_by(envelope):
                self.installer.interrupted.set()
            if self._on_work is not None:
                self._on_work()
            self.work.notify_all()

    def take_desired(self) -> SignedDirectorDocument | None:
        """The waiting document, if any, which no longer waits."""
        with self.work:
            envelope, self._desired = self._desired, None
            return envelope

    # -- installs ---------------------------------------------------------------------------
    def resume(self) -> None:
        """Continue an install a stop or a crash interrupted (its journal says where)."""
        try:
            self.installer.resume()
        except Exception:
            logger.exception("%s: resuming the interrupted install failed", self.device)

    def install(self, envelope: SignedDirectorDocument) -> None:
        """Run the install pipeline on one document; an unexpected failure is reported."""
        try:
            self.installer.handle(envelope)
        except Exception as e:  # disk full, permissions: report, keep serving
            logger.exception("%s: install failed", self.device)
            self.reporter.event(EventKind.ERROR, envelope.signed.release, f"{type(e).__name__}: {e}")

    def stop(self) -> None:
        """Leave a running install to its journal and wake whoever waits for work."""
        self.installer.stopping.set()
        self.installer.interrupted.set()
        with self.work:
            self.work.notify_all()
