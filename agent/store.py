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
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from edgec._atomic import atomic_write, fsync_path
from edgec.errors import PathOutsideRootError
from edgec.names import parse_release, remove_inside, resolve_inside

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
    # Folder names come from director documents (remote input): a release is a checked name,
    # and every path is resolved inside its area of the state folder (``models``, ``staging``,
    # themselves inside the state folder) before anything is written, renamed or deleted.
    @staticmethod
    def folder_name(release: str) -> str:
        """``NAME-VERSION`` for ``NAME:VERSION``; ``InvalidNameError`` for an unsafe release."""
        name, version = parse_release(release)
        return f"{name}-{version}"

    def _area(self, area: str, folder: str) -> Path:
        """``area`` (``models`` or ``staging``) resolved inside the state folder, for ``folder``,
        which must be one path component; else ``PathOutsideRootError``."""
        if "/" in folder or folder in ("", ".", ".."):
            raise PathOutsideRootError(f"{folder!r} is not a folder name under {area}/")
        return resolve_inside(self.root, area)

    def _inside(self, area: str, folder: str) -> Path:
        """``area/folder`` resolved (symlinks followed), inside ``area`` inside the state folder."""
        return resolve_inside(self._area(area, folder), folder)

    def staging_folder(self, release: str) -> Path:
        """``staging/NAME-VERSION``, resolved inside the state folder."""
        return self._inside("staging", self.folder_name(release))

    def model_folder(self, release: str) -> Path:
        """``models/NAME-VERSION``, resolved inside the state folder."""
        return self._inside("models", self.folder_name(release))

    def model_path(self, folder: str) -> Path:
        """``models/FOLDER`` for a folder name the state recorded (``active.json``, ``install.json``)."""
        return self._inside("models", folder)

    def move_to_models(self, release: str) -> Path:
        """Move the staged bundle of ``release`` to ``models/NAME-VERSION``, replacing what is
        there (a symlink there is removed, never followed)."""
        folder = self.folder_name(release)
        staging = self._inside("staging", folder)
        models = self._area("models", folder)
        remove_inside(models, folder)
        staging.rename(models / folder)
        fsync_path(models)  # the rename is durable before the journal says STAGED
        return models / folder

    def discard(self, area: str, folder: str) -> None:
        """Delete ``area/folder`` (``models`` or ``staging``), best effort: never anything
        outside the state folder, never through a symlink (a link is removed itself); a path
        that would leave the state folder is logged and left alone."""
        try:
            remove_inside(self._area(area, folder), folder)
        except PathOutsideRootError as e:
            logger.error("not deleting %s/%r: %s", area, folder, e)
        except OSError as e:
            logger.warning("cannot delete %s/%s: %s", area, folder, e)

    def prune(self, keep: set[str]) -> None:
        """Remove installed models not in ``keep`` (folder names) and stale staging folders."""
        for folder in self.models.iterdir():
            if folder.name not in keep:
                self.discard("models", folder.name)
        journal = self.journal()
        try:
            current = self.folder_name(journal.release) if journal else None
        except ValueError:  # InvalidNameError: a journal an older agent wrote for a bad name
            current = None
        for folder in self.staging.iterdir():
            if folder.name != current:
                self.discard("staging", folder.name)
