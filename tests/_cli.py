"""Running the real command line from tests and benchmarks, as a user would."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DIGITS = ROOT / "samples" / "digits"


@dataclass
class CliResult:
    returncode: int
    stdout: str
    stderr: str

    def json(self) -> Any:
        return json.loads(self.stdout)


UNSHARE = shutil.which("unshare")


def run_edgec(*args: str | Path, cwd: Path | None = None, offline: bool = False) -> CliResult:
    """Run the real command line in a subprocess, as a user would.

    ``offline`` runs it in a network namespace of its own with no network at all.
    """
    prefix = [UNSHARE, "--net"] if offline and UNSHARE else []
    proc = subprocess.run(
        [*prefix, sys.executable, "-m", "edgec", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd or ROOT,
        timeout=600,
        check=False,
    )
    return CliResult(proc.returncode, proc.stdout, proc.stderr)
