"""The device's side of the image repository: python-tuf's ngclient, with pluggable fetchers.

ngclient does the verification TUF specifies (signatures and thresholds, versions that never
go back, expiry, snapshot/targets consistency, hashes and lengths of every download, with the
download stopped at the signed length); this module feeds it bytes and turns its exceptions
into edgec's, by type: a ``TrustError`` for anything the repository got wrong (its subclass
names the check: ``ExpiredError``, ``RollbackError``, ``BadSignatureError``,
``HashMismatchError``), a ``FetchError`` for a transport failure worth retrying. Trusted
metadata is persisted by ngclient under the state folder (written atomically) and survives
every refusal untouched.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

from tuf.api import exceptions as tuf_errors
from tuf.ngclient import FetcherInterface, TargetFile, Updater, UpdaterConfig

from edgec._atomic import atomic_write
from edgec.errors import (
    BadSignatureError,
    ExpiredError,
    FetchError,
    HashMismatchError,
    RollbackError,
    TrustError,
)

__all__ = ["FolderFetcher", "TrustedRepository"]

logger = logging.getLogger(__name__)
_SCHEME = "edgec-folder:"
_CHUNK = 64 * 1024


class FolderFetcher(FetcherInterface):
    """Serves a repository folder (a USB stick, a test fixture) as if it were remote."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def _fetch(self, url: str) -> Iterator[bytes]:
        relative = url.removeprefix(_SCHEME)
        path = (self.folder / relative).resolve()
        if not path.is_relative_to(self.folder.resolve()) or not path.is_file():
            raise tuf_errors.DownloadHTTPError(f"{relative} not found", 404)
        return self._chunks(path)

    @staticmethod
    def _chunks(path: Path) -> Iterator[bytes]:
        with path.open("rb") as f:
            while block := f.read(_CHUNK):
                yield block


def _role_of(error: Exception) -> str:
    """The role a refusal names (python-tuf's errors carry no role, only their text); only a
    label for the report, never what decides how the refusal is handled."""
    text = str(error).lower()
    for role in ("timestamp", "snapshot", "targets", "root"):
        if role in text:
            return role
    return "target"


# python-tuf's refusals and ours, most specific first (EqualVersionNumberError is a
# BadVersionNumberError); any other RepositoryError is a plain TrustError.
_BY_TYPE: tuple[tuple[type[Exception], type[TrustError]], ...] = (
    (tuf_errors.ExpiredMetadataError, ExpiredError),
    (tuf_errors.BadVersionNumberError, RollbackError),
    (tuf_errors.UnsignedMetadataError, BadSignatureError),
    (tuf_errors.LengthOrHashMismatchError, HashMismatchError),
)


def _refused(message: str, role: str, error: tuf_errors.RepositoryError) -> TrustError:
    """python-tuf's refusal ``error`` as the ``TrustError`` subclass of its type."""
    kind = next((ours for theirs, ours in _BY_TYPE if isinstance(error, theirs)), TrustError)
    return kind(message, role)


class TrustedRepository:
    """Refresh metadata and download targets, verified. ``state`` holds the trusted metadata
    (seeded with the root the device was provisioned with) and the downloaded targets."""

    def __init__(
        self,
        state: Path,
        fetcher: FetcherInterface,
        max_target_bytes: int = 2 << 30,
        url_prefix: str = _SCHEME,
    ) -> None:
        self.metadata_dir = state / "metadata"
        self.targets_dir = state / "targets"
        self.metadata_dir.mkdir(parents=True, exist_ok=True)
        self.targets_dir.mkdir(parents=True, exist_ok=True)
        if not (self.metadata_dir / "root.json").exists():
            raise TrustError(f"no trusted root in {self.metadata_dir}: provision the device first", "root")
        self._fetcher = fetcher
        self._prefix = url_prefix
        self._config = UpdaterConfig(targets_max_length=max_target_bytes)
        self._updater = self._new_updater()

    def _new_updater(self) -> Updater:
        # An ngclient Updater refreshes once; every refresh starts from the persisted trust.
        return Updater(
            metadata_dir=str(self.metadata_dir),
            metadata_base_url=f"{self._prefix}metadata/",
            target_base_url=f"{self._prefix}targets/",
            target_dir=str(self.targets_dir),
            fetcher=self._fetcher,
            config=self._config,
            bootstrap=None,
        )

    @staticmethod
    def provision(state: Path, root: bytes) -> None:
        """Install the first trusted root (shipped with the device image or its config)."""
        (state / "metadata").mkdir(parents=True, exist_ok=True)
        atomic_write(state / "metadata" / "root.json", root)

    def refresh(self) -> None:
        self._updater = self._new_updater()
        try:
            self._updater.refresh()
        except tuf_errors.RepositoryError as e:
            raise _refused(f"repository metadata refused: {type(e).__name__}: {e}", _role_of(e), e) from e
        except tuf_errors.DownloadError as e:
            raise FetchError(f"cannot fetch repository metadata: {e}") from e

    def download(self, target_path: str) -> Path:
        """The verified file for ``target_path`` (refreshes metadata first if not done)."""
        try:
            info = self._updater.get_targetinfo(target_path)
            if info is None:
                raise TrustError(f"{target_path} is not a signed target of the repository", "targets")
            cached = self._updater.find_cached_target(info)
            return Path(cached or self._updater.download_target(info))
        except tuf_errors.RepositoryError as e:
            raise _refused(f"{target_path} refused: {type(e).__name__}: {e}", "target", e) from e
        except tuf_errors.DownloadError as e:
            raise FetchError(f"cannot download {target_path}: {e}") from e

    def target(self, target_path: str) -> TargetFile:
        """The signed target info for ``target_path`` (after ``refresh``)."""
        try:
            info = self._updater.get_targetinfo(target_path)
        except tuf_errors.RepositoryError as e:
            raise _refused(f"{target_path} refused: {type(e).__name__}: {e}", "targets", e) from e
        except tuf_errors.DownloadError as e:
            raise FetchError(f"cannot fetch the metadata for {target_path}: {e}") from e
        if info is None:
            raise TrustError(f"{target_path} is not a signed target of the repository", "targets")
        return info

    def trusted_version(self, role: str) -> int:
        from tuf.api.metadata import Metadata

        path = self.metadata_dir / f"{role}.json"
        return Metadata.from_file(str(path)).signed.version if path.exists() else 0
