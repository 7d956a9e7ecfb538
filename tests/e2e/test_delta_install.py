"""Delta downloads in the whole loop: a real server signs content-defined chunk tables, a real
agent installs digits 1.0.0 over MQTT, then 1.0.1 (the same network with its last layer
retrained), and fetches only the chunks 1.0.0 does not hold."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from localfleet.releases import build_digits
from tests._cli import DIGITS
from tests._fleet import Fleet, up
from tests._releases import PROFILE
from tests._services import needs_mosquitto, wait_for
from tests.e2e.test_memory_fit import _scraped

pytestmark = [pytest.mark.slow, needs_mosquitto]


def _retrained_head(source: Path, dest: Path) -> Path:
    """The digits model with the weights and bias of its last layer (the logits' Gemm) moved
    a little, as a fine-tune of the head would."""
    model = onnx.load(source)
    last = next(n for n in reversed(model.graph.node) if n.op_type in ("Gemm", "MatMul"))
    rng = np.random.default_rng(7)
    for init in model.graph.initializer:
        if init.name in last.input[1:]:
            weights = numpy_helper.to_array(init)
            moved = weights + rng.normal(0, 0.01, weights.shape).astype(weights.dtype)
            init.CopyFrom(numpy_helper.from_array(moved, init.name))
    onnx.save(model, dest)
    return dest


def _fetched(fleet: Fleet, release: str) -> list[dict[str, Any]]:
    assert fleet.monitor is not None
    return [e for e in fleet.monitor.events("pi-1", "fetched") if e.get("release") == release]


def test_an_agent_fetches_only_the_chunks_of_a_fine_tune_it_does_not_hold(fleet: Fleet, tmp_path):
    out = tmp_path / "bundles"
    with np.load(DIGITS / "eval.npz") as data:
        np.savez(tmp_path / "eval-small.npz", x=data["x"][:24], y=data["y"][:24])
    small = tmp_path / "eval-small.npz"
    first = build_digits(DIGITS / "model.onnx", "1.0.0", out, small, profile=PROFILE)
    tuned = _retrained_head(DIGITS / "model.onnx", tmp_path / "digits-tuned.onnx")
    second = build_digits(tuned, "1.0.1", out, small, profile=PROFILE)
    agent = fleet.add_agent("pi-1")
    up(fleet)
    fleet.publish(first, second)
    signed = fleet.repo.load("targets").signed.targets[f"digits/1.0.1/{PROFILE}/model.onnx"]
    assert signed.unrecognized_fields["custom"]["edgec"]["cdc"]["algorithm"] == "fastcdc"
    assert "chunks" in signed.unrecognized_fields["custom"]["edgec"]  # still there for older agents
    agent.start()

    fleet.assign("pi-1", "digits:1.0.0")
    assert wait_for(lambda: fleet.device("pi-1")["installed_release"] == "digits:1.0.0", 60), (
        agent.log.read_text()[-3000:]
    )
    first_bytes = sum(f.stat().st_size for f in first.iterdir())
    assert sum(e["fetched_bytes"] for e in _fetched(fleet, "digits:1.0.0")) == first_bytes  # nothing to reuse

    fleet.assign("pi-1", "digits:1.0.1")
    assert wait_for(lambda: fleet.device("pi-1")["installed_release"] == "digits:1.0.1", 60), (
        agent.log.read_text()[-3000:]
    )
    release_bytes = sum(f.stat().st_size for f in second.iterdir())
    events = _fetched(fleet, "digits:1.0.1")
    fetched = sum(e["fetched_bytes"] for e in events)
    reused = sum(e["reused_bytes"] for e in events)
    assert fetched + reused == release_bytes
    assert fetched < 0.15 * release_bytes, events
    # the device's own count and the server's agree: only those bytes crossed the broker
    assert _scraped(agent.url("/metrics"), "edgec_agent_fetched_bytes_total") == first_bytes + fetched
    server = f"http://127.0.0.1:{fleet.http_port}/metrics"
    assert _scraped(server, "edgec_server_fetch_bytes_total", fleet.token) == first_bytes + fetched
    installed = agent.state / "models" / "digits-1.0.1" / "model.onnx"
    assert installed.read_bytes() == (second / "model.onnx").read_bytes()
    with np.load(DIGITS / "eval.npz") as data:
        assert agent.infer(data["x"][:1])[0] == "1.0.1"  # the assembled model serves
    print(
        "delta install:", json.dumps({"release_bytes": release_bytes, "fetched": fetched, "reused": reused})
    )
