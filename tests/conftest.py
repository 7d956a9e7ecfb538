"""Shared fixtures: the bundled samples, a CLI runner, and small ONNX models built in code."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
DIGITS = ROOT / "samples" / "digits"


@dataclass
class CliResult:
    returncode: int
    stdout: str
    stderr: str

    def json(self) -> Any:
        return json.loads(self.stdout)


def run_edgec(*args: str | Path, cwd: Path | None = None) -> CliResult:
    """Run the real command line in a subprocess, as a user would."""
    proc = subprocess.run(
        [sys.executable, "-m", "edgec", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd or ROOT,
        timeout=600,
        check=False,
    )
    return CliResult(proc.returncode, proc.stdout, proc.stderr)


@pytest.fixture
def edgec_cli():
    return run_edgec


@pytest.fixture(scope="session")
def digits() -> Path:
    return DIGITS
