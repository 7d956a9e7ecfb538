"""An agent older than its server: a director document with a newer major ``schema_version``
is refused and reported as an install event the server reads, saying to upgrade the agent.

A real agent (not started: its events wait for the broker, as they do while it is away), a
real repository's provisioning, and a document signed with the real director key.
"""

from __future__ import annotations

import json

import paho.mqtt.client as mqtt

from agent.config import AgentConfig, MqttSettings, TrustSettings
from agent.daemon import Agent
from edgec.director import Action, DirectorDocument, DirectorFile, canonical_json
from edgec.reports import Event
from ota_server.ingest import ReportLimits, parse_report
from ota_server.repository import ImageRepository

PASS = b"newer documents"
PROFILE = "x86-64-cpu"


def test_director_document_from_a_newer_server_is_refused_with_an_install_event(tmp_path):
    repo = ImageRepository.init(tmp_path / "repo", PASS, {}, keys=tmp_path / "keys")
    root, director_key = repo.provisioning()
    agent = Agent(
        AgentConfig(
            device="pi-1",
            fleet="lab",
            profile=PROFILE,
            state_dir=tmp_path / "device",
            mqtt=MqttSettings(username="pi-1", password="unused"),
            trust=TrustSettings(root=root, director_key=director_key),
        )
    )
    today = DirectorDocument(
        fleet="lab",
        device="pi-1",
        profile=PROFILE,
        version=1,
        expires="2099-01-01T00:00:00Z",
        rollout="r1",
        action=Action.INSTALL,
        release="digits:2.0.0",
        files=[DirectorFile(path=f"digits/2.0.0/{PROFILE}/model.onnx", sha256="ab" * 32, length=10)],
    )
    signed = {**today.model_dump(mode="json"), "schema_version": 2, "delta_from": "digits:1.0.0"}
    signature = repo.director_signer(PASS).sign(canonical_json(signed))
    message = mqtt.MQTTMessage(topic=agent.topics["desired"].encode())
    message.payload = json.dumps(
        {"signed": signed, "signatures": [{"keyid": signature.keyid, "sig": signature.signature}]}
    ).encode()

    agent._on_desired(None, None, message)  # as paho hands over the retained document

    assert agent.core.take_desired() is None  # nothing reaches the installer
    [sent] = agent.reporter._waiting  # the event, as it goes out on the events topic
    event = parse_report("events", sent.encode(), ReportLimits())  # and as the server reads it
    assert isinstance(event, Event)
    assert (event.event, event.release, event.step) == ("refused", "digits:2.0.0", "accept")
    assert event.detail == (
        "director document has schema_version 2, from a newer server; "
        "this edgec 0.1.0 reads schema_version 1 and older: upgrade the agent"
    )
