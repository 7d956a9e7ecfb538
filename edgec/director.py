"""The director document: the server's signed statement of what one device should run.

Uptane's director role, reduced to what an edge fleet needs: for device D (profile P), run
target T (its files, with hashes and lengths), for rollout R, as an install, a rollback, or a
shadow run (load T beside the serving model, run a share of live requests on it off the
request path, report how it agrees; never serve it: an agent that predates the action
refuses the document, so it cannot serve it either).
Versions increase strictly per device and every document expires, so an old or frozen
instruction is refused. The signature covers the canonical JSON of ``signed``.

A wire document read tolerantly: fields a newer server adds, at any level, are kept and
ignored, and the signature is checked over ``signed`` as it was received (unknown fields
included), not over a re-dump of what this reader understood. Only a newer major
``schema_version`` is refused (``NewerDirectorDocumentError``: upgrade the agent).
"""

from __future__ import annotations

import datetime as dt
import enum
import json
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ModelWrapValidatorHandler, PrivateAttr, model_validator

from edgec._bounded_json import JsonInputError, loads
from edgec._schema import check_schema_version
from edgec.errors import InvalidNameError, NewerDirectorDocumentError, TrustError
from edgec.names import Name, RelativePath, Release, parse_release

__all__ = [
    "MAX_DOCUMENT_BYTES",
    "MAX_DOCUMENT_DEPTH",
    "SCHEMA_VERSION",
    "Action",
    "DirectorDocument",
    "DirectorFile",
    "DirectorSignature",
    "ShadowRequest",
    "SignedDirectorDocument",
    "canonical",
    "canonical_json",
    "parse_signed_document",
]

MAX_DOCUMENT_BYTES = 1 << 20  # a document names a few files; anything near this is not one
MAX_DOCUMENT_DEPTH = 32  # a document nests 4 deep; unknown fields get room, not a stack's worth
SCHEMA_VERSION = 1  # the major this reader reads; additive changes do not bump it


class _Model(BaseModel):
    # a wire document: unknown fields are kept (signatures cover them) and ignored
    model_config = ConfigDict(extra="allow", frozen=True)


class Action(enum.StrEnum):
    INSTALL = "install"
    ROLLBACK = "rollback"
    SHADOW = "shadow"  # fetch and load the release beside the serving one, judge it, do not serve it


MAX_SHADOW_S = 7 * 24 * 3600.0
MAX_SHADOW_REQUESTS = 10_000_000


class ShadowRequest(_Model):
    """How long a shadow run lasts (``duration_s``, ``requests`` compared, whichever comes
    first; at least one is given) and the share of live requests also run on the candidate."""

    duration_s: Annotated[float, Field(gt=0, le=MAX_SHADOW_S, allow_inf_nan=False)] | None = None
    requests: Annotated[int, Field(ge=1, le=MAX_SHADOW_REQUESTS)] | None = None
    sample: Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)] = 0.1

    @model_validator(mode="after")
    def _bounded(self) -> ShadowRequest:
        if self.duration_s is None and self.requests is None:
            raise ValueError("a shadow request gives duration_s, requests or both")
        return self


class DirectorFile(_Model):
    path: RelativePath  # the image repository's target path: NAME/VERSION/PROFILE/FILE
    sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
    length: Annotated[int, Field(ge=0)]


class DirectorDocument(_Model):
    schema_version: int = SCHEMA_VERSION
    fleet: Name
    device: Name
    profile: Name
    version: Annotated[int, Field(ge=1)]
    expires: dt.datetime
    rollout: str
    action: Action
    release: Release  # NAME:VERSION; the agent's folders are named after it
    files: Annotated[list[DirectorFile], Field(min_length=1)]
    shadow: ShadowRequest | None = None  # action shadow only: for how long, on what share

    @model_validator(mode="after")
    def _shadow_with_its_action(self) -> DirectorDocument:
        if (self.action is Action.SHADOW) != (self.shadow is not None):
            raise ValueError("a shadow document says how long it shadows (shadow), and only it does")
        return self

    @model_validator(mode="before")
    @classmethod
    def _readable_version(cls, data: Any) -> Any:
        """A newer major is refused before any field is read (it may have changed them)."""
        release = data.get("release") if isinstance(data, dict) else None
        try:
            parse_release(release)
        except InvalidNameError:
            release = None  # reported only where it is a valid name
        return check_schema_version(
            data,
            document="director document",
            supported=SCHEMA_VERSION,
            writer="server",
            upgrade="agent",
            error=NewerDirectorDocumentError,
            release=release,
        )


class DirectorSignature(_Model):
    keyid: str
    sig: str


class SignedDirectorDocument(_Model):
    signed: DirectorDocument
    signatures: list[DirectorSignature]
    # ``signed`` as it was received, in canonical JSON, with the model parsed from it: the
    # bytes apply only while ``signed`` is that very object (model_copy(update=...) drops them)
    _received: tuple[DirectorDocument, bytes] | None = PrivateAttr(default=None)

    @model_validator(mode="wrap")
    @classmethod
    def _keep_signed_as_received(
        cls, data: Any, handler: ModelWrapValidatorHandler[SignedDirectorDocument]
    ) -> SignedDirectorDocument:
        envelope = handler(data)
        received = data.get("signed") if isinstance(data, dict) else None
        if isinstance(received, dict):  # JSON data, not a DirectorDocument built here
            try:
                envelope._received = (envelope.signed, canonical_json(received))
            except (TypeError, ValueError):  # Python objects a caller put in: the model's form is used
                envelope._received = None
        return envelope

    def signed_bytes(self) -> bytes:
        """The bytes the signatures cover: the canonical JSON of ``signed`` as it was received,
        unknown fields included; for a document built here, of the model."""
        if self._received is not None and self._received[0] is self.signed:
            return self._received[1]
        return canonical(self.signed)

    def __eq__(self, other: object) -> bool:
        """The same envelope: the same signed bytes, signatures and unknown fields, however it
        was made (parsed, read back from the agent's store, or built and signed here)."""
        if not isinstance(other, SignedDirectorDocument):
            return NotImplemented
        mine = (self.signed_bytes(), self.signatures, self.model_extra)
        return mine == (other.signed_bytes(), other.signatures, other.model_extra)

    def __hash__(self) -> int:
        return hash(self.signed_bytes())

    def wire_data(self) -> dict[str, Any]:
        """The envelope as JSON data with ``signed`` exactly as received, so a stored copy is
        read back equal to it and verifies as it did."""
        data = self.model_dump(mode="json")
        data["signed"] = json.loads(self.signed_bytes())
        return data


def canonical_json(data: Any) -> bytes:
    """JSON data in the canonical form that is signed: sorted keys, no whitespace, ASCII."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def canonical(document: DirectorDocument) -> bytes:
    """The exact bytes that are signed: sorted keys, no whitespace, UTC timestamps."""
    return canonical_json(document.model_dump(mode="json"))


def parse_signed_document(payload: bytes | bytearray | str) -> SignedDirectorDocument:
    """A signed director document from its JSON (as it arrives on the desired topic), its
    fields checked; the signature is the device's to check (over ``signed_bytes()``). Raises
    ``TrustError`` (role ``director``, one line) for anything else, ``NewerDirectorDocumentError``
    (a ``TrustError``) for a newer major ``schema_version``; never another exception."""
    if len(payload) > MAX_DOCUMENT_BYTES:
        raise TrustError(
            f"malformed director document: {len(payload)} bytes, over the limit of {MAX_DOCUMENT_BYTES}",
            "director",
        )
    if isinstance(payload, str):
        payload = payload.encode("utf-8", "surrogatepass")  # a lone surrogate is then not UTF-8
    try:
        # one parse feeds both the model and the bytes its signature is checked over
        data = loads(payload, max_bytes=MAX_DOCUMENT_BYTES, max_depth=MAX_DOCUMENT_DEPTH)
        return SignedDirectorDocument.model_validate(data)
    except JsonInputError as e:
        raise TrustError(f"malformed director document: it is {e}", "director") from e
    except ValueError as e:  # pydantic's ValidationError
        detail = " ".join(str(e).splitlines()[:3])
        raise TrustError(f"malformed director document: {detail}", "director") from e
