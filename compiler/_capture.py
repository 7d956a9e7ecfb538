"""Keep converters quiet: their prints and C++ logs must not reach our stdout.

TensorFlow, onnx2tf and coremltools write to file descriptors 1 and 2 directly (C++
logging) as well as through ``print``; ``edgec build --json`` promises one JSON document on
stdout. ``captured_output`` points both descriptors at a temporary file for the duration and
hands back what was written, so a failure can quote the converter's last words.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Generic, TypeVar

__all__ = ["Captured", "Quiet", "call_quietly", "captured_output"]

logger = logging.getLogger(__name__)
T = TypeVar("T")


class Captured:
    def __init__(self) -> None:
        self.text = ""

    def tail(self, lines: int = 5) -> str:
        kept = [line for line in self.text.splitlines() if line.strip()]
        return " | ".join(kept[-lines:])


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
    onnx2tf calls on failure) are returned for the caller to turn into a typed error."""
    with captured_output() as log:
        try:
            value = function()
        except (Exception, SystemExit) as e:
            return Quiet(None, e, log)
    return Quiet(value, None, log)
