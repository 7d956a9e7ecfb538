"""nginx serving an image repository with the config ``ota_server.cdn`` generates (Debian's
/usr/sbin/nginx, as a CDN's origin would run it), on a free port, in the foreground: for the
end-to-end tests and the fleet benchmark's downloads from a CDN."""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from localfleet.processes import HarnessError, Service, free_port, start_service

__all__ = ["NGINX", "Nginx", "Request", "running_nginx"]

NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
_LINE = re.compile(
    r'"(?P<method>\S+) (?P<path>\S+) [^"]*" (?P<status>\d{3}) (?P<sent>\d+) range="(?P<range>[^"]*)"'
)


@dataclass(frozen=True)
class Request:
    """One line of the access log."""

    method: str
    path: str
    status: int
    sent: int
    range: str  # the Range header asked, "-" when none

    @property
    def range_start(self) -> int | None:
        found = re.fullmatch(r"bytes=(\d+)-\d*", self.range)
        return int(found[1]) if found else None


@dataclass
class Nginx:
    service: Service
    port: int
    run_dir: Path
    config: Path

    @property
    def url(self) -> str:
        """What ``install.http_url`` names: the repository under /v1/repo/."""
        return f"http://127.0.0.1:{self.port}/v1/repo/"

    def requests(self) -> list[Request]:
        log = self.run_dir / "access.log"
        text = log.read_text() if log.exists() else ""
        found = []
        for line in text.splitlines():
            match = _LINE.search(line)
            if match:
                found.append(
                    Request(
                        match["method"],
                        match["path"],
                        int(match["status"]),
                        int(match["sent"]),
                        match["range"],
                    )
                )
        return found


@contextmanager
def running_nginx(repo: Path, run_dir: Path, limit_rate_bytes_per_s: int | None = None) -> Iterator[Nginx]:
    """nginx serving ``repo`` with ``nginx_config``'s output, stopped on exit."""
    from ota_server.cdn import nginx_config

    if NGINX is None:
        raise HarnessError("nginx is not installed (apt-get install nginx-light)")
    run_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    user = "root" if os.geteuid() == 0 else None  # else workers run as nobody, who cannot read tmp_path
    config = run_dir / "nginx.conf"
    config.write_text(
        nginx_config(
            repo, port=port, run_dir=run_dir, user=user, limit_rate_bytes_per_s=limit_rate_bytes_per_s
        )
    )
    argv = [NGINX, "-c", str(config), "-p", str(run_dir), "-e", str(run_dir / "error.log")]
    service = start_service("nginx", argv, run_dir / "nginx.out")
    try:
        service.wait_for_port(port, 20)
        yield Nginx(service, port, run_dir, config)
    finally:
        service.stop()
