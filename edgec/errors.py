"""The error tree shared by every part of edgec.

Errors are named by whose fault they are, and every exception class edgec defines, in
any package, is in this one tree. Callers branch on the type, never on the message. The
library chooses no exit code: the command line maps a branch to its code (by type, in
``cli.exit_code``), and the codes are these:

- ``UserInputError`` (exit 2): the user gave something we cannot use: a model that does
  not load, an unknown profile, a bad shape spec, data that does not match the model, an
  output folder we cannot write, a device or rollout that is not there (``NotFoundError``)
  or not in a state that allows the request (``ConflictError``). Nothing was built.
  ``ProtocolError`` (a wire message that breaks the protocol) is exit 2 as well.
- ``BuildError`` (exit 3): a target failed to convert or missed its verification gate.
  Other targets are still built.
- ``TrustError`` and ``FetchError`` (exit 3): signed data was refused (by fault:
  ``ExpiredError``, ``RollbackError``, ``BadSignatureError``, ``HashMismatchError``), or a
  transfer broke off and may be retried.
- ``ServerError`` (exit 4): the OTA server could not be reached or refused an operator's
  request; its answer is in the message.
- any other ``EdgecError`` (exit 1), like a bug (an exception that is not an
  ``EdgecError``).

A wire document from a newer release (``NewerSchemaError``) is nobody's fault but the
reader's age: it is refused where that document's other problems are (a bundle's as a
``BundleError``, a director document's as a ``TrustError``), and its message says to upgrade.
"""

from __future__ import annotations

__all__ = [
    "EXIT_BAD_INPUT",
    "EXIT_INTERNAL",
    "EXIT_OK",
    "EXIT_SERVER",
    "EXIT_TARGET_FAILED",
    "BackendUnavailableError",
    "BadSignatureError",
    "BuildError",
    "BundleError",
    "ConflictError",
    "ConversionError",
    "DataMismatchError",
    "EdgecError",
    "ExpiredError",
    "FetchError",
    "FreezeSpecError",
    "GateError",
    "HashMismatchError",
    "InvalidNameError",
    "ModelLoadError",
    "NewerBundleError",
    "NewerDirectorDocumentError",
    "NewerSchemaError",
    "NotFoundError",
    "OptionError",
    "OutputDirError",
    "PathOutsideRootError",
    "ProfileError",
    "ProtocolError",
    "QuantizedSourceError",
    "ResourceLimitError",
    "RollbackError",
    "ServerError",
    "ShapeSpecError",
    "TrustError",
    "UnsupportedOperatorError",
    "UserInputError",
]

# The command line's exit statuses, part of its documented interface (scripts test them);
# ``cli.exit_code`` alone decides which error gets which.
EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_BAD_INPUT = 2
EXIT_TARGET_FAILED = 3
EXIT_SERVER = 4


class EdgecError(Exception):
    """Base of every error edgec raises on purpose. ``str(err)`` is one line for the user."""


class UserInputError(EdgecError):
    """The input is unusable; the message says what is wrong and how to fix it."""


class NotFoundError(UserInputError):
    """The thing asked for (a device, a rollout) is not there; the message says where to look.
    The operator API answers it with 404."""


class ConflictError(UserInputError):
    """The thing asked for is there but its state does not allow the request: it already
    exists, or a rollout is in a state that cannot be paused. The operator API answers 409."""


class ModelLoadError(UserInputError):
    """The source model cannot be read or is not a valid model."""


class ProfileError(UserInputError):
    """A device profile is unknown or its file is invalid."""


class ShapeSpecError(UserInputError):
    """An ``--input-shape`` spec is malformed or does not fit the model."""


class FreezeSpecError(UserInputError):
    """A ``--freeze`` spec is malformed or does not fit the model's input."""


class DataMismatchError(UserInputError):
    """Calibration or evaluation data does not match the model's inputs."""


class OutputDirError(UserInputError):
    """The output folder cannot be created or written, or a bundle is already there."""


class OptionError(UserInputError):
    """An impossible combination of options (say, int8 without calibration data)."""


class ResourceLimitError(UserInputError):
    """The input would need more memory (or samples) than the build may take: a huge shape,
    a data file that unpacks past the memory budget, or the machine running out of memory."""


class BundleError(UserInputError):
    """A bundle folder is missing, unreadable or its manifest is invalid."""


class InvalidNameError(UserInputError, ValueError):
    """A name, version, id or relative path is outside its allowed pattern (``edgec.names``).

    Also a ``ValueError``, so a pydantic model that checks a field with it reports a
    validation error. ``field`` names what was checked, ``value`` is what was given."""

    def __init__(self, message: str, field: str, value: object) -> None:
        super().__init__(message)
        self.field = field
        self.value = value


class PathOutsideRootError(UserInputError):
    """A path built from outside input resolves outside the folder it must stay in."""


class ProtocolError(EdgecError, ValueError):
    """A wire message (an MQTT topic, a fetch request or response) breaks the protocol: it is
    dropped and logged, never retried as it is."""


class BuildError(EdgecError):
    """A target could not be built or verified. The other targets go on."""


class BackendUnavailableError(BuildError):
    """The backend for a format is not installed (its SDK or extra is missing)."""


class ConversionError(BuildError):
    """A converter failed on the model; ``log`` keeps everything it printed, if anything."""

    def __init__(self, message: str, log: str | None = None) -> None:
        super().__init__(message)
        self.log = log


class UnsupportedOperatorError(ConversionError):
    """The model has operators the target cannot run; ``nodes`` names them."""

    def __init__(self, message: str, nodes: list[str], log: str | None = None) -> None:
        super().__init__(message, log)
        self.nodes = nodes


class QuantizedSourceError(BuildError):
    """The source graph is already quantized (``DynamicQuantizeLinear``, ``ConvInteger``...):
    quantizing or halving it again is refused; ``ops`` names the quantized op types found."""

    def __init__(self, message: str, ops: list[str]) -> None:
        super().__init__(message)
        self.ops = ops


class GateError(BuildError):
    """The artifact's verification figures miss the profile's gate; ``failures`` says which."""

    def __init__(self, message: str, failures: list[str]) -> None:
        super().__init__(message)
        self.failures = failures


class TrustError(EdgecError):
    """Signed metadata or a target was refused: bad or malicious data, never retried blindly.

    ``role`` names the metadata (or ``target``) that was wrong. The subclasses say which
    check refused it; a refusal no subclass names (a document for another device, a target
    the repository does not sign, a file over its size limit) is a plain ``TrustError``."""

    def __init__(self, message: str, role: str) -> None:
        super().__init__(message)
        self.role = role


class ExpiredError(TrustError):
    """Signed metadata or a director document past its expiry: a freeze attack, or a
    repository nobody re-signs (python-tuf's ``ExpiredMetadataError``)."""


class RollbackError(TrustError):
    """A version older than, equal to or other than the one trusted or signed for it: a
    replay, a rollback, a mix-and-match of metadata (python-tuf's ``BadVersionNumberError``)."""


class BadSignatureError(TrustError):
    """Not signed by enough of the keys trusted for it: a signature missing, invalid or by
    an untrusted key (python-tuf's ``UnsignedMetadataError``)."""


class HashMismatchError(TrustError):
    """A file's or chunk's hash or length differs from the one signed for it, or the
    director and the image repository sign different ones (python-tuf's
    ``LengthOrHashMismatchError``)."""


class FetchError(EdgecError):
    """The repository could not be reached or a transfer broke off: retriable."""


class ServerError(EdgecError):
    """The OTA server's operator API could not be reached or refused the request."""


class NewerSchemaError(EdgecError):
    """A wire document written by a newer release of edgec: its ``schema_version`` has a newer
    major than this reader supports. Not bad data and not an attack: this reader is too old,
    and upgrading it is the fix (a fleet is never upgraded at once).

    ``document`` names the document, ``found`` is its ``schema_version`` as given (clipped),
    ``supported`` the newest major this reader reads, ``release`` the NAME:VERSION it names
    where that could be read (so a refusal can be reported against its release)."""

    def __init__(
        self,
        message: str,
        *,
        document: str,
        found: str,
        supported: int,
        release: str | None = None,
        **rest: str,
    ) -> None:
        super().__init__(message, **rest)  # cooperative: TrustError takes ``role``
        self.document = document
        self.found = found
        self.supported = supported
        self.release = release


class NewerBundleError(NewerSchemaError, BundleError):
    """A bundle file (its manifest, a TensorRT build plan) from a newer compiler."""


class NewerDirectorDocumentError(NewerSchemaError, TrustError):
    """A director document from a newer server (role ``director``); refused before its
    signature is checked, as a newer major may change what is signed."""

    def __init__(
        self, message: str, *, document: str, found: str, supported: int, release: str | None = None
    ) -> None:
        super().__init__(
            message, document=document, found=found, supported=supported, release=release, role="director"
        )
