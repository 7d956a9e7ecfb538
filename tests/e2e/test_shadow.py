"""Shadow rollouts on real processes: Mosquitto, the server, two agents serving live traffic.

A release that disagrees with the serving model on about 10 % of inputs (6.0.0 never answers
class 0) is run in shadow by the rollout's wave, judged by ``shadow_agreement<0.98`` and
stopped: no device ever answers with it. A good release (2.0.0: the same predictions, logits
doubled) passes its shadow run and is swapped in; its answers show it serves."""

from __future__ import annotations

import http.cookiejar
import urllib.parse
import urllib.request

import numpy as np
import pytest

from localfleet import LoadGenerator
from tests._cli import DIGITS
from tests._fleet import Fleet, up
from tests._services import needs_mosquitto, wait_for

pytestmark = [pytest.mark.slow, needs_mosquitto]

SHADOW = ("--waves", "100%", "--bake", "1s", "--shadow", "6s", "--shadow-sample", "0.5")
RULES = ("--abort-if", "shadow_agreement<0.98", "--abort-if", "install_failure_rate>0.4")


def _finish(fleet: Fleet, rollout_id: str, timeout_s: float = 120) -> dict:
    ended = ("completed", "aborted")
    assert wait_for(lambda: fleet.rollout_status(rollout_id)["state"] in ended, timeout_s, step_s=0.5), (
        fleet.rollout_status(rollout_id)
    )
    return fleet.rollout_status(rollout_id)


def _dashboard_page(fleet: Fleet, path: str) -> str:
    """``path`` of the dashboard, signed in with the fleet's operator token."""
    jar = http.cookiejar.CookieJar()
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
    base = f"http://127.0.0.1:{fleet.http_port}"
    form = urllib.parse.urlencode({"token": fleet.token, "next": path}).encode()
    with opener.open(base + "/ui/login", data=form, timeout=10) as response:  # follows the 303
        return response.read().decode()


def test_a_shadow_rollout_stops_a_disagreeing_release_before_it_serves_and_passes_a_good_one(
    fleet: Fleet, releases
):
    agents = [fleet.add_agent(f"pi-{n}", install={"shadow_window_s": 2.0}) for n in (1, 2)]
    up(fleet)
    fleet.publish(releases["1.0.0"], releases["2.0.0"], releases["6.0.0"])
    for agent in agents:
        agent.start()
    first = _finish(fleet, fleet.rollout("digits:1.0.0", "--group", "g", "--waves", "100%", "--bake", "1s"))
    assert first["state"] == "completed", first
    assert wait_for(lambda: all(fleet.device(a.device)["status"] == "serving" for a in agents), 60)

    with np.load(DIGITS / "eval.npz") as data:
        x = data["x"][:200]
    load = LoadGenerator([a.http_port for a in agents], x[:, None] if x.ndim == 3 else x, rate_per_s=40)
    load.start()
    try:
        bad = _finish(fleet, fleet.rollout("digits:6.0.0", "--group", "g", *SHADOW, *RULES))
        answered_during_bad = {r.version for r in load.responses}
        good = _finish(fleet, fleet.rollout("digits:2.0.0", "--group", "g", *SHADOW, *RULES))
        assert wait_for(lambda: {r.version for r in load.responses[-20:]} == {"2.0.0"}, 30)
    finally:
        responses = load.stop()

    # the disagreeing release: stopped at shadow by the rule, on the figures the agents measured
    assert bad["state"] == "aborted", bad
    assert "wave 1 in shadow" in bad["reason"]
    assert "shadow_agreement<0.98" in bad["reason"]
    rule = next(r for r in bad["rules"] if r["rule"] == "shadow_agreement<0.98")
    assert 0.8 < rule["canary"] < 0.95  # class 0 is about a tenth of the digits
    assert all(d["state"] == "shadowed" for d in bad["devices"]), bad["devices"]
    for device in bad["devices"]:
        figures = device["shadow"]
        assert figures["compared"] > 0
        assert figures["serving_p50_ms"] is not None
        assert figures["p50_ms"] is not None
    # ... and no device ever answered with it, nor was sent it to serve
    assert answered_during_bad == {"1.0.0"}
    assert "6.0.0" not in {r.version for r in responses}
    assert fleet.monitor is not None
    for agent in agents:
        swapped = [e["release"] for e in fleet.monitor.events(agent.device, "swapped")]
        assert "digits:6.0.0" not in swapped
        assert [e["release"] for e in fleet.monitor.events(agent.device, "shadowed")][:1] == ["digits:6.0.0"]
        assert fleet.monitor.events(agent.device, "shadow"), "windows of the shadow run were reported"

    shown = fleet.edgec("rollout", "status", bad["id"], *fleet.api_args(), show=False).stdout
    assert "shadow run of wave 1: 2 device(s)" in shown
    assert "shadowed" in shown.splitlines()[3]  # the waves table has the shadow states
    page = _dashboard_page(fleet, f"/ui/rollouts/{bad['id']}")
    assert "Shadow run of wave 1" in page
    assert f"<strong>{rule['canary']}</strong>" in page  # the agreement the rule judged

    # the good release: passes its shadow run, then serves
    assert good["state"] == "completed", good["reason"]
    assert all(d["state"] == "installed" for d in good["devices"])
    assert all(d["shadow"]["agreement"] == 1.0 for d in good["devices"])
    for agent in agents:
        assert fleet.device(agent.device)["installed_release"] == "digits:2.0.0"
    errors = [r for r in responses if r.error]
    assert not errors, errors[:3]  # not a request dropped through two shadow runs and a swap


def test_a_shadow_run_is_skipped_where_only_one_model_fits_and_nothing_is_fetched_for_it(
    fleet: Fleet, releases, tmp_path
):
    from edgec.manifest import read_manifest

    peak = read_manifest(releases["2.0.0"]).memory
    assert peak is not None
    serving_peak = read_manifest(releases["1.0.0"]).memory
    assert serving_peak is not None
    # room for the candidate alone (an install), not for both models running at once (a shadow)
    room = (peak.peak_bytes + serving_peak.peak_bytes // 2) // 1024
    meminfo = tmp_path / "meminfo"
    meminfo.write_text(f"MemTotal: 4031428 kB\nMemAvailable: {room} kB\n")
    memory = {"meminfo_path": str(meminfo), "cgroup_root": str(tmp_path / "none"), "memory_headroom_bytes": 0}
    agent = fleet.add_agent("pi-1", install=memory)
    up(fleet)
    fleet.publish(releases["1.0.0"], releases["2.0.0"])
    agent.start()
    fleet.assign("pi-1", "digits:1.0.0")
    assert wait_for(lambda: fleet.device("pi-1")["installed_release"] == "digits:1.0.0", 60)

    done = _finish(fleet, fleet.rollout("digits:2.0.0", "--group", "g", *SHADOW, *RULES))
    assert fleet.monitor is not None
    (shadowed,) = fleet.monitor.events("pi-1", "shadowed")
    assert shadowed["skipped"] is True
    assert "two models do not fit at once" in shadowed["detail"]
    fetched = [e["detail"] for e in fleet.monitor.events("pi-1", "fetched") if e["release"] == "digits:2.0.0"]
    assert fetched == sorted(fetched)
    assert len(fetched) == len(set(fetched))
    # no figures: the shadow rule has no data, the wave goes on to install what fits alone
    assert done["state"] == "completed", done
    assert done["last_judgement"]
    assert all(not r["rule"].startswith("shadow_") for r in done["last_judgement"])
    assert fleet.device("pi-1")["installed_release"] == "digits:2.0.0"
