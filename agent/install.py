"""The install pipeline: one function per step, in the order the journal enforces.

::

    accept the director document → verify against the image repository → fetch (resumable)
      → stage (check the bundle) → load a new session → self-test on golden.npz → warm up
      → swap (in-flight requests finish on the old model) → probation → commit, or roll back

A document with action ``shadow`` stops after the warm-up: the candidate runs beside the
serving model on a sampled share of live requests, off the request path (``agent.shadow``),
for the time or request count the document gives; the figures are reported (``shadowed``)
and the candidate is closed, its files kept under models/ so that the install that may
follow (the server's verdict on the wave) loads them without a download.

Each step that must survive a restart is recorded in ``install.json`` before the next
begins; after ``kill -9`` the agent serves the committed model (``active.json``) and resumes
the install from the last recorded step (a download carries on from its last good chunk;
a staged bundle is loaded and tested again). Refusals (bad signatures, tampered bytes, a
failed self-test or probation) are final for that document and reported; transport failures
are retried with backoff, then abandoned.
"""

from __future__ import annotations

import datetime as dt
import enum
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from agent._delivery import already_installed, bundle_path, stage, verify
from agent._install_parts import (
    InstallSettingsView,
    ProbationMonitor,
    Refused,
    Reporter,
    check_names,
    watch_probation,
)
from agent._shadow_step import ShadowSkipped, shadow_candidate, skip_reason
from agent.delta import InstalledChunks, download_for
from agent.director import DirectorState
from agent.memory import fit_refusal
from agent.mqtt_fetch import ChunkSource
from agent.shadow import ShadowFigures, ShadowTap
from agent.slot import LoadedModel, ModelSlot
from agent.store import ActivePointer, InstallJournal, StateStore
from agent.trust import TrustedRepository
from edgec.director import Action, DirectorDocument, SignedDirectorDocument
from edgec.errors import (
    BundleError,
    EdgecError,
    FetchError,
    InvalidNameError,
    NewerSchemaError,
    PathOutsideRootError,
    TrustError,
)
from edgec.names import resolve_inside
from edgec.reports import DeviceStatus, EventKind, InstallStep

__all__ = ["InstallSettingsView", "Installer", "ProbationMonitor", "Reporter", "Step"]

logger = logging.getLogger(__name__)


class Step(enum.IntEnum):
    ACCEPTED = 1  # director document: signature, device, version, expiry, profile
    VERIFIED = 2  # the image repository signs the same files (TUF refresh, hashes, lengths, profile)
    FETCHED = 3  # every file downloaded into staging and checked chunk by chunk
    STAGED = 4  # the bundle checked against its manifest and moved under models/
    LOADED = 5
    SELF_TESTED = 6
    WARMED = 7
    SWAPPED = 8  # serving, on probation
    COMMITTED = 9


# where a transport-level refusal happened, by the step that was under way
_REFUSED_AT = {
    Step.VERIFIED: InstallStep.VERIFY,
    Step.FETCHED: InstallStep.FETCH,
    Step.STAGED: InstallStep.STAGE,
}


class _Stopping(EdgecError):
    """The agent is stopping in the middle of an install; its journal resumes it."""


class Installer:
    def __init__(
        self,
        *,
        settings: InstallSettingsView,
        store: StateStore,
        slot: ModelSlot,
        director: DirectorState | None,  # None: the trusted state is unreadable; installs are refused
        repository: TrustedRepository,
        chunks: ChunkSource,
        reporter: Reporter,
        loader: Callable[[Path], LoadedModel],
        self_test: Callable[[Any, Path], Any],  # agent.runtime.self_test
        golden_inputs: Callable[[Any, Path], list[dict[str, np.ndarray]]],  # for warm-up and probes
        probation: ProbationMonitor,
        shadow: ShadowTap | None = None,  # where a shadow run is fed live requests; None: no shadows
        now: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.settings = settings
        self.store = store
        self.slot = slot
        self.director = director
        self.repository = repository
        self.chunks = chunks
        self.reporter = reporter
        self.loader = loader
        self.self_test_fn = self_test
        self.golden_inputs = golden_inputs
        self.probation_monitor = probation
        self.shadow_tap = shadow
        self.now = now
        self.sleep = sleep
        self.director_path = store.root / "director.json"
        self.interrupted = threading.Event()  # a newer document arrived: stop retrying this one
        self._running_version: int | None = None  # the document the install under way came from
        self.stopping = threading.Event()  # the agent is shutting down: leave the install for later

    # -- start-up ---------------------------------------------------------------------------
    def start_serving(self) -> None:
        """Load the committed model (if any) into the slot."""
        pointer = self.store.active()
        if pointer is None:
            self.reporter.state(DeviceStatus.IDLE, None, "no model installed yet")
            return
        try:
            model = self.loader(self.store.model_path(pointer.folder))
        except Exception as e:  # damaged on disk: keep running, wait for the operator
            logger.exception("cannot load the committed model %s", pointer.release)
            self.reporter.event(EventKind.LOAD_FAILED, pointer.release, str(e))
            self.reporter.state(
                DeviceStatus.ERROR, None, f"committed model {pointer.release} does not load: {e}"
            )
            return
        self.slot.swap(model)
        self.reporter.event(EventKind.STARTED, pointer.release, "serving the committed model")
        self.reporter.state(DeviceStatus.SERVING, pointer.release)

    def resume(self) -> None:
        """Carry on with an install a restart interrupted (its document was accepted before)."""
        journal = self.store.journal()
        envelope = self._stored_envelope()
        if journal is None or envelope is None:
            return
        if envelope.signed.version != journal.document_version:
            self.store.set_journal(None)
            return
        logger.info("resuming the install of %s after step %s", journal.release, Step(journal.step).name)
        self._run(envelope.signed, journal)

    def _stored_envelope(self) -> SignedDirectorDocument | None:
        """The document accepted last (``document.json``), or None if there is none or an older
        agent stored one this one refuses."""
        stored = self.store.document()
        if stored is None:
            return None
        try:
            return SignedDirectorDocument.model_validate(stored)
        except (ValueError, NewerSchemaError) as e:  # pydantic's ValidationError; a newer agent's
            logger.error("the stored director document is invalid, ignoring it: %s", str(e).splitlines()[0])
            return None

    # -- entry point ------------------------------------------------------------------------
    def handle(self, envelope: SignedDirectorDocument) -> None:
        """Act on a director document from the desired topic."""
        doc = envelope.signed
        try:
            check_names(doc)
        except InvalidNameError as e:
            logger.warning("director document refused: %s", e)
            self.reporter.event(EventKind.REFUSED, None, f"director document: {e}", step=InstallStep.ACCEPT)
            return
        if self.director is None:
            detail = "the trusted director state is unreadable; re-provision the device to install again"
            self.reporter.event(EventKind.REFUSED, doc.release, detail, step=InstallStep.ACCEPT)
            return
        if doc.version == self.director.version and self._stored_envelope() == envelope:
            # the retained copy of the document already accepted (a reconnect or a restart)
            journal = self.store.journal()
            if journal is None and self.store.outcome(doc.version) is None:
                # killed between accepting the document and writing its journal: start it again
                journal = InstallJournal(doc.version, doc.release, int(Step.ACCEPTED))
                try:
                    self.store.set_journal(journal)
                except OSError as e:
                    self._stopped(doc, e)
                    return
            if journal is not None and journal.document_version == doc.version:
                self._run(doc, journal)
            return
        try:
            self.director, doc = self.director.accept(envelope, self.now())
        except TrustError as e:
            logger.warning("director document refused: %s", e)
            self.reporter.event(EventKind.REFUSED, doc.release, str(e), step=InstallStep.ACCEPT)
            return
        # the document first, then the version: a crash between leaves a document that is
        # accepted again, never one that looks like a replay of itself
        journal = InstallJournal(doc.version, doc.release, int(Step.ACCEPTED))
        try:
            self.store.set_document(envelope.wire_data())  # `signed` as received: it verifies again
            self.director.save(self.director_path)
            self.store.set_journal(journal)
        except OSError as e:
            self._stopped(doc, e)
            return
        self.reporter.event(
            EventKind.ACCEPTED, doc.release, f"director document {doc.version} ({doc.action})"
        )
        self._run(doc, journal)

    # -- the pipeline ---------------------------------------------------------------------------
    def _advance(self, journal: InstallJournal, step: Step, **changes: Any) -> InstallJournal:
        # one skip is allowed: a release already installed (a rollback) goes from VERIFIED to STAGED
        if step != Step(journal.step) + 1 and not (step == Step.STAGED and journal.step == Step.VERIFIED):
            raise RuntimeError(f"install step {step.name} after {Step(journal.step).name}")
        journal = replace(journal, step=int(step), **changes)
        if step <= Step.STAGED:  # later steps live in memory; a restart redoes them from STAGED
            self.store.set_journal(journal)
        return journal

    def superseded_by(self, envelope: SignedDirectorDocument) -> bool:
        """Whether ``envelope`` should stop the install under way: only a newer document does.
        The retained copy of the running one comes again on every reconnect (right after a
        restart that resumed it, too), and an older one is a replay that ``handle`` refuses."""
        running = self._running_version
        return running is None or envelope.signed.version > running

    def _run(self, doc: DirectorDocument, journal: InstallJournal) -> None:
        self._running_version = doc.version
        try:
            self._run_pipeline(doc, journal)
        finally:
            self._running_version = None

    def _run_pipeline(self, doc: DirectorDocument, journal: InstallJournal) -> None:
        self.interrupted.clear()
        active = self.store.active()
        installed = active.release if active else None
        self.reporter.state(DeviceStatus.INSTALLING, installed, doc.release)
        try:
            journal = self._deliver(doc, journal)
            assert journal.folder is not None
            try:
                folder = self.store.model_path(journal.folder)
            except PathOutsideRootError as e:
                raise Refused(InstallStep.LOAD, str(e)) from e
            self._activate(doc, journal, folder)
        except Refused as e:
            self._refuse(doc, e)
        except ShadowSkipped as e:
            self.reporter.event(EventKind.SHADOWED, doc.release, f"skipped: {e}", skipped=True)
            self._shadowed(doc)
        except OSError as e:
            self._stopped(doc, e)
        except _Stopping:
            logger.info("install of %s left for the next start", doc.release)

    def _stopped(self, doc: DirectorDocument, error: OSError) -> None:
        """Disk full, permissions: the committed model keeps serving; the journal (if it was
        written) lets the install carry on after a restart."""
        logger.error("install of %s stopped: %s", doc.release, error)
        active = self.store.active()
        installed = active.release if active else None
        self.reporter.event(EventKind.ERROR, doc.release, f"cannot write the agent's state: {error}")
        status = DeviceStatus.SERVING if self.slot.model else DeviceStatus.ERROR
        self.reporter.state(status, installed, f"install stopped: {error}")

    def _deliver(self, doc: DirectorDocument, journal: InstallJournal) -> InstallJournal:
        """verify → fetch → stage, retrying transport failures with backoff."""
        if journal.step >= Step.STAGED:
            return journal
        attempts = journal.attempts
        while True:
            try:
                journal = replace(journal, step=int(Step.ACCEPTED))
                infos = verify(self.repository, doc, self.settings.max_target_bytes)
                journal = self._advance(journal, Step.VERIFIED)
                too_big = fit_refusal(doc.release, infos, self.settings)  # before any byte is fetched
                if too_big:
                    raise Refused(InstallStep.FIT, too_big)
                if doc.action is Action.SHADOW and (
                    skip := skip_reason(infos, self.slot.model, self.settings)
                ):
                    raise ShadowSkipped(skip)
                if already_installed(self.store, doc):
                    folder = self.store.folder_name(doc.release)
                    return self._advance(journal, Step.STAGED, folder=folder)
                self.fetch(doc, infos)
                journal = self._advance(journal, Step.FETCHED)
                folder = stage(self.store, doc)
                return self._advance(journal, Step.STAGED, folder=folder)
            except TrustError as e:
                raise Refused(_REFUSED_AT[Step(journal.step + 1)], str(e)) from e
            except BundleError as e:
                raise Refused(InstallStep.STAGE, str(e)) from e
            except (PathOutsideRootError, InvalidNameError) as e:  # a path that would leave the state folder
                raise Refused(_REFUSED_AT[Step(journal.step + 1)], str(e)) from e
            except FetchError as e:
                attempts += 1
                journal = replace(journal, attempts=attempts)
                self.store.set_journal(journal)
                if attempts >= self.settings.max_attempts:
                    raise Refused(InstallStep.FETCH, f"gave up after {attempts} attempts: {e}") from e
                delay = min(2.0**attempts, 60.0)
                self.reporter.event(EventKind.RETRYING, doc.release, str(e), attempt=attempts, delay_s=delay)
                if self.interrupted.wait(delay):
                    if self.stopping.is_set():
                        raise _Stopping from e  # the journal stays: a restart carries on
                    raise Refused(InstallStep.FETCH, "a newer director document arrived") from e

    def fetch(self, doc: DirectorDocument, infos: dict[str, Any]) -> None:
        """Every file into staging, each chunk checked against the signed chunk hashes; with
        content-defined chunk tables, the chunks the installed releases hold are copied from
        them (``agent.delta``) and only the others downloaded."""
        staging = self.store.staging_folder(doc.release)
        installed = InstalledChunks(self.store)
        tables: dict[str, Any] = {}  # this release's signed chunk tables, kept for the next one
        for index, file in enumerate(doc.files, 1):
            relative = bundle_path(doc, file.path)
            dest = resolve_inside(staging, relative)
            dest.parent.mkdir(parents=True, exist_ok=True)
            info = infos[file.path]
            custom = info.unrecognized_fields.get("custom", {}).get("edgec", {})
            if "cdc" in custom:
                tables[relative] = custom["cdc"]
            if dest.is_file() and dest.stat().st_size == file.length:
                continue  # fetched before a restart (checked when it was assembled)
            if "chunks" not in custom:
                raise TrustError(f"{file.path} has no signed chunk hashes", "targets")
            folder, _, name = file.path.rpartition("/")
            stored = f"targets/{folder}/{file.sha256}.{name}" if folder else f"targets/{file.sha256}.{name}"
            download = download_for(
                self.chunks,
                stored,
                dest,
                custom=custom,
                length=file.length,
                sha256=file.sha256,
                installed=installed,
            )
            resumed = download.good_bytes()
            download.run()
            self.reporter.event(
                EventKind.FETCHED,
                doc.release,
                relative,
                file=index,
                of=len(doc.files),
                bytes=file.length,
                resumed_at=resumed,
                fetched_bytes=download.fetched_bytes,
                reused_bytes=download.reused_bytes,
            )
        installed.record(doc.release, tables)

    def _activate(self, doc: DirectorDocument, journal: InstallJournal, folder: Path) -> None:
        """load → self-test → warm up → swap → probation → commit (or roll back)."""
        try:
            model = self.loader(folder)
        except Exception as e:
            raise Refused(InstallStep.LOAD, str(e)) from e
        journal = self._advance(journal, Step.LOADED)
        result = self.self_test_fn(model, folder / "golden.npz")
        if not result.passed:
            model.close()
            raise Refused(InstallStep.SELF_TEST, str(result.reason))
        journal = self._advance(journal, Step.SELF_TESTED)
        samples = self.golden_inputs(model, folder / "golden.npz")
        for i in range(self.settings.warmup_runs):
            model.infer(samples[i % len(samples)])
        journal = self._advance(journal, Step.WARMED)
        if doc.action is Action.SHADOW:
            try:
                self.run_shadow(doc, model)
            finally:
                model.close()
            self._shadowed(doc)
            return
        self.probation_monitor.watch(model.manifest.version)
        self.slot.swap(model)
        journal = self._advance(journal, Step.SWAPPED)
        self.reporter.event(EventKind.SWAPPED, doc.release, "serving on probation")
        try:
            figures = watch_probation(model, samples, self.settings, self.probation_monitor, self.sleep)
        except Refused:
            self._restore_committed()
            raise
        finally:
            self.probation_monitor.watch(None)
        self.commit(doc, folder)
        self.reporter.event(EventKind.COMMITTED, doc.release, None, **figures)

    def run_shadow(self, doc: DirectorDocument, candidate: LoadedModel) -> ShadowFigures:
        """``candidate`` in shadow of the serving model (``agent._shadow_step``); a stop of
        the agent leaves it to the journal, which runs it again after the restart."""
        figures = shadow_candidate(
            doc,
            candidate,
            serving=self.slot.model,
            tap=self.shadow_tap,
            settings=self.settings,
            reporter=self.reporter,
            stop=self.interrupted,
        )
        if self.stopping.is_set():
            raise _Stopping
        return figures

    def _shadowed(self, doc: DirectorDocument) -> None:
        """The shadow run of ``doc`` is over: its files stay installed for the install that may
        follow; the committed model serves on."""
        self.store.set_outcome(doc.version, "shadowed")
        self.store.set_journal(None)
        active = self.store.active()
        installed = active.release if active else None
        status = DeviceStatus.SERVING if self.slot.model else DeviceStatus.IDLE
        self.reporter.state(status, installed, f"{doc.release} ran in shadow")

    def commit(self, doc: DirectorDocument, folder: Path) -> None:
        previous = self.store.active()
        pointer = ActivePointer(
            release=doc.release,
            folder=folder.name,
            previous_release=previous.release if previous and previous.release != doc.release else None,
            previous_folder=previous.folder if previous and previous.release != doc.release else None,
        )
        self.store.set_active(pointer)  # the commit point
        self.store.set_outcome(doc.version, "committed")
        self.store.set_journal(None)
        self.store.prune(keep={p for p in (pointer.folder, pointer.previous_folder) if p})
        self.reporter.state(DeviceStatus.SERVING, doc.release)

    def _restore_committed(self) -> None:
        """Put the committed model back in the slot (the one on probation failed)."""
        pointer = self.store.active()
        if pointer is None:
            self.slot.clear()
            return
        self.slot.swap(self.loader(self.store.model_path(pointer.folder)))

    def _refuse(self, doc: DirectorDocument, error: Refused) -> None:
        logger.warning("install of %s refused at %s: %s", doc.release, error.step, error.reason)
        self.store.set_outcome(doc.version, f"refused at {error.step}: {error.reason}")
        self.store.set_journal(None)
        self.store.discard("staging", self.store.folder_name(doc.release))
        active = self.store.active()
        keep = {p for p in (active.folder, active.previous_folder) if p} if active else set()
        self.store.prune(keep=keep)
        self.reporter.event(EventKind.REFUSED, doc.release, error.reason, step=error.step)
        installed = active.release if active else None
        self.reporter.state(
            DeviceStatus.SERVING if self.slot.model else DeviceStatus.IDLE,
            installed,
            f"{doc.release} refused: {error.reason}",
        )
