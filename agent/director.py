"""Director verification as a state machine with no I/O (after python-tuf's TrustedMetadataSet).

``DirectorState`` holds what the device trusts (the director's public key, its own id and
profile, the highest document version it has accepted). ``accept`` checks a document and
returns the new state, or raises a ``TrustError`` (by fault: ``BadSignatureError``,
``RollbackError``, ``ExpiredError``; another device's or profile's document is a plain one)
and leaves the old state as it was. The install decision then needs the image repository to
agree: ``check_against_repository`` (``HashMismatchError`` where they disagree).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from securesystemslib.exceptions import UnverifiedSignatureError
from securesystemslib.signer import Key, Signature

from edgec._atomic import atomic_write
from edgec.director import DirectorDocument, SignedDirectorDocument
from edgec.errors import BadSignatureError, ExpiredError, HashMismatchError, RollbackError, TrustError

__all__ = ["DirectorState", "RepositoryFile", "check_against_repository"]


@dataclass(frozen=True)
class RepositoryFile:
    """What the image repository signed for one target path."""

    sha256: str
    length: int
    profile: str


@dataclass(frozen=True)
class DirectorState:
    key: Key
    device: str
    profile: str
    version: int = 0  # the highest document version accepted so far

    def accept(
        self, envelope: SignedDirectorDocument, now: dt.datetime
    ) -> tuple[DirectorState, DirectorDocument]:
        doc = envelope.signed
        self._check_signature(envelope)
        if doc.device != self.device:
            raise TrustError(
                f"director document is for device {doc.device!r}, not {self.device!r}", "director"
            )
        if doc.version <= self.version:
            raise RollbackError(
                f"director document version {doc.version} is not newer than {self.version} (replay?)",
                "director",
            )
        if doc.expires <= now:
            raise ExpiredError(
                f"director document version {doc.version} expired at {doc.expires}", "director"
            )
        if doc.profile != self.profile:
            raise TrustError(
                f"director document names profile {doc.profile!r}, the device is {self.profile!r}", "director"
            )
        return dataclasses.replace(self, version=doc.version), doc

    def save(self, path: Path) -> None:
        """Persist the accepted version atomically (temp file, fsync, rename)."""
        state = {"device": self.device, "profile": self.profile, "version": self.version}
        atomic_write(path, json.dumps(state).encode())

    @classmethod
    def load(cls, path: Path, key: Key, device: str, profile: str) -> DirectorState:
        """The persisted state, or a fresh one; a state for another device is an error."""
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return cls(key=key, device=device, profile=profile)
        except (OSError, ValueError) as e:
            raise TrustError(f"trusted director state {path} is unreadable: {e}", "director") from e
        if (data.get("device"), data.get("profile")) != (device, profile):
            raise TrustError(
                f"trusted director state {path} belongs to another device or profile", "director"
            )
        return cls(key=key, device=device, profile=profile, version=int(data["version"]))

    def _check_signature(self, envelope: SignedDirectorDocument) -> None:
        data = envelope.signed_bytes()  # as received, unknown fields included
        for sig in envelope.signatures:
            if sig.keyid != self.key.keyid:
                continue
            try:
                self.key.verify_signature(Signature(sig.keyid, sig.sig), data)
                return
            except UnverifiedSignatureError:
                break
        raise BadSignatureError("director document is not signed by the trusted director key", "director")


def check_against_repository(doc: DirectorDocument, signed: Mapping[str, RepositoryFile]) -> None:
    """Install only what both sides agree on: every file the director names must be a target
    the image repository signs, with the same hash and length, built for the device's profile."""
    for file in doc.files:
        target = signed.get(file.path)
        if target is None:
            raise TrustError(
                f"director names {file.path}, which the image repository does not sign", "targets"
            )
        if (target.sha256, target.length) != (file.sha256, file.length):
            raise HashMismatchError(
                f"director and image repository disagree on {file.path}'s hash or length", "targets"
            )
        if target.profile != doc.profile:
            raise TrustError(
                f"{file.path} was built for {target.profile}, the device is {doc.profile}", "targets"
            )
