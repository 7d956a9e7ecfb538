"""Running the real command line, from this checkout or another release's source tree."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["ROOT", "CliResult", "code_env", "export_commit", "http_status", "run_edgec"]

ROOT = Path(__file__).resolve().parents[1]  # the checkout: samples/, and where commands run


@dataclass
class CliResult:
    returncode: int
    stdout: str
    stderr: str

    def json(self) -> Any:
        return json.loads(self.stdout)


def code_env(code: Path | None, base: dict[str, str] | None = None) -> dict[str, str] | None:
    """The environment that runs ``code`` (a source tree of another release) instead of this
    checkout: it goes first on the module path, before the installed editable package."""
    if code is None:
        return base
    return {**(base or os.environ), "PYTHONPATH": str(code)}


def export_commit(commit: str, folder: Path) -> Path | None:
    """This repository's source tree at ``commit``, extracted into ``folder/edgec`` (to run
    with ``code_env``); None when the history does not have it (a shallow clone)."""
    known = subprocess.run(["git", "-C", str(ROOT), "cat-file", "-e", f"{commit}^{{commit}}"], check=False)
    if known.returncode != 0:
        return None
    folder.mkdir(parents=True, exist_ok=True)
    archive = folder / "source.tar"
    subprocess.run(
        ["git", "-C", str(ROOT), "archive", "--format=tar", "-o", str(archive), commit], check=True
    )
    with tarfile.open(archive) as tar:
        tar.extractall(folder / "edgec", filter="data")
    archive.unlink()
    return folder / "edgec"


def run_edgec(
    *args: str | Path,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    prefix: Sequence[str] = (),
    timeout_s: float = 600,
) -> CliResult:
    """Run the real command line in a subprocess, as a user would."""
    proc = subprocess.run(
        [*prefix, sys.executable, "-m", "edgec", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd or ROOT,
        env=env,
        timeout=timeout_s,
        check=False,
    )
    return CliResult(proc.returncode, proc.stdout, proc.stderr)


def http_status(url: str) -> int:
    """The HTTP status of ``GET url`` (0 when nothing answers)."""
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as e:
        return int(e.code)
    except OSError:
        return 0
