"""The director document: the server's signed statement of what one device should run.

Uptane's director role, reduced to what an edge fleet needs: for device D (profile P), run
target T (its files, with hashes and lengths), for rollout R, as an install or a rollback.
Versions increase strictly per device and every document expires, so an old or frozen
instruction is refused. The signature covers the canonical JSON of ``signed``.
"""

from __future__ import annotations

import datetime as dt
import enum
import json
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

from edgec.errors import TrustError
from edgec.names import Name, RelativePath, Release

__all__ = [
    "MAX_DOCUMENT_BYTES",
    "Action",
    "DirectorDocument",
    "DirectorFile",
    "DirectorSignature",
    "SignedDirectorDocument",
    "canonical",
    "parse_signed_document",
]

MAX_DOCUMENT_BYTES = 1 << 20  # a document names a few files; anything near this is not one


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Action(enum.StrEnum):
    INSTALL = "install"
    ROLLBACK = "rollback"


class DirectorFile(_Model):
    path: RelativePath  # the image repository's target path: NAME/VERSION/PROFILE/FILE
    sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
    length: Annotated[int, Field(ge=0)]


class DirectorDocument(_Model):
    schema_version: int = 1
    fleet: Name
    device: Name
    profile: Name
    version: Annotated[int, Field(ge=1)]
    expires: dt.datetime
    rollout: str
    action: Action
    release: Release  # NAME:VERSION; the agent's folders are named after it
    files: Annotated[list[DirectorFile], Field(min_length=1)]


class DirectorSignature(_Model):
    keyid: str
    sig: str


class SignedDirectorDocument(_Model):
    signed: DirectorDocument
    signatures: list[DirectorSignature]


def canonical(document: DirectorDocument) -> bytes:
    """The exact bytes that are signed: sorted keys, no whitespace, UTC timestamps."""
    data = document.model_dump(mode="json")
    return json.dumps(data, sort_keys=True, separators=(",", ":")).encode()


def parse_signed_document(payload: bytes | bytearray | str) -> SignedDirectorDocument:
    """A signed director document from its JSON (as it arrives on the desired topic), its
    fields checked; the signature is the device's to check. Raises ``TrustError`` (role
    ``director``, one line) for anything else; never another exception."""
    if len(payload) > MAX_DOCUMENT_BYTES:
        raise TrustError(
            f"malformed director document: {len(payload)} bytes, over the limit of {MAX_DOCUMENT_BYTES}",
            "director",
        )
    try:
        return SignedDirectorDocument.model_validate_json(payload)
    except ValueError as e:  # pydantic's ValidationError, for bad JSON as for bad fields
        detail = " ".join(str(e).splitlines()[:3])
        raise TrustError(f"malformed director document: {detail}", "director") from e
