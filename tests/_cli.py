"""Running the real command line from tests, as a user would (``localfleet.run_edgec``)."""

from __future__ import annotations

import shutil
from pathlib import Path

from localfleet import ROOT, CliResult
from localfleet import run_edgec as _run_edgec

__all__ = ["DIGITS", "ROOT", "UNSHARE", "CliResult", "run_edgec"]

DIGITS = ROOT / "samples" / "digits"
UNSHARE = shutil.which("unshare")


def run_edgec(*args: str | Path, cwd: Path | None = None, offline: bool = False) -> CliResult:
    """Run the real command line in a subprocess, as a user would.

    ``offline`` runs it in a network namespace of its own with no network at all.
    """
    prefix = [UNSHARE, "--net"] if offline and UNSHARE else []
    return _run_edgec(*args, cwd=cwd, prefix=prefix)
