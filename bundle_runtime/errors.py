"""What can go wrong opening an artifact in its runtime, and one-line error text.

The same failure is a different party's fault on each side: an artifact the compiler just
made that its runtime cannot load is a failed build (``ConversionError``); a signed bundle
the device cannot load is bad data (the agent's ``LoadError``). So this package raises its
own ``ArtifactLoadError`` and each caller wraps it, by type, at its boundary.
"""

from __future__ import annotations

from edgec.errors import EdgecError

__all__ = ["ArtifactLoadError", "RuntimeNotInstalledError", "UnsupportedFormatError", "first_line"]

FIRST_LINE_HEAD = 160  # characters kept from the start of a long error line...
FIRST_LINE_TAIL = 240  # ...and from its end, where onnxruntime puts the reason


class ArtifactLoadError(EdgecError):
    """The artifact cannot be opened or run in its runtime; ``str()`` is one line that names
    the file and the runtime's reason. Callers map it to their own fault (see the module)."""


class RuntimeNotInstalledError(ArtifactLoadError):
    """The artifact's runtime package (onnxruntime, ai-edge-litert) is not installed here."""


class UnsupportedFormatError(ArtifactLoadError):
    """The artifact's format has no runtime in this package (CoreML, TensorRT)."""


def first_line(error: BaseException) -> str:
    """An exception as one line for the user (converters and runtimes raise multi-line essays).

    A long line keeps its start and its end: onnxruntime's load errors list every input of
    the failing node first and give the reason last (``..., Error Unrecognized attribute``).
    """
    text = str(error).strip() or type(error).__name__
    line = text.splitlines()[0]
    if len(line) <= FIRST_LINE_HEAD + FIRST_LINE_TAIL:
        return line
    return f"{line[:FIRST_LINE_HEAD].rstrip()} … {line[-FIRST_LINE_TAIL:].lstrip()}"
