"""Running a long-lived service (the OTA server, the agent) until SIGTERM or Ctrl-C."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable

__all__ = ["run_until_signalled"]


def run_until_signalled(start: Callable[[], None], stop: Callable[[], None]) -> None:
    """``start()``, wait for SIGTERM or SIGINT (systemd stops with the first), ``stop()``."""
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    start()
    done.wait()
    stop()
