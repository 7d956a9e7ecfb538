"""The agent's Prometheus metrics: a real server, real requests over HTTP, ``GET /metrics``
parsed with prometheus_client's own text parser, and figures that match what the test did."""

from __future__ import annotations

import json
import tomllib
from collections.abc import Iterable
from typing import Any

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families
from pydantic import ValidationError

from agent.config import AgentConfig
from agent.drift import DriftConfig
from agent.metrics import MAX_VERSIONS, AgentMetrics
from agent.runtime import load_bundle
from agent.serving import InferenceServer
from agent.slot import ModelSlot
from agent.telemetry import WindowRecorder
from agent.trust import TrustedRepository
from edgec.director import Action, SignedDirectorDocument
from edgec.manifest import read_manifest
from ota_server.director import DirectorIssuer, release_files
from ota_server.registry import Registry
from ota_server.repository import ImageRepository
from tests.agent.test_install import PASS, PROFILE, Recorder, _installer
from tests.agent.test_serving import INFER, Client, infer_document

Samples = list[tuple[str, dict[str, str], float]]


def scrape(client: Client) -> tuple[dict[str, str], Samples]:
    """``GET /metrics``: the answer's headers and every sample (name, labels, value)."""
    status, headers, body = client.request("GET", "/metrics")
    assert status == 200, body
    samples = [
        (s.name, dict(s.labels), s.value)
        for family in text_string_to_metric_families(body.decode("utf-8"))
        for s in family.samples
    ]
    return headers, samples


def value(samples: Samples, name: str, **labels: str) -> float | None:
    """The one sample ``name`` with exactly ``labels``; None when there is none."""
    found = [v for n, got, v in samples if n == name and got == labels]
    assert len(found) <= 1, f"{name} {labels} appears {len(found)} times"
    return found[0] if found else None


def total(samples: Samples, name: str) -> float:
    return sum(v for n, _, v in samples if n == name)


@pytest.fixture
def samples(digits_bundles) -> np.ndarray:
    with np.load(digits_bundles["x86-64-cpu"] / "golden.npz") as golden:
        return golden["inputs/x"]  # [8, 1, 1, 8, 8]


@pytest.fixture
def served(digits_bundles):
    """(server, client, metrics, recorder) over the digits model, with a telemetry recorder
    that closes windows on request; everything stops after the test."""
    bundle = digits_bundles["x86-64-cpu"]
    slot = ModelSlot()
    metrics = AgentMetrics()
    slot.swap(metrics.timed_load(load_bundle)(bundle))
    manifest = read_manifest(bundle)
    recorder = WindowRecorder(
        manifest.reference_stats,
        window_s=3600,
        model="digits:1.0.0",
        drift=DriftConfig(min_values=100, min_samples=5),
    )
    server = InferenceServer(
        slot,
        on_request=lambda version, *rest: recorder.record(f"digits:{version}", *rest),
        metrics=metrics,
    )
    client = Client(server.start())
    yield server, client, metrics, recorder
    client.close()
    server.stop()


def send(client: Client, requests: Iterable[tuple[str, Any]]) -> list[int]:
    return [client.post(path, document)[0] for path, document in requests]


# --------------------------------------------------------------------------- requests


def test_metrics_count_exactly_the_requests_sent(served, samples):
    _, client, _, _ = served
    good = [(INFER, infer_document(samples[i % len(samples)])) for i in range(12)]
    versioned = [("/v2/models/digits/versions/1.0.0/infer", infer_document(samples[0]))] * 3
    bad_input = [
        (INFER, infer_document(samples[0][..., :4])),  # wrong shape
        (INFER, {"inputs": [{"name": "x", "shape": [1], "datatype": "NOPE", "data": [1]}]}),
    ]
    not_json = [(INFER, b"{not json")]
    unknown = [
        ("/v2/models/other/infer", infer_document(samples[0])),
        ("/v2/models/digits/versions/9/infer", {}),
    ]
    assert send(client, good + versioned) == [200] * 15
    assert send(client, bad_input + not_json) == [400] * 3
    assert send(client, unknown) == [404] * 2
    for path in ("/v2/health/live", "/v2/models/digits", "/v2"):  # not inference: not counted
        assert client.request("GET", path)[0] == 200

    headers, got = scrape(client)
    assert headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    requests = "edgec_agent_requests_total"
    assert value(got, requests, model="digits", version="1.0.0", status="200") == 15
    assert value(got, requests, model="digits", version="1.0.0", status="400") == 3
    assert value(got, requests, model="", version="", status="404") == 2  # named no model served here
    assert total(got, requests) == 20
    duration = "edgec_agent_request_duration_seconds"
    assert value(got, duration + "_count", model="digits") == 18
    assert value(got, duration + "_count", model="") == 2
    assert value(got, duration + "_bucket", model="digits", le="+Inf") == 18
    assert 0 < value(got, duration + "_sum", model="digits") < 18 * 1.0
    assert value(got, "process_resident_memory_bytes") > 10 << 20  # numpy and onnxruntime are in
    info = [labels for name, labels, v in got if name == "edgec_agent_model_info" and v == 1]
    assert info == [
        {
            "model": "digits",
            "version": "1.0.0",
            "format": "onnx",
            "precision": "fp32",
            "profile": "x86-64-cpu",
        }
    ]
    assert 0 < value(got, "edgec_agent_model_load_seconds", model="digits", version="1.0.0") < 60

    assert send(client, good[:4]) == [200] * 4  # the counters go on from there
    _, again = scrape(client)
    assert value(again, requests, model="digits", version="1.0.0", status="200") == 19
    assert value(again, duration + "_count", model="digits") == 22


def test_a_runtime_failure_counts_as_a_500_of_the_model(digits_bundles, samples):
    """A model whose session fails is the server's fault: a 500 under the model's labels."""
    model = load_bundle(digits_bundles["x86-64-cpu"])

    class Broken:
        manifest = model.manifest

        def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            raise RuntimeError("the accelerator went away")

        def close(self) -> None:
            model.close()

    slot = ModelSlot()
    slot.swap(Broken())
    metrics = AgentMetrics()
    with InferenceServer(slot, metrics=metrics) as server:
        client = Client(server.port)
        assert send(client, [(INFER, infer_document(samples[0]))] * 2) == [500, 500]
        _, got = scrape(client)
        client.close()
    assert value(got, "edgec_agent_requests_total", model="digits", version="1.0.0", status="500") == 2
    assert value(got, "edgec_agent_requests_total", model="digits", version="1.0.0", status="200") == 0


def test_requests_before_any_model_is_installed_count_as_unserved_503s(samples):
    metrics = AgentMetrics(process=False)
    with InferenceServer(ModelSlot(), metrics=metrics) as server:
        client = Client(server.port)
        assert send(client, [(INFER, infer_document(samples[0]))] * 3) == [503] * 3
        _, got = scrape(client)
        client.close()
    assert value(got, "edgec_agent_requests_total", model="", version="", status="503") == 3
    assert not [s for s in got if s[0] == "edgec_agent_model_info"]  # nothing served, no info
    assert value(got, "process_resident_memory_bytes") is None  # process=False: left out


def test_a_client_cannot_create_series_with_the_names_it_sends(served, samples):
    """Label values come from the served model, never from the path a client chose: a
    thousand made-up model names leave one series (the unserved one), not a thousand."""
    _, client, _, _ = served
    made_up = [(f"/v2/models/m{i}/versions/v{i}/infer", infer_document(samples[0])) for i in range(1000)]
    assert set(send(client, made_up)) == {404}
    _, got = scrape(client)
    series = [labels for name, labels, _ in got if name == "edgec_agent_requests_total"]
    assert {(s["model"], s["version"]) for s in series} == {("", "")}
    assert value(got, "edgec_agent_requests_total", model="", version="", status="404") == 1000
    assert not any("m1" in json.dumps(labels) for _, labels, _ in got)


def test_a_device_that_installs_for_years_keeps_a_bounded_number_of_series(digits_bundles):
    """Each new version adds series; past MAX_VERSIONS the oldest version's go."""
    manifest = read_manifest(digits_bundles["x86-64-cpu"])
    metrics = AgentMetrics(process=False)
    for i in range(3 * MAX_VERSIONS):
        version = manifest.model_copy(update={"version": f"1.0.{i}"})
        metrics.series(version).observe(200, 0.001)
        metrics.series(version).observe(400, 0.001)
        metrics.observe_load(version, 0.5)
    got = [
        (s.name, s.labels)
        for family in text_string_to_metric_families(metrics.exposition().decode())
        for s in family.samples
    ]
    versions = {labels["version"] for name, labels in got if name == "edgec_agent_requests_total"}
    assert versions == {f"1.0.{i}" for i in range(2 * MAX_VERSIONS, 3 * MAX_VERSIONS)}
    loads = {labels["version"] for name, labels in got if name == "edgec_agent_model_load_seconds"}
    assert loads == versions


def test_metrics_answers_only_get_and_head(served):
    _, client, _, _ = served
    status, headers, body = client.request("HEAD", "/metrics")
    assert (status, body) == (200, b"")
    assert int(headers["content-length"]) > 1000
    status, _, body = client.request("POST", "/metrics", b"{}")
    assert status == 405
    assert json.loads(body) == {"error": "/metrics takes GET, not POST"}
    assert client.request("GET", "/metrics?name[]=process_cpu_seconds_total")[0] == 200


def test_an_agent_with_metrics_off_has_no_metrics_endpoint(digits_slot_fixture):
    with InferenceServer(digits_slot_fixture) as server:
        client = Client(server.port)
        status, _, body = client.request("GET", "/metrics")
        client.close()
    assert status == 404
    assert "KServe v2" in json.loads(body)["error"]


def test_metrics_are_on_by_default_and_a_typo_in_the_setting_fails(tmp_path):
    base = "device = 'pi-01'\nfleet = 'lab'\nprofile = 'x86-64-cpu'\n[mqtt]\nusername = 'u'\npassword = 'p'\n"
    assert AgentConfig.model_validate(tomllib.loads(base)).metrics.enabled
    off = AgentConfig.model_validate(tomllib.loads(base + "[metrics]\nenabled = false\n"))
    assert not off.metrics.enabled
    with pytest.raises(ValidationError, match=r"metrics\.enable\b"):
        AgentConfig.model_validate(tomllib.loads(base + "[metrics]\nenable = false\n"))


@pytest.fixture
def digits_slot_fixture(digits_bundles) -> ModelSlot:
    slot = ModelSlot()
    slot.swap(load_bundle(digits_bundles["x86-64-cpu"]))
    return slot


# --------------------------------------------------------------------------- drift


def test_the_drift_gauge_shows_each_tensors_psi_once_a_window_closed(served, samples):
    _, client, metrics, recorder = served
    _, before = scrape(client)
    assert not [s for s in before if s[0] == "edgec_agent_drift_psi"]
    shifted = samples * 4.0 + 3.0  # far from the reference statistics
    assert send(client, [(INFER, infer_document(shifted[i % len(shifted)])) for i in range(24)]) == [200] * 24
    window = recorder.close_window()
    assert window.psi, "the window saw enough values for a PSI"
    metrics.observe_window(window)
    _, got = scrape(client)
    drift = {
        labels["tensor"]: v
        for name, labels, v in got
        if name == "edgec_agent_drift_psi" and labels["model"] == "digits" and labels["version"] == "1.0.0"
    }
    assert drift == pytest.approx(window.psi)
    assert drift["x"] > 0.25  # a drift verdict

    recorder.set_reference("digits:2.0.0", [])  # another model: its window replaces the gauges
    window = window.model_copy(update={"model": "digits:2.0.0", "psi": {"x": 0.01}})
    metrics.observe_window(window)
    _, got = scrape(client)
    drift_series = [labels for name, labels, _ in got if name == "edgec_agent_drift_psi"]
    assert drift_series == [{"model": "digits", "version": "2.0.0", "tensor": "x"}]


# --------------------------------------------------------------------------- installs


def exposed(metrics: AgentMetrics) -> Samples:
    return [
        (s.name, dict(s.labels), s.value)
        for family in text_string_to_metric_families(metrics.exposition().decode())
        for s in family.samples
    ]


def step(samples: Samples) -> str:
    (current,) = [
        labels["edgec_agent_install_step"]
        for name, labels, v in samples
        if name == "edgec_agent_install_step" and v
    ]
    return current


@pytest.fixture
def world(tmp_path, releases):
    """test_install's world, with 4.0.0 (fails probation) published too."""
    repo = ImageRepository.init(tmp_path / "repo", PASS, {}, keys=tmp_path / "keys")
    repo.publish([releases[v] for v in ("1.0.0", "2.0.0", "3.0.0", "4.0.0")], PASS)
    issuer = DirectorIssuer(Registry.open(f"sqlite:///{tmp_path / 'fleet.db'}"), repo.director_signer(PASS))

    def document(release: str) -> SignedDirectorDocument:
        files = release_files(repo.load("targets").signed.targets, release, PROFILE)
        return issuer.issue(
            fleet="lab",
            device="pi-1",
            profile=PROFILE,
            rollout="manual",
            action=Action.INSTALL,
            release=release,
            files=files,
        )

    state = tmp_path / "device"
    TrustedRepository.provision(state, (repo.metadata_dir / "1.root.json").read_bytes())
    return {"repo": repo, "document": document, "state": state}


def test_real_installs_are_counted_by_outcome(world):
    """Three real installs (two committed, one refused at its self-test), then one that fails
    probation and rolls back, through the installer with the metrics' reporter."""
    metrics = AgentMetrics(process=False)
    reporter = Recorder()
    installer = _installer(world, reporter=metrics.reporting(reporter))
    installer.loader = metrics.timed_load(load_bundle)
    assert step(exposed(metrics)) == "idle"
    for release in ("digits:1.0.0", "digits:2.0.0", "digits:3.0.0"):
        installer.handle(world["document"](release))
    installer.handle(world["document"]("digits:4.0.0"))

    got = exposed(metrics)
    kinds = reporter.kinds()
    assert kinds.count("committed") == 2
    outcomes = {labels["outcome"]: v for name, labels, v in got if name == "edgec_agent_installs_total"}
    assert outcomes == {"committed": 2, "refused": 1, "rolled_back": 1, "failed": 0}
    events = {labels["event"]: v for name, labels, v in got if name == "edgec_agent_install_events_total"}
    assert events["accepted"] == kinds.count("accepted") == 4
    assert events["fetched"] == kinds.count("fetched") > 0
    assert events["swapped"] == kinds.count("swapped") == 3  # 1.0.0, 2.0.0 and 4.0.0 served
    fetched = sum(e["fetched_bytes"] for e in reporter.events if e["event"] == "fetched")  # delta: not reused
    assert value(got, "edgec_agent_fetched_bytes_total") == fetched > 0
    assert step(got) == "idle"
    loads = {labels["version"] for name, labels, _ in got if name == "edgec_agent_model_load_seconds"}
    assert {"1.0.0", "2.0.0", "3.0.0", "4.0.0"} <= loads


def test_install_events_move_the_step_and_odd_figures_never_raise():
    metrics = AgentMetrics(process=False)
    metrics.observe_event("accepted", "digits:2.0.0", {})
    assert step(exposed(metrics)) == "accepted"
    metrics.observe_event("fetched", "digits:2.0.0", {"file": 1, "of": 3, "bytes": 100, "resumed_at": 40})
    assert step(exposed(metrics)) == "fetching"
    metrics.observe_event(
        "fetched", "digits:2.0.0", {"file": 3, "of": 3, "bytes": "lots", "resumed_at": None}
    )
    assert step(exposed(metrics)) == "fetched"
    metrics.observe_event("swapped", "digits:2.0.0", {})
    assert step(exposed(metrics)) == "probation"
    metrics.observe_event("error", None, {})  # a start-up problem, not an install's end
    assert step(exposed(metrics)) == "probation"
    metrics.observe_event("refused", "digits:2.0.0", {"step": "probation"})
    metrics.observe_event("something-new", None, {"step": object()})
    got = exposed(metrics)
    assert step(got) == "idle"
    assert value(got, "edgec_agent_fetched_bytes_total") == 60
    assert value(got, "edgec_agent_installs_total", outcome="rolled_back") == 1
    assert value(got, "edgec_agent_install_events_total", event="other") == 1
