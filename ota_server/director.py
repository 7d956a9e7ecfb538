"""Issuing director documents: signed with the online director key, versions strictly
increasing per device. The counters live in the fleet registry (the next version is taken and
committed in one transaction), and one device's documents are issued, signed and delivered one
at a time, so the document retained on its desired topic is always the highest version issued."""

from __future__ import annotations

import datetime as dt
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from securesystemslib.signer import Signer

from edgec.director import (
    Action,
    DirectorDocument,
    DirectorFile,
    DirectorSignature,
    ShadowRequest,
    SignedDirectorDocument,
    canonical,
)
from edgec.errors import UserInputError
from ota_server.registry import Registry

__all__ = ["VERSIONS_FILE", "DirectorIssuer", "import_versions_file", "release_files", "sign_document"]

logger = logging.getLogger(__name__)

VALIDITY = dt.timedelta(days=7)
VERSIONS_FILE = Path("director") / "versions.json"  # where servers before the registry kept the counters


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
    """The server's one issuer of director documents."""

    def __init__(self, registry: Registry, signer: Signer) -> None:
        self.registry = registry
        self.signer = signer

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
        shadow: ShadowRequest | None = None,
        now: dt.datetime | None = None,
        deliver: Callable[[SignedDirectorDocument], None] | None = None,
    ) -> SignedDirectorDocument:
        """The next document for ``device``: its version is one more than the last issued, and
        is recorded before the document exists. ``deliver`` (publish it) runs while the device's
        issuing lock is held, so one device's documents reach the broker in version order."""
        now = now or dt.datetime.now(dt.UTC)
        with self.registry.next_director_version(fleet, device, release) as version:
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
                shadow=shadow,
            )
            signed = sign_document(document, self.signer)
            if deliver is not None:
                deliver(signed)
        return signed


def _read_versions_file(path: Path) -> dict[tuple[str, str], int]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise UserInputError(
            f'{path} is not valid JSON ({e}): repair it by hand (it maps "fleet/device" to the '
            "last director version sent) or restore it from a backup, then start the server again"
        ) from e
    if not isinstance(data, dict):
        raise UserInputError(f'{path} should map "fleet/device" to a version; repair or restore it')
    versions = {}
    for key, version in data.items():
        fleet, _, device = key.partition("/")
        if not (fleet and device) or type(version) is not int or version < 0:
            raise UserInputError(f'{path}: {key!r}: {version!r} is not "fleet/device": version; repair it')
        versions[(fleet, device)] = version
    return versions


def import_versions_file(registry: Registry, repo: Path) -> int:
    """Move the counters an older server kept in ``repo/director/versions.json`` into the
    registry, once: each device keeps the higher of the two, then the file is removed (it was
    served with the repository). Returns how many counters it held; 0 when there is no file.

    Raises ``UserInputError`` if the file is unreadable: starting every device from 0 would
    send documents that devices refuse as replays."""
    path = repo / VERSIONS_FILE
    if not path.exists():
        return 0
    versions = _read_versions_file(path)
    registry.import_director_versions(versions)  # the higher of the two: importing twice is harmless
    path.unlink()
    (path.parent / "versions.tmp").unlink(missing_ok=True)  # what an interrupted write of it left
    if not any(path.parent.iterdir()):
        path.parent.rmdir()
    logger.info("moved %d director version counters from %s into the registry", len(versions), path)
    return len(versions)
