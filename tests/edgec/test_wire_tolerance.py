"""Wire documents across versions: a newer writer's unknown fields are kept and ignored at every
level, signatures cover the document as it was received (unknown fields included), and only a
newer major ``schema_version`` is refused, with an error that says to upgrade the reader.

Director documents are signed with a real ed25519 key by the server's signing code and checked
by the device's director state machine; manifests are read from real files.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

import pytest
from securesystemslib.signer import CryptoSigner

from agent.director import DirectorState
from edgec.director import (
    Action,
    DirectorDocument,
    DirectorFile,
    SignedDirectorDocument,
    canonical_json,
    parse_signed_document,
)
from edgec.errors import (
    BundleError,
    NewerBundleError,
    NewerDirectorDocumentError,
    NewerSchemaError,
    TrustError,
)
from edgec.manifest import (
    BundleStatus,
    FileEntry,
    Manifest,
    Metrics,
    OutputKind,
    OutputMetrics,
    Precision,
    ProfileRef,
    SourceRef,
    TargetFormat,
    TensorSpec,
    TensorStats,
    Verification,
    parse_manifest,
    read_manifest,
)
from edgec.reports import DeviceState, Event, Telemetry
from edgec.trt_plan import TensorRtPlan
from ota_server.director import sign_document
from ota_server.ingest import ReportLimits, ReportRefused, parse_report

NOW = dt.datetime(2026, 11, 29, 12, 0, tzinfo=dt.UTC)
SHA = "ab" * 32
DEVICE, PROFILE, RELEASE = "pi-1", "x86-64-cpu", "digits:2.0.0"
TARGET = f"digits/2.0.0/{PROFILE}/model.onnx"
LIMITS = ReportLimits()


# -- documents as today's writers make them ---------------------------------------------------------
def _manifest_data() -> dict[str, Any]:
    return Manifest(
        name="digits",
        version="2.0.0",
        profile=ProfileRef(id=PROFILE, sha256=SHA),
        format=TargetFormat.ONNX,
        precision=Precision.FP32,
        created_at="2026-11-29T12:00:00+00:00",
        files=[FileEntry(path="model.onnx", sha256=SHA, length=1234)],
        model_file="model.onnx",
        inputs=[TensorSpec(name="x", shape=[1, 1, 8, 8], dtype="float32")],
        outputs=[TensorSpec(name="logits", shape=[1, 10], dtype="float32", kind=OutputKind.CLASSIFICATION)],
        verification=Verification(
            status=BundleStatus.OK,
            data="eval",
            gate={"cosine": 0.99},
            metrics=Metrics(
                samples=8,
                cosine=1.0,
                outputs=[OutputMetrics(name="logits", kind=OutputKind.CLASSIFICATION, cosine=1.0)],
            ),
        ),
        reference_stats=[
            TensorStats(
                name="x",
                count=3,
                mean=0.1,
                std=1.0,
                min=-1,
                max=1,
                bin_edges=[-1, 0, 1],
                bin_fractions=[0.5, 0.5],
            )
        ],
        max_latency_ms=50.0,
        tool_versions={"edgec": "0.1.0"},
        source=SourceRef(filename="model.onnx", format="onnx", sha256=SHA),
    ).model_dump(mode="json")


def _write_manifest(folder: Path, data: dict[str, Any]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "manifest.json").write_text(json.dumps(data, indent=2), encoding="utf-8")
    return folder


def _document(**extra: Any) -> DirectorDocument:
    """Today's document; ``extra`` fields make it a newer server's (this model keeps them)."""
    return DirectorDocument(
        fleet="lab",
        device=DEVICE,
        profile=PROFILE,
        version=3,
        expires=NOW + dt.timedelta(days=1),
        rollout="r1",
        action=Action.INSTALL,
        release=RELEASE,
        files=[DirectorFile(path=TARGET, sha256=SHA, length=1234)],
        **extra,
    )


def _raw_envelope(signed: dict[str, Any], signer: CryptoSigner) -> bytes:
    """A document as JSON data, signed over its canonical form: what a server of another
    release (older or newer than this reader) sends."""
    signature = signer.sign(canonical_json(signed))
    envelope = {"signed": signed, "signatures": [{"keyid": signature.keyid, "sig": signature.signature}]}
    return json.dumps(envelope).encode()


@pytest.fixture(scope="module")
def signer() -> CryptoSigner:
    return CryptoSigner.generate_ed25519()


def _device(signer: CryptoSigner) -> DirectorState:
    return DirectorState(key=signer.public_key, device=DEVICE, profile=PROFILE)


# -- unknown fields are kept and ignored ----------------------------------------------------------------
def test_manifest_with_unknown_fields_at_every_level_is_read(tmp_path):
    data = _manifest_data()
    data["signing"] = {"scheme": "sigstore", "bundle": "sig.json"}  # top level
    data["profile"]["revision"] = 4
    data["files"][0]["compression"] = "zstd"
    data["inputs"][0]["quant"] = {"axis": 1}
    data["verification"]["metrics"]["outputs"][0]["ssim"] = 0.98
    data["verification"]["attested_by"] = "ci"
    data["reference_stats"][0]["quantiles"] = [0.1, 0.5, 0.9]
    manifest = read_manifest(_write_manifest(tmp_path / "bundle", data))

    assert (manifest.name, manifest.version, manifest.files[0].length) == ("digits", "2.0.0", 1234)
    assert manifest.verification.metrics is not None
    assert manifest.verification.metrics.outputs[0].cosine == 1.0
    # kept (inspect shows them), and ignored by everything that reads the manifest
    assert manifest.model_extra == {"signing": {"scheme": "sigstore", "bundle": "sig.json"}}
    assert manifest.files[0].model_extra == {"compression": "zstd"}
    assert manifest.verification.metrics.outputs[0].model_extra == {"ssim": 0.98}
    assert manifest.model_dump(mode="json")["reference_stats"][0]["quantiles"] == [0.1, 0.5, 0.9]


def test_tensorrt_plan_with_unknown_fields_is_read():
    plan = TensorRtPlan.model_validate_json(
        json.dumps(
            {
                "schema_version": 1,
                "onnx_file": "model.onnx",
                "precision": "fp16",
                "inputs": [{"name": "x", "min": [1, 3], "opt": [4, 3], "max": [8, 3], "dynamic_axes": [0]}],
                "workspace_bytes": 1 << 30,
                "operator_table": "trt-10.3",
                "sparsity": "auto",
            }
        )
    )
    assert plan.precision is Precision.FP16
    assert plan.model_extra == {"sparsity": "auto"}
    assert plan.inputs[0].model_extra == {"dynamic_axes": [0]}


def test_director_document_with_unknown_fields_signed_by_a_newer_server_verifies(signer):
    document = _document(window={"start": "02:00", "end": "04:00"}, priority=2)
    newer = document.model_copy(
        update={"files": [DirectorFile(path=TARGET, sha256=SHA, length=1234, compression="zstd")]}
    )
    payload = json.loads(sign_document(newer, signer).model_dump_json())  # as the server publishes it
    payload["delivered_by"] = "relay-3"  # the unsigned envelope may grow too
    envelope = parse_signed_document(json.dumps(payload).encode())

    state, accepted = _device(signer).accept(envelope, NOW)

    assert state.version == 3
    assert (accepted.release, accepted.files[0].path) == (RELEASE, TARGET)
    assert accepted.model_extra == {"window": {"start": "02:00", "end": "04:00"}, "priority": 2}
    assert accepted.files[0].model_extra == {"compression": "zstd"}


def test_unknown_field_changed_after_signing_is_refused(signer):
    payload = json.loads(sign_document(_document(window={"start": "02:00"}), signer).model_dump_json())
    payload["signed"]["window"]["start"] = "14:00"  # a field this reader ignores is still signed
    envelope = parse_signed_document(json.dumps(payload).encode())
    with pytest.raises(TrustError, match="not signed by the trusted director key"):
        _device(signer).accept(envelope, NOW)


def test_nested_unknown_field_added_after_signing_is_refused(signer):
    payload = json.loads(sign_document(_document(), signer).model_dump_json())
    payload["signed"]["files"][0]["mirror"] = "http://evil.example/model.onnx"
    with pytest.raises(TrustError, match="not signed by the trusted director key"):
        _device(signer).accept(parse_signed_document(json.dumps(payload).encode()), NOW)


def test_signature_is_checked_over_the_document_as_received_not_a_re_dump(signer):
    """An older server's document: no ``schema_version`` (this reader defaults it) and another
    spelling of the expiry. A re-dump of the model would add the one and respell the other."""
    signed = json.loads(_document().model_dump_json())
    del signed["schema_version"]
    signed["expires"] = (NOW + dt.timedelta(days=1)).isoformat()  # "+00:00", not "Z"
    envelope = parse_signed_document(_raw_envelope(signed, signer))
    assert envelope.signed.schema_version == 1  # an older document still reads

    state, accepted = _device(signer).accept(envelope, NOW)

    assert (state.version, accepted.expires) == (3, NOW + dt.timedelta(days=1))


def test_stored_copy_of_a_received_document_reads_back_equal_and_verifies(signer):
    signed = json.loads(_document(window={"start": "02:00"}).model_dump_json())
    del signed["schema_version"]
    envelope = parse_signed_document(_raw_envelope(signed, signer))
    stored = json.loads(json.dumps(envelope.wire_data()))  # agent.store keeps JSON

    again = SignedDirectorDocument.model_validate(stored)

    assert again == envelope  # the agent tells a retained copy from a replay by this
    assert again.signed_bytes() == envelope.signed_bytes() == canonical_json(signed)
    _device(signer).accept(again, NOW)


def test_parsed_envelope_with_its_signed_document_swapped_is_refused(signer):
    """The received bytes belong to the document parsed from them, never to a replacement."""
    envelope = parse_signed_document(sign_document(_document(), signer).model_dump_json().encode())
    forged = envelope.model_copy(update={"signed": _document().model_copy(update={"rollout": "evil"})})
    with pytest.raises(TrustError, match="not signed by the trusted director key"):
        _device(signer).accept(forged, NOW)


def test_unknown_fields_are_bounded_in_depth():
    """Kept fields must still dump (``edgec inspect``) and sign: a deep one is refused, not kept."""
    deep = json.loads("[" * 100 + "]" * 100)
    manifest = {**_manifest_data(), "layers": deep}
    with pytest.raises(BundleError, match="nests deeper than 64 levels"):
        parse_manifest(json.dumps(manifest))
    envelope = {"signed": {**_document().model_dump(mode="json"), "layers": deep}, "signatures": []}
    with pytest.raises(TrustError, match="malformed director document: it is nested deeper than 32 levels"):
        parse_signed_document(json.dumps(envelope))


# -- a newer major is refused, with the reason --------------------------------------------------------
def test_director_document_from_a_newer_major_is_refused_with_upgrade_advice(signer):
    signed = json.loads(_document().model_dump_json())
    signed["schema_version"] = 2
    signed["artifacts"] = signed.pop("files")  # a new major may change the shape: not a field error
    with pytest.raises(NewerDirectorDocumentError) as refused:
        parse_signed_document(_raw_envelope(signed, signer))

    error = refused.value
    assert str(error) == (
        "director document has schema_version 2, from a newer server; "
        "this edgec 0.1.0 reads schema_version 1 and older: upgrade the agent"
    )
    assert (error.document, error.found, error.supported, error.release) == (
        "director document",
        "2",
        1,
        RELEASE,
    )
    assert isinstance(error, TrustError)  # the parser's one documented error
    assert error.role == "director"
    assert isinstance(error, NewerSchemaError)


@pytest.mark.parametrize("version", [2, "2.0", 7, 2**40])
def test_every_spelling_of_a_newer_major_is_refused(signer, version):
    signed = json.loads(_document().model_dump_json())
    signed["schema_version"] = version
    with pytest.raises(NewerDirectorDocumentError, match=rf"schema_version {version}, .*upgrade the agent"):
        parse_signed_document(_raw_envelope(signed, signer))


def test_newer_minor_of_the_same_major_is_read_and_verifies(signer):
    signed = json.loads(_document().model_dump_json())
    signed["schema_version"] = "1.4"  # a later release may spell minors; a minor only adds fields
    signed["window"] = {"start": "02:00"}
    envelope = parse_signed_document(_raw_envelope(signed, signer))
    assert envelope.signed.schema_version == 1
    _device(signer).accept(envelope, NOW)


def test_manifest_from_a_newer_major_is_refused_with_upgrade_advice(tmp_path):
    data = _manifest_data()
    data["schema_version"] = 2
    data["tensors"] = {"inputs": data.pop("inputs"), "outputs": data.pop("outputs")}
    bundle = _write_manifest(tmp_path / "bundle", data)
    with pytest.raises(NewerBundleError) as refused:
        read_manifest(bundle)

    error = refused.value
    assert str(error) == (
        f"{bundle / 'manifest.json'} has schema_version 2, from a newer compiler; "
        "this edgec 0.1.0 reads schema_version 1 and older: upgrade the agent or server reading it"
    )
    assert (error.found, error.supported) == ("2", 1)
    assert isinstance(error, BundleError)  # what every manifest reader already handles
    with pytest.raises(NewerBundleError, match="bundle manifest has schema_version 2"):
        Manifest.model_validate(data)  # any read path, not only read_manifest


def test_tensorrt_plan_from_a_newer_major_is_refused():
    with pytest.raises(NewerBundleError, match=r"build_plan\.json has schema_version 3, .*upgrade the agent"):
        TensorRtPlan.model_validate({"schema_version": 3, "engine": "prebuilt"})


def test_older_manifest_without_the_fields_added_since_still_reads():
    data = _manifest_data()
    for field in ("schema_version", "preprocessing", "runtime_config", "frozen_inputs"):
        del data[field]
    for tensor in data["inputs"] + data["outputs"]:
        for field in ("layout", "runtime_name", "scale", "zero_point", "source_shape", "kind"):
            tensor.pop(field, None)
    manifest = parse_manifest(json.dumps(data))
    assert (manifest.schema_version, manifest.frozen_inputs, manifest.inputs[0].kind) == (1, [], None)


# -- reports (what agents send the server) ------------------------------------------------------------
def test_reports_from_a_newer_agent_keep_their_unknown_fields():
    state = parse_report(
        "state", b'{"status": "serving", "installed": "digits:1.0.0", "uptime_s": 42}', LIMITS
    )
    assert isinstance(state, DeviceState)
    assert (state.status, state.model_extra) == ("serving", {"uptime_s": 42})
    event = Event.model_validate({"event": "committed", "release": RELEASE, "npu_temp_c": 51.5})
    assert event.model_extra == {"npu_temp_c": 51.5}


def test_report_from_a_newer_major_is_refused_and_says_upgrade_the_server():
    with pytest.raises(
        NewerSchemaError, match=r"telemetry window has schema_version 2, .*upgrade the server"
    ):
        Telemetry.model_validate({"schema_version": 2, "window_s": 60, "requests": 3})
    with pytest.raises(ReportRefused, match=r"device state report has schema_version 2") as refused:
        parse_report("state", b'{"schema_version": 2, "health": {"status": "serving"}}', LIMITS)
    assert refused.value.reason == "newer schema"


def test_a_report_that_names_the_current_major_is_read():
    report = Telemetry.model_validate({"schema_version": 1, "window_s": 60, "requests": 3, "errors": 1})
    assert (report.requests, report.errors) == (3, 1)
