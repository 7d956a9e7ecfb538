"""The bundle runtime: the numpy-level code that runs an artifact, shared by build and device.

The compiler verifies every artifact through this package and the agent serves bundles
through it, so "verified at build" means the device's own code produced the figures:

- ``TensorPort`` (``ports``): tensor conversion between the source's tensors and the
  artifact's, from the manifest's ``TensorSpec``: channels-last layouts and int8 scale and
  zero point;
- ``session_options``/``OrtSession`` (``ort``): the one onnxruntime session factory, honouring
  the manifest's ``runtime_config``;
- ``LiteRtSession`` (``litert``): the LiteRT interpreter;
- ``open_artifact``/``ArtifactRunner`` (``runner``): an artifact that speaks the source's tensors;
- ``compare`` (``bundle_runtime.compare``, imported by name): one model's outputs judged
  against another's by output kind, the figures of the build's gate and the agent's shadow.

It imports numpy, the runtimes (lazily) and the ``edgec`` wire contract, never a training
or conversion framework, the compiler, the agent or the server (an import contract says so).
"""

from __future__ import annotations

from bundle_runtime.errors import (
    ArtifactLoadError,
    RuntimeNotInstalledError,
    UnsupportedFormatError,
    first_line,
)
from bundle_runtime.layouts import CHANNELS_LAST, channels_last_axes, is_channels_last_of
from bundle_runtime.litert import LiteRtSession
from bundle_runtime.ort import OrtSession, session_options
from bundle_runtime.ports import TensorPort
from bundle_runtime.runner import SESSIONS, ArtifactRunner, Session, open_artifact

__all__ = [
    "CHANNELS_LAST",
    "SESSIONS",
    "ArtifactLoadError",
    "ArtifactRunner",
    "LiteRtSession",
    "OrtSession",
    "RuntimeNotInstalledError",
    "Session",
    "TensorPort",
    "UnsupportedFormatError",
    "channels_last_axes",
    "first_line",
    "is_channels_last_of",
    "open_artifact",
    "session_options",
]
