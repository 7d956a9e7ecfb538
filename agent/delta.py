"""Delta downloads: a new release built from the chunks of the installed ones.

A target whose signed custom fields carry a content-defined chunk table (``cdc``, see
``edgec.chunking``) is assembled chunk by chunk: a chunk whose hash is also a chunk of an
installed release (the active one or the previous one) is copied from that file, the others
are downloaded, several adjacent ones per request (up to ``MAX_CHUNK_BYTES``). Every chunk is
checked against the NEW signed table before it is written, wherever it came from, and the
whole file against its signed sha256. A copied chunk that does not match means an installed
file was damaged or tampered with: ``HashMismatchError``, naming the file and the chunk (the
install is refused; the bytes are never used).

The tables of the releases this agent installed are kept in ``state_dir/chunks/FOLDER.json``
(``FOLDER`` as under ``models/``), written when their download starts: they came from signed
targets metadata. They are an index only, never trusted for content. A target without a
table (a server before them) downloads in fixed chunks, as before.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from agent.mqtt_fetch import ChunkSource, PartialWriter, ResumableDownload
from agent.store import StateStore
from edgec._atomic import atomic_write
from edgec.chunking import MAX_CHUNK_BYTES, CdcTable
from edgec.errors import EdgecError, FetchError, HashMismatchError, PathOutsideRootError
from edgec.names import resolve_inside

__all__ = ["DeltaDownload", "InstalledChunks", "download_for"]

logger = logging.getLogger(__name__)

_MAX_TABLE_FILE_BYTES = 64 * 1024 * 1024  # our own file; bounded all the same


class InstalledChunks:
    """Where each chunk of the installed releases lies: sha256 -> (file, offset, length)."""

    def __init__(self, store: StateStore) -> None:
        self.store = store
        self.folder = store.root / "chunks"
        self.where: dict[str, tuple[Path, int, int]] = {}
        active = store.active()
        if active is not None:
            for folder in (active.folder, active.previous_folder):
                if folder:
                    self._index(folder)

    def record(self, release: str, tables: dict[str, dict[str, Any]]) -> None:
        """Keep the signed tables (``custom["cdc"]`` by path in the bundle) of ``release``,
        whose download starts; forget those of releases no longer under ``models/``."""
        self.folder.mkdir(exist_ok=True)
        name = self.store.folder_name(release)
        atomic_write(self.folder / f"{name}.json", json.dumps(tables, separators=(",", ":")).encode())
        for old in self.folder.glob("*.json"):
            if old.stem != name and not (self.store.models / old.stem).is_dir():
                old.unlink(missing_ok=True)

    def _index(self, folder: str) -> None:
        path = self.folder / f"{folder}.json"
        try:
            if path.stat().st_size > _MAX_TABLE_FILE_BYTES:
                raise ValueError(f"over {_MAX_TABLE_FILE_BYTES} bytes")
            tables = json.loads(path.read_bytes())
            if not isinstance(tables, dict):
                raise ValueError("not an object")
            models = self.store.model_path(folder)
        except FileNotFoundError:
            return  # installed before this agent kept tables: nothing to reuse from it
        except (OSError, ValueError, PathOutsideRootError) as e:
            logger.warning("not reusing chunks of %s: its chunk tables are unreadable (%s)", folder, e)
            return
        for relative, value in tables.items():
            try:
                file = resolve_inside(models, relative)
                table = CdcTable.from_custom(value, file.stat().st_size, f"{folder}/{relative}")
            except (OSError, EdgecError) as e:  # missing, or not the file the table describes
                logger.warning("not reusing chunks of %s/%s: %s", folder, relative, e)
                continue
            for offset, length, digest in table.offsets():
                self.where.setdefault(digest, (file, offset, length))


class DeltaDownload(ResumableDownload):
    """A target assembled from installed chunks and downloaded ones, resumable like the
    fixed-chunk download (the ``.partial`` holds the checked chunks in file order)."""

    def __init__(
        self,
        chunks: ChunkSource,
        path: str,
        dest: Path,
        *,
        table: CdcTable,
        installed: InstalledChunks,
        length: int,
        sha256: str,
    ) -> None:
        self._setup(chunks, path, dest, pieces=table.offsets(), length=length, sha256=sha256)
        self.installed = installed

    def _fill(self, out: PartialWriter, start: int) -> None:
        index = start
        while index < len(self.pieces):
            offset, length, digest = self.pieces[index]
            local = self.installed.where.get(digest)
            if local is not None:
                out.write(self._copy(index, *local))
                self.reused_bytes += length
                index += 1
                continue
            end, size = index + 1, length  # adjacent chunks to download, one request
            while end < len(self.pieces) and self.pieces[end][2] not in self.installed.where:
                if size + self.pieces[end][1] > MAX_CHUNK_BYTES:
                    break
                size += self.pieces[end][1]
                end += 1
            data = b""
            while len(data) < size:  # a source that answers less than asked is asked for the rest
                _, more = self.chunks.chunk(self.path, offset + len(data), size - len(data))
                if not more:
                    raise FetchError(f"{self.path}: no bytes at offset {offset + len(data)} of {self.length}")
                data += more[: size - len(data)]
                self.fetched_bytes += len(more)
            for i in range(index, end):
                start_at = self.pieces[i][0] - offset
                piece = data[start_at : start_at + self.pieces[i][1]]
                self._check(i, piece)
                out.write(piece)
            index = end

    def _copy(self, index: int, file: Path, offset: int, length: int) -> bytes:
        """Chunk ``index`` from an installed file, checked against the new signed table."""
        with file.open("rb") as f:
            f.seek(offset)
            data = f.read(length)
        try:
            self._check(index, data)
        except HashMismatchError as e:
            raise HashMismatchError(
                f"{self.path}: chunk {index} reused from {file} (bytes {offset}-{offset + length - 1}) "
                "does not match its signed hash: the installed release is damaged or was tampered with; "
                "reinstall it",
                "target",
            ) from e
        return data


def download_for(
    chunks: ChunkSource,
    path: str,
    dest: Path,
    *,
    custom: dict[str, Any],
    length: int,
    sha256: str,
    installed: InstalledChunks,
) -> ResumableDownload:
    """The download of one target: by content-defined chunks, reusing installed ones, when
    its signed custom fields have a table; else in fixed chunks."""
    if "cdc" not in custom:
        return ResumableDownload(chunks, path, dest, custom=custom, length=length, sha256=sha256)
    table = CdcTable.from_custom(custom["cdc"], length, path)
    return DeltaDownload(chunks, path, dest, table=table, installed=installed, length=length, sha256=sha256)
