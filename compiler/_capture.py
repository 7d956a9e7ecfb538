"""Keep converters quiet: their prints and C++ logs must not reach our stdout.

TensorFlow, onnx2tf and coremltools write to file descriptors 1 and 2 directly (C++
logging) as well as through ``print``; ``edgec build --json`` promises one JSON document on
stdout. ``captured_output`` points both descriptors at a temporary file for the duration and
hands back what was written, so a failure can quote the converter's last words.

Much of what is written is noise whatever happens: TensorFlow's C++ start-up lines (CUDA
probes such as ``failed call to cuInit``, oneDNN notes, absl banners), Python warnings, a
converter's INFO and WARNING chatter. ``meaningful_lines`` drops those, so that a failure
is never explained by them.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Generic, TypeVar

__all__ = [
    "LOG_KEPT",
    "Captured",
    "Quiet",
    "call_quietly",
    "captured_output",
    "is_noise",
    "meaningful_lines",
    "plain",
    "report_log",
]

logger = logging.getLogger(__name__)
T = TypeVar("T")
LOG_KEPT = 1 << 20  # the most of a converter's output a report keeps (its tail)

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_NOISE = re.compile(
    "|".join(
        [
            r"^[IWEF]\d{4} [\d:.]+\s+\d+\s+[\w./-]+:\d+\]",  # absl/glog C++ lines (CUDA probes, oneDNN)
            r"^WARNING: All log messages before absl::InitializeLog",
            r"oneDNN custom operations are on",
            r"This TensorFlow binary is optimized to use",
            r"To enable the following instructions:",
            r"rebuild TensorFlow with the appropriate compiler flags",
            r"Could not find cuda drivers",
            r"failed call to cuInit",
            r"TF-TRT Warning",
            r"Unable to register cu(DNN|FFT|BLAS) factory",
            r"computation placer already registered",
            r"Created TensorFlow Lite XNNPACK delegate",
            r"colored module is not installed",
            r"^\S+\.py:\d+: \w*Warning:",  # Python warnings and the source line they quote
            r"^\s*warnings\.warn\(",
            r"^(WARNING|INFO|DEBUG):",  # a converter's own chatter
            r"^\s*$",
        ]
    )
)


def plain(text: str) -> str:
    """``text`` without terminal colour codes."""
    return _ANSI.sub("", text)


def report_log(text: str) -> str:
    """A converter's output as a report keeps it: colours removed, at most ``LOG_KEPT``
    characters (the end, where a failure is)."""
    text = plain(text)
    return text if len(text) <= LOG_KEPT else "[... earlier output cut ...]\n" + text[-LOG_KEPT:]


def is_noise(line: str) -> bool:
    """A line third parties print whatever happens: never the reason a conversion failed."""
    return bool(_NOISE.search(plain(line)))


def meaningful_lines(text: str) -> list[str]:
    """The lines of a captured log that may say what went wrong, stripped, colours removed."""
    return [line.strip() for line in plain(text).splitlines() if not is_noise(line)]


class Captured:
    def __init__(self) -> None:
        self.text = ""

    def tail(self, lines: int = 5) -> str:
        return " | ".join(meaningful_lines(self.text)[-lines:])


@contextlib.contextmanager
def captured_output() -> Iterator[Captured]:
    captured = Captured()
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with tempfile.TemporaryFile(mode="w+b") as sink:
        os.dup2(sink.fileno(), 1)
        os.dup2(sink.fileno(), 2)
        buffer = io.StringIO()
        try:
            with contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(buffer):
                yield captured
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
            sink.seek(0)
            captured.text = sink.read().decode("utf-8", "replace") + buffer.getvalue()
            logger.debug("converter output:\n%s", captured.text[-4000:])


@dataclass
class Quiet(Generic[T]):
    """What ``call_quietly`` got: the value, or the failure, and what was printed meanwhile."""

    value: T | None
    failure: BaseException | None
    log: Captured


def call_quietly(function: Callable[[], T]) -> Quiet[T]:
    """Run a converter with its output captured; its exceptions (and ``sys.exit``, which
    onnx2tf calls on failure) are returned for the caller to turn into a typed error.
    ``MemoryError`` is raised: running out of memory is not the converter's failure."""
    with captured_output() as log:
        try:
            value = function()
        except MemoryError:
            raise
        except (Exception, SystemExit) as e:
            return Quiet(None, e, log)
    return Quiet(value, None, log)
