"""Issuing director documents: signed with the online director key, versions strictly
increasing per device (the counters persist next to the repository, written atomically)."""

from __future__ import annotations

import datetime as dt
import json
import os
from pathlib import Path
from typing import Any

from securesystemslib.signer import Signer

from edgec.director import (
    Action,
    DirectorDocument,
    DirectorFile,
    DirectorSignature,
    SignedDirectorDocument,
    canonical,
)
from edgec.errors import UserInputError

__all__ = ["DirectorIssuer", "release_files", "sign_document"]

VALIDITY = dt.timedelta(days=7)


def release_files(targets: dict[str, Any], release: str, profile: str) -> list[DirectorFile]:
    """The signed target files of ``release`` ("NAME:VERSION") built for ``profile``, from the
    image repository's targets (path -> TargetFile). Raises ``UserInputError`` if there are none."""
    name, _, version = release.partition(":")
    files = []
    for path, info in sorted(targets.items()):
        custom = info.unrecognized_fields.get("custom", {}).get("edgec", {})
        if (custom.get("name"), custom.get("version"), custom.get("profile")) == (name, version, profile):
            files.append(DirectorFile(path=path, sha256=info.hashes["sha256"], length=info.length))
    if not files:
        raise UserInputError(f"release {release} has no bundle for profile {profile}; publish one first")
    return files


def sign_document(document: DirectorDocument, signer: Signer) -> SignedDirectorDocument:
    signature = signer.sign(canonical(document))
    return SignedDirectorDocument(
        signed=document, signatures=[DirectorSignature(keyid=signature.keyid, sig=signature.signature)]
    )


class DirectorIssuer:
    def __init__(self, state: Path, signer: Signer) -> None:
        self.state = state
        self.signer = signer

    def _versions(self) -> dict[str, int]:
        try:
            return dict(json.loads(self.state.read_text(encoding="utf-8")))
        except FileNotFoundError:
            return {}

    def _save(self, versions: dict[str, int]) -> None:
        self.state.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.state.with_suffix(".tmp")
        with tmp.open("w", encoding="utf-8") as f:
            json.dump(versions, f, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.state)

    def issue(
        self,
        *,
        fleet: str,
        device: str,
        profile: str,
        rollout: str,
        action: Action,
        release: str,
        files: list[DirectorFile],
        now: dt.datetime | None = None,
    ) -> SignedDirectorDocument:
        """The next document for ``device``: its version is one more than the last issued."""
        now = now or dt.datetime.now(dt.UTC)
        versions = self._versions()
        key = f"{fleet}/{device}"
        version = versions.get(key, 0) + 1
        document = DirectorDocument(
            fleet=fleet,
            device=device,
            profile=profile,
            version=version,
            expires=now + VALIDITY,
            rollout=rollout,
            action=action,
            release=release,
            files=files,
        )
        signed = sign_document(document, self.signer)
        versions[key] = version
        self._save(versions)  # persisted before the document leaves the server
        return signed
