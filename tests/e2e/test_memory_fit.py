"""Memory fit in the whole loop: a real server signs the peak memory the build measured, and a
real agent whose device has too little memory available refuses the release before it
downloads a byte, then installs one that fits once memory is free."""

from __future__ import annotations

import json
import re
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from edgec.manifest import read_manifest
from localfleet.releases import build_digits
from tests._cli import DIGITS
from tests._fleet import Fleet, up
from tests._releases import PROFILE, rewrite_bundle
from tests._services import needs_mosquitto, wait_for

pytestmark = [pytest.mark.slow, needs_mosquitto]


def _meminfo(path: Path, available_kib: int) -> None:
    path.write_text(f"MemTotal:        4031428 kB\nMemFree:  20480 kB\nMemAvailable:   {available_kib} kB\n")


def _scraped(url: str, sample: str, token: str | None = None, **labels: str) -> float:
    """The sum of ``sample`` over the series whose labels include ``labels``, from /metrics."""
    request = urllib.request.Request(url)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(request, timeout=10) as response:
        text = response.read().decode()
    family = re.sub(r"_(total|count|sum|bucket|created)$", "", sample)
    return float(
        sum(
            s.value
            for f in text_string_to_metric_families(text)
            if f.name == family
            for s in f.samples
            if s.name == sample and set(labels.items()) <= set(s.labels.items())
        )
    )


def _events(fleet: Fleet, kind: str, release: str) -> list[dict[str, Any]]:
    assert fleet.monitor is not None
    return [e for e in fleet.monitor.events("pi-1", kind) if e.get("release") == release]


def test_an_agent_short_of_memory_refuses_before_downloading(fleet: Fleet, tmp_path):
    out = tmp_path / "bundles"
    with np.load(DIGITS / "eval.npz") as data:
        np.savez(tmp_path / "eval-small.npz", x=data["x"][:24], y=data["y"][:24])
    first = build_digits(DIGITS / "model.onnx", "1.0.0", out, tmp_path / "eval-small.npz", profile=PROFILE)
    second = rewrite_bundle(first, out / f"digits-1.0.1-{PROFILE}", "1.0.1")
    peak = read_manifest(first).memory
    assert peak is not None
    assert peak.peak_bytes > 0

    meminfo = tmp_path / "meminfo"
    _meminfo(meminfo, 8 * 1024)  # 8 MiB: less than the model's peak and the headroom
    agent = fleet.add_agent(
        "pi-1", install={"meminfo_path": str(meminfo), "cgroup_root": str(tmp_path / "no-cgroup")}
    )
    up(fleet)
    fleet.publish(first, second)
    signed = fleet.repo.load("targets").signed.targets[f"digits/1.0.0/{PROFILE}/model.onnx"]
    assert signed.unrecognized_fields["custom"]["edgec"]["peak_memory_bytes"] == peak.peak_bytes
    agent.start()

    fleet.assign("pi-1", "digits:1.0.0")
    assert wait_for(lambda: _events(fleet, "refused", "digits:1.0.0"), 60), agent.log.read_text()[-3000:]
    (refusal,) = _events(fleet, "refused", "digits:1.0.0")
    assert refusal["step"] == "fit"
    detail = refusal["detail"]
    assert f"({peak.peak_bytes} bytes, measured at build)" in detail
    assert f"> 8.0 MiB available ({8 * 1024 * 1024} bytes, MemAvailable in {meminfo})" in detail
    # nothing was downloaded: no file in staging or models, no chunk served, none counted
    assert _events(fleet, "fetched", "digits:1.0.0") == []
    assert [p for p in (agent.state / "staging").rglob("*") if p.is_file()] == []
    assert [p for p in (agent.state / "models").rglob("*") if p.is_file()] == []
    assert _scraped(agent.url("/metrics"), "edgec_agent_fetched_bytes_total") == 0
    server = f"http://127.0.0.1:{fleet.http_port}/metrics"
    assert _scraped(server, "edgec_server_fetch_bytes_total", fleet.token) == 0
    assert wait_for(
        lambda: _scraped(server, "edgec_server_device_events_total", fleet.token, event="refused") == 1, 30
    )

    # memory freed on the device: the next release fits and is installed
    _meminfo(meminfo, 2 * 1024 * 1024)
    fleet.assign("pi-1", "digits:1.0.1")
    assert wait_for(lambda: fleet.device("pi-1")["installed_release"] == "digits:1.0.1", 60), (
        agent.log.read_text()[-3000:]
    )
    release_bytes = sum(f.stat().st_size for f in second.iterdir())
    assert _scraped(server, "edgec_server_fetch_bytes_total", fleet.token) == release_bytes
    print("memory fit:", json.dumps({"peak_bytes": peak.peak_bytes, "refused": detail}))
