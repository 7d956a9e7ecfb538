"""One device's agent process in a local fleet (``edgec agent run``)."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from localfleet.commands import ROOT, code_env
from localfleet.processes import Service, start_service

__all__ = ["AgentProcess", "Echo"]

Echo = Callable[[str], None]


@dataclass
class AgentProcess:
    """One device's agent: its config, state folder, inference port and log."""

    device: str
    profile: str
    config: Path
    state: Path
    http_port: int
    log: Path
    env: dict[str, str] | None = None
    code: Path | None = None  # another release's source tree to run (version skew); None: this one
    service: Service | None = None

    @property
    def proc(self) -> subprocess.Popen[bytes] | None:
        return None if self.service is None else self.service.proc

    def spawn(self, echo: Echo | None = None) -> Service:
        argv = [sys.executable, "-m", "edgec", "-v", "agent", "run", "--config", str(self.config)]
        if echo is not None:
            echo(f"$ edgec {shlex.join(argv[3:])} > {self.log} 2>&1 &")
        self.service = start_service(
            f"agent {self.device}",
            argv,
            self.log,
            cwd=self.code or ROOT,
            env=code_env(self.code, self.env),
            new_session=True,
        )
        return self.service

    def start(self, timeout_s: float = 60.0) -> None:
        """Start it and wait for its inference API."""
        self.spawn().wait_for_port(self.http_port, timeout_s)

    def kill9(self) -> None:
        assert self.service is not None
        self.service.kill9()

    def stop(self) -> None:
        if self.service is not None:
            self.service.stop()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.http_port}{path}"

    def infer(self, x: Any, timeout_s: float = 10) -> tuple[str, Any]:
        """``(model_version, first output)`` for one input (a numpy array) through the v2 API."""
        import numpy as np

        body = {
            "inputs": [{"name": "x", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]
        }
        request = urllib.request.Request(
            self.url("/v2/models/digits/infer"), data=json.dumps(body).encode(), method="POST"
        )
        request.add_header("Content-Type", "application/json")
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            answer = json.loads(response.read())
        out = answer["outputs"][0]
        return answer["model_version"], np.asarray(out["data"], dtype=np.float32).reshape(out["shape"])

    def journal(self) -> dict[str, Any] | None:
        try:
            journal: dict[str, Any] = json.loads((self.state / "install.json").read_text())
            return journal
        except (FileNotFoundError, ValueError):
            return None
