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

__all__ = [
    "Action",
    "DirectorDocument",
    "DirectorFile",
    "DirectorSignature",
    "SignedDirectorDocument",
    "canonical",
]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Action(enum.StrEnum):
    INSTALL = "install"
    ROLLBACK = "rollback"


class DirectorFile(_Model):
    path: str  # the image repository's target path
    sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
    length: Annotated[int, Field(ge=0)]


class DirectorDocument(_Model):
    schema_version: int = 1
    fleet: str
    device: str
    profile: str
    version: Annotated[int, Field(ge=1)]
    expires: dt.datetime
    rollout: str
    action: Action
    release: str  # NAME:VERSION, for people reading the document
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
