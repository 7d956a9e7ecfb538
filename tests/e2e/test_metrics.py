"""/metrics of a real agent and of the real server, parsed with prometheus_client's own text
parser, against what the test did: the requests it sent, the install it asked for, the bytes
of the release's files. The Grafana dashboard in deploy/ plots only metrics that exist."""

from __future__ import annotations

import json
import re
import urllib.request
from typing import Any

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests._cli import DIGITS, ROOT
from tests._fleet import Fleet, up
from tests._services import needs_mosquitto, wait_for

pytestmark = [pytest.mark.slow, needs_mosquitto]

GOOD, BAD = 40, 3


def _scrape(url: str, token: str | None = None) -> dict[str, Any]:
    """``{family name: {(sample name, sorted labels): value}}`` from a /metrics page."""
    request = urllib.request.Request(url)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = response.read().decode()
    families: dict[str, Any] = {}
    for family in text_string_to_metric_families(text):
        samples = families.setdefault(family.name, {})
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return families


def _value(families: dict[str, Any], sample: str, **labels: str) -> float:
    """The sum of ``sample`` over the series whose labels include ``labels``."""
    family = re.sub(r"_(total|count|sum|bucket|created|info)$", "", sample)
    found = [
        value
        for (name, have), value in families.get(family, {}).items()
        if name == sample and set(labels.items()) <= set(have)
    ]
    return float(sum(found))


def _post(url: str, body: bytes) -> int:
    request = urllib.request.Request(url, data=body, method="POST")
    request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return int(response.status)
    except urllib.error.HTTPError as e:
        return int(e.code)


def test_agent_and_server_metrics_count_what_happened(fleet: Fleet, releases):
    agent = fleet.add_agent("pi-1")
    up(fleet)
    fleet.publish(releases["1.0.0"])
    agent.start()
    fleet.assign("pi-1", "digits:1.0.0")
    assert wait_for(lambda: fleet.device("pi-1")["status"] == "serving", 60), agent.log.read_text()[-3000:]

    with np.load(DIGITS / "eval.npz") as data:
        x = data["x"][:GOOD]
    for i in range(GOOD):
        version, _ = agent.infer(x[i : i + 1])
        assert version == "1.0.0"
    for _ in range(BAD):
        assert _post(agent.url("/v2/models/digits/infer"), b'{"inputs": "not a list"}') == 400

    # the agent: every request by status, the latency histogram, the install, the bytes fetched
    mine = _scrape(agent.url("/metrics"))
    assert _value(mine, "edgec_agent_requests_total", status="200", version="1.0.0") == GOOD
    assert _value(mine, "edgec_agent_requests_total", status="400") == BAD
    assert _value(mine, "edgec_agent_request_duration_seconds_count") == GOOD + BAD
    assert _value(mine, "edgec_agent_installs_total", outcome="committed") == 1
    assert _value(mine, "edgec_agent_model_load_seconds", version="1.0.0") > 0
    assert _value(mine, "process_resident_memory_bytes") > 10 * 2**20

    # the server: the same bytes sent, the install event, the device serving, reports taken in
    desired = fleet.monitor.of("pi-1", "desired")[-1]
    release_bytes = sum(f["length"] for f in desired["signed"]["files"])
    assert wait_for(lambda: fleet.device("pi-1")["telemetry"] is not None, 30)
    server = _scrape(f"http://127.0.0.1:{fleet.http_port}/metrics", fleet.token)
    fetched = _value(server, "edgec_server_fetch_bytes_total", transport="mqtt")
    assert fetched == release_bytes == _value(mine, "edgec_agent_fetched_bytes_total")
    assert _value(server, "edgec_server_device_events_total", event="committed") == 1
    assert _value(server, "edgec_server_devices", status="serving") == 1
    assert _value(server, "edgec_server_reports_total", kind="telemetry") >= 1
    assert _value(server, "edgec_server_report_lag_seconds_count") >= 1
    assert _value(server, "edgec_server_mqtt_connects_total") == 1
    # /metrics is a viewer's: an anonymous scrape is refused
    with pytest.raises(urllib.error.HTTPError) as refused:
        _scrape(f"http://127.0.0.1:{fleet.http_port}/metrics")
    assert refused.value.code == 401

    # every metric the Grafana dashboard plots is one of these
    dashboard = json.loads((ROOT / "deploy" / "grafana" / "edgec-fleet.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", [])]
    used = {
        re.sub(r"_(total|count|sum|bucket)$", "", m)
        for e in exprs
        for m in re.findall(r"[a-z_]+(?=[{\[)]|$)", e)
    }
    known = set(mine) | set(server)
    plotted = {m for m in used if m.startswith(("edgec_", "process_"))}
    assert len(plotted) >= 10
    assert plotted <= known, sorted(plotted - known)
