"""A shadow run by hand on the local API (``/v2/shadow``, agent._shadow_api) and through
``edgec agent shadow``: a real InferenceServer serving a real digits bundle, real candidates.

The last test runs the daemon's own server (an ``agent.daemon.Agent``, not connected to a
broker), whose shadow root is ``field-tests/`` in its state folder.

The bundles, all built by ``edgec build`` under the shadow root:

- serving  digits 1.0.0, the sample;
- same     digits 1.0.1, the same network built again: it agrees on every request;
- changed  digits 2.0.0, class ``NEVER`` never predicted (tests/agent/test_shadow.py): it
           disagrees exactly where the serving model predicts ``NEVER``.
"""

from __future__ import annotations

import http.client
import json
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest

from agent._shadow_api import MAX_BODY_BYTES, ShadowControl
from agent.config import AgentConfig, HttpSettings, InstallSettings, MqttSettings, TrustSettings
from agent.daemon import Agent
from agent.runtime import load_bundle
from agent.serving import InferenceServer
from agent.shadow import ShadowPlan, ShadowRun, ShadowTap
from agent.slot import ModelSlot
from cli import main
from localfleet.releases import build_digits
from ota_server.repository import ImageRepository
from tests._cli import DIGITS
from tests.agent.test_serving import infer_document
from tests.agent.test_shadow import NEVER, never_class

INFER = "/v2/models/digits/infer"


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("state") / "field-tests"


@pytest.fixture(scope="module")
def bundles(root: Path, tmp_path_factory) -> dict[str, Path]:
    sources = tmp_path_factory.mktemp("sources")
    changed = sources / "changed.onnx"
    onnx.save(never_class(onnx.load(str(DIGITS / "model.onnx")), NEVER), str(changed))
    return {
        "serving": build_digits(DIGITS / "model.onnx", "1.0.0", sources / "serving", DIGITS / "eval.npz"),
        "same": build_digits(DIGITS / "model.onnx", "1.0.1", root, DIGITS / "eval.npz"),
        "changed": build_digits(changed, "2.0.0", root, DIGITS / "eval.npz"),
    }


@pytest.fixture(scope="module")
def inputs() -> np.ndarray:
    with np.load(DIGITS / "eval.npz") as data:
        return np.asarray(data["x"][:200], dtype=np.float32)


@pytest.fixture
def server(bundles: dict[str, Path], root: Path) -> Iterator[InferenceServer]:
    slot = ModelSlot()
    slot.swap(load_bundle(bundles["serving"]))
    tap = ShadowTap()
    control = ShadowControl(tap, slot, root, cpu_budget=1.0)  # a whole core: nothing skipped here
    with InferenceServer(slot, on_infer=tap.offer, shadow=control) as server:
        yield server
    assert tap.run is None, "a run was left attached after the server stopped"


def call(server: InferenceServer, method: str, body: Any = None) -> tuple[int, dict[str, Any]]:
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    try:
        data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
        connection.request(method, "/v2/shadow", body=data)
        response = connection.getresponse()
        return response.status, json.loads(response.read() or b"null")
    finally:
        connection.close()


def serve(server: InferenceServer, xs: np.ndarray) -> list[int]:
    """Each input as one infer request; the served model's class for each."""
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    classes = []
    try:
        for x in xs:
            connection.request("POST", INFER, body=json.dumps(infer_document(x[None])).encode())
            response = connection.getresponse()
            answer = json.loads(response.read())
            assert response.status == 200, answer
            classes.append(int(np.argmax(answer["outputs"][0]["data"])))
    finally:
        connection.close()
    return classes


def until_done(server: InferenceServer, timeout_s: float = 30.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        status, figures = call(server, "GET")
        assert status == 200, figures
        if figures["state"] == "done":
            return figures
        assert time.monotonic() < deadline, f"the run did not end: {figures}"
        time.sleep(0.05)


def test_the_same_model_built_again_agrees_on_every_request(server, bundles, inputs) -> None:
    status, started = call(server, "POST", {"bundle": str(bundles["same"]), "requests": 50, "sample": 1.0})
    assert status == 202, started
    assert (started["release"], started["serving"]) == ("digits:1.0.1", "digits:1.0.0")
    serve(server, inputs[:80])
    figures = until_done(server)
    assert figures["id"] == started["id"]
    assert (figures["reason"], figures["compared"], figures["errors"]) == ("requests", 50, 0)
    assert figures["agreement"] == 1.0
    assert figures["outputs"] == {"logits": 1.0}
    assert figures["p50_ms"] > 0
    assert figures["serving_p99_ms"] >= figures["serving_p50_ms"] > 0
    assert server.shadow is not None
    assert server.shadow.tap.run is None, "an ended run stays attached"


def test_a_changed_model_disagrees_where_it_changed(server, bundles, inputs) -> None:
    status, started = call(
        server, "POST", {"bundle": "digits-2.0.0-x86-64-cpu", "duration_s": 60, "sample": 1}
    )
    assert status == 202, started  # a relative path is taken under the root
    classes = serve(server, inputs)
    status, figures = call(server, "DELETE")
    assert (status, figures["state"], figures["reason"]) == (200, "done", "stopped"), figures
    assert figures["offered"] == len(inputs)
    assert figures["compared"] > 0
    changed = classes.count(NEVER)
    assert changed > 0, "no input of the class the candidate never predicts: pick other inputs"
    if figures["compared"] == len(inputs):  # nothing dropped: every request compared
        assert figures["agreement"] == pytest.approx(1 - changed / len(inputs))
    else:
        assert figures["agreement"] < 1.0, figures
    assert figures["outputs"]["logits"] == figures["agreement"]


def test_one_run_at_a_time(server, bundles) -> None:
    status, first = call(server, "POST", {"bundle": str(bundles["same"]), "duration_s": 60})
    assert status == 202, first
    status, refusal = call(server, "POST", {"bundle": str(bundles["changed"]), "duration_s": 60})
    assert status == 409, refusal
    assert "digits:1.0.1" in refusal["error"], refusal
    assert call(server, "GET")[1]["state"] == "running"
    assert call(server, "DELETE")[0] == 200
    status, second = call(server, "POST", {"bundle": str(bundles["changed"]), "requests": 5})
    assert status == 202, second
    assert second["id"] != first["id"]


def test_a_run_the_agent_started_itself_makes_the_api_busy(server, bundles) -> None:
    assert server.shadow is not None
    tap, slot = server.shadow.tap, server.slot
    assert slot.model is not None
    candidate = load_bundle(bundles["same"])
    run = ShadowRun(candidate, slot.model.manifest, ShadowPlan(duration_s=60))
    tap.attach(run)
    try:
        status, refusal = call(server, "POST", {"bundle": str(bundles["changed"]), "duration_s": 60})
        assert status == 409, refusal
        assert "in progress" in refusal["error"], refusal
    finally:
        tap.detach(run)
        run.close()
        candidate.close()


def test_bad_requests_are_refused_with_one_line(server, bundles, root, tmp_path) -> None:
    outside = tmp_path / "outside"
    shutil.copytree(bundles["same"], outside)
    (root / "link").symlink_to(outside)
    (root / "empty").mkdir()
    damaged = root / "damaged"
    shutil.copytree(bundles["same"], damaged)
    model = next(p for p in damaged.iterdir() if p.suffix == ".onnx")
    model.write_bytes(model.read_bytes()[:-1] + b"\0")
    cases = [
        (b"{not json", 400, "not JSON"),
        (b"[1, 2]", 400, "JSON object"),
        ({"bundle": str(outside), "duration_s": 5}, 400, "not under the shadow root"),
        ({"bundle": "../outside", "duration_s": 5}, 400, "not under the shadow root"),
        ({"bundle": "link", "duration_s": 5}, 400, "not under the shadow root"),
        ({"bundle": "missing", "duration_s": 5}, 400, "no such folder"),
        ({"bundle": "empty\u0000", "duration_s": 5}, 400, "path of a bundle folder"),
        ({"bundle": "digits-1.0.1-x86-64-cpu"}, 400, "duration or a request count"),
        ({"bundle": "digits-1.0.1-x86-64-cpu", "duration_s": "10m"}, 400, "duration_s must be a number"),
        ({"bundle": "digits-1.0.1-x86-64-cpu", "requests": 2.5}, 400, "requests must be a whole number"),
        ({"bundle": "digits-1.0.1-x86-64-cpu", "requests": 5, "sample": 2}, 400, "sample must be"),
        ({"bundle": "digits-1.0.1-x86-64-cpu", "requests": 5, "cpu": 1}, 400, "unknown field 'cpu'"),
        (b" " * (MAX_BODY_BYTES + 1), 413, "at most"),
        ({"bundle": "empty", "duration_s": 5}, 422, "not a bundle"),
        ({"bundle": "damaged", "duration_s": 5}, 422, "damaged"),
    ]
    for body, expected, words in cases:
        status, answer = call(server, "POST", body)
        assert (status, "\n" in answer["error"]) == (expected, False), (body, answer)
        assert words in answer["error"], (body, answer)
    assert server.shadow is not None
    assert server.shadow.tap.run is None


def test_a_candidate_that_does_not_fit_beside_the_served_model_is_refused(bundles, root, tmp_path) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal: 1048576 kB\nMemAvailable: 8192 kB\n")  # 8 MiB: digits needs more
    settings = InstallSettings(meminfo_path=meminfo, cgroup_root=tmp_path / "no-cgroups")
    slot = ModelSlot()
    slot.swap(load_bundle(bundles["serving"]))
    tap = ShadowTap()
    with InferenceServer(slot, shadow=ShadowControl(tap, slot, root, memory=settings)) as server:
        status, answer = call(server, "POST", {"bundle": str(bundles["same"]), "requests": 5})
        assert status == 422, answer
        assert "two models do not fit at once" in answer["error"], answer
        meminfo.write_text("MemTotal: 1048576 kB\nMemAvailable: 1048576 kB\n")
        status, answer = call(server, "POST", {"bundle": str(bundles["same"]), "requests": 5})
        assert status == 202, answer


def test_the_endpoint_takes_three_methods_and_only_when_given(server, bundles) -> None:
    assert call(server, "GET")[0] == 404  # nothing started yet
    assert call(server, "PUT", b"{}")[0] == 405
    with InferenceServer(server.slot) as plain:
        status, answer = call(plain, "POST", {"bundle": str(bundles["same"]), "duration_s": 5})
        assert status == 404, answer
        assert "no such endpoint" in answer["error"], answer


def test_the_cli_starts_waits_and_prints_the_figures(server, bundles, inputs, capsys) -> None:
    url = server.url
    done = threading.Event()

    def traffic() -> None:
        while not done.is_set():
            serve(server, inputs[:20])

    feeder = threading.Thread(target=traffic, daemon=True)
    feeder.start()
    try:
        code = main(
            [
                "agent",
                "shadow",
                str(bundles["same"]),
                "--requests",
                "30",
                "--sample",
                "1",
                "--url",
                url,
                "--wait",
            ]
        )
    finally:
        done.set()
        feeder.join(10)
    out = capsys.readouterr().out
    assert code == 0, out
    for words in (
        "digits:1.0.1 beside digits:1.0.0",
        "done (requests)",
        "output logits",
        "1.0000",
        "inference ms",
    ):
        assert words in out, out

    assert main(["agent", "shadow", "--show", "--url", url, "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert (shown["compared"], shown["agreement"]) == (30, 1.0)


def test_the_cli_says_busy_unreachable_and_refused_with_distinct_codes(
    server, bundles, capsys, monkeypatch
) -> None:
    url = server.url
    monkeypatch.chdir(bundles["same"].parent)  # a relative BUNDLE that exists here goes as its absolute path
    assert main(["agent", "shadow", bundles["same"].name, "--for", "1m", "--url", url]) == 0
    assert "started" in capsys.readouterr().out
    assert main(["agent", "shadow", str(bundles["changed"]), "--for", "1m", "--url", url]) == 2
    assert "the agent is busy" in capsys.readouterr().err
    assert main(["agent", "shadow", "--stop", "--url", url]) == 0
    assert "done (stopped)" in capsys.readouterr().out
    assert main(["agent", "shadow", "/nowhere", "--for", "1m", "--url", url]) == 2
    assert "not under the shadow root" in capsys.readouterr().err
    assert main(["agent", "shadow", "x", "--url", url]) == 2
    assert "--for 10m, --requests N" in capsys.readouterr().err
    with InferenceServer(server.slot) as plain:
        free = plain.url
    assert main(["agent", "shadow", str(bundles["same"]), "--for", "1m", "--url", free]) == 4
    assert "cannot reach the agent" in capsys.readouterr().err


def test_the_daemon_serves_the_endpoint_under_its_state_folder(bundles, inputs, tmp_path) -> None:
    repo = ImageRepository.init(tmp_path / "repo", b"shadow by hand", {}, keys=tmp_path / "keys")
    trust_root, director_key = repo.provisioning()
    state = tmp_path / "device"
    agent = Agent(
        AgentConfig(
            device="pi-1",
            fleet="lab",
            profile="x86-64-cpu",
            state_dir=state,
            mqtt=MqttSettings(username="pi-1", password="unused"),
            trust=TrustSettings(root=trust_root, director_key=director_key),
            http=HttpSettings(port=0),
        )
    )
    shutil.copytree(bundles["changed"], state / "field-tests" / "candidate")
    shutil.copytree(bundles["same"], state / "elsewhere")
    agent.slot.swap(load_bundle(bundles["serving"]))
    agent.server.start()  # the local API alone: no broker here
    try:
        status, answer = call(agent.server, "POST", {"bundle": str(state / "elsewhere"), "requests": 5})
        assert status == 400, answer
        assert "field-tests" in answer["error"], answer
        status, started = call(agent.server, "POST", {"bundle": "candidate", "requests": 20, "sample": 1})
        assert status == 202, started
        assert agent.shadow.run is not None, "the run is not on the daemon's tap"
        serve(agent.server, inputs[:40])
        figures = until_done(agent.server)
        assert (figures["release"], figures["compared"]) == ("digits:2.0.0", 20)
    finally:
        agent.server.stop()
