"""The agent's state folder: every write atomic, the active model a pointer.

::

    state_dir/
      metadata/            trusted TUF metadata (python-tuf writes it atomically)
      director.json        the highest director document version accepted (DirectorState)
      document.json        that document itself, so its retained copy is recognised after a restart
      models/<name>-<version>/   installed bundles, verified file by file
      staging/<name>-<version>/  downloads in progress (``*.partial`` files resume)
      active.json          pointer: the committed release and the previous one
      install.json         the install in progress: document version, release, step, attempts
      outcomes.json        releases whose install ended (committed, rolled back, refused) per document
      telemetry/           telemetry windows waiting for the broker

A crash at any instant leaves either the old or the new content of every file, never a mix;
the model that serves after a restart is the one ``active.json`` names.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from agent._atomic import atomic_write

__all__ = ["ActivePointer", "InstallJournal", "StateStore"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ActivePointer:
    release: str  # NAME:VERSION
    folder: str  # under models/
    previous_release: str | None = None
    previous_folder: str | None = None


@dataclass(frozen=True)
class InstallJournal:
    document_version: int
    release: str
    step: int  # the last step completed (an agent.install.Step)
    attempts: int = 0
    folder: str | None = None  # under models/, once staged


class StateStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.models = root / "models"
        self.staging = root / "staging"
        self.telemetry = root / "telemetry"
        for folder in (root, self.models, self.staging, self.telemetry):
            folder.mkdir(parents=True, exist_ok=True)

    # -- JSON files -------------------------------------------------------------------------
    def _read(self, name: str) -> Any:
        path = self.root / name
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            # a torn write cannot happen (atomic_write); this is damage from outside
            logger.error("state file %s is unreadable (%s); ignoring it", path, e)
            return None

    def _write(self, name: str, value: Any) -> None:
        atomic_write(self.root / name, json.dumps(value, indent=1, sort_keys=True).encode())

    def _remove(self, name: str) -> None:
        (self.root / name).unlink(missing_ok=True)

    # -- the active model -------------------------------------------------------------------
    def active(self) -> ActivePointer | None:
        data = self._read("active.json")
        return ActivePointer(**data) if data else None

    def set_active(self, pointer: ActivePointer) -> None:
        self._write("active.json", asdict(pointer))

    # -- the install in progress ------------------------------------------------------------
    def journal(self) -> InstallJournal | None:
        data = self._read("install.json")
        return InstallJournal(**data) if data else None

    def set_journal(self, journal: InstallJournal | None) -> None:
        if journal is None:
            self._remove("install.json")
        else:
            self._write("install.json", asdict(journal))

    # -- the accepted director document and what became of it ----------------------------------
    def document(self) -> dict[str, Any] | None:
        value = self._read("document.json")
        return value if isinstance(value, dict) else None

    def set_document(self, document: dict[str, Any]) -> None:
        self._write("document.json", document)

    def outcome(self, document_version: int) -> str | None:
        outcomes = self._read("outcomes.json") or {}
        value = outcomes.get(str(document_version))
        return str(value) if value is not None else None

    def set_outcome(self, document_version: int, outcome: str) -> None:
        outcomes = self._read("outcomes.json") or {}
        outcomes[str(document_version)] = outcome
        recent = dict(sorted(outcomes.items(), key=lambda kv: int(kv[0]))[-50:])  # bounded
        self._write("outcomes.json", recent)

    # -- folders ----------------------------------------------------------------------------
    @staticmethod
    def folder_name(release: str) -> str:
        name, _, version = release.partition(":")
        return f"{name}-{version}"

    def staging_folder(self, release: str) -> Path:
        return self.staging / self.folder_name(release)

    def model_folder(self, release: str) -> Path:
        return self.models / self.folder_name(release)

    def prune(self, keep: set[str]) -> None:
        """Remove installed models not in ``keep`` (folder names) and stale staging folders."""
        for folder in self.models.iterdir():
            if folder.name not in keep:
                shutil.rmtree(folder, ignore_errors=True)
        journal = self.journal()
        current = self.folder_name(journal.release) if journal else None
        for folder in self.staging.iterdir():
            if folder.name != current:
                shutil.rmtree(folder, ignore_errors=True)
