"""Property-based fuzzing of the wire-contract parsers: the bundle manifest, the signed
director document, the fetch protocol, topics, names and releases.

The property for each: whatever arrives, the parser returns a valid object or raises its one
documented error (``BundleError``, ``TrustError``, ``ProtocolError``, ``InvalidNameError``),
never another exception; and every name or path in what it accepts stays inside the folder it
is resolved under. Inputs are random bytes, random JSON, and mutations of valid documents
(fields replaced by hostile values, removed, added, bytes flipped).

The example budget comes from tests/security/conftest.py (``ci`` in make test, 10,000 per
test in ``make fuzz``).
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from agent.store import StateStore
from edgec.director import (
    Action,
    DirectorDocument,
    DirectorFile,
    DirectorSignature,
    SignedDirectorDocument,
    parse_signed_document,
)
from edgec.errors import BundleError, InvalidNameError, PathOutsideRootError, ProtocolError, TrustError
from edgec.fetch_protocol import (
    FetchRequest,
    decode_request,
    decode_response,
    encode_request,
    encode_response,
)
from edgec.manifest import (
    BundleStatus,
    FileEntry,
    Manifest,
    Precision,
    ProfileRef,
    SourceRef,
    TargetFormat,
    TensorSpec,
    TensorStats,
    Verification,
    parse_manifest,
)
from edgec.names import (
    check_name,
    check_relative_path,
    check_version,
    parse_release,
    resolve_inside,
)
from edgec.topics import DEVICE_KINDS, device_topics, fetch_request, parse_topic

ROOT = Path("/srv/edgec-fuzz-root")  # never created: resolve() works on paths that do not exist
SHA = "ab" * 32

# -- valid documents to mutate -------------------------------------------------------------
MANIFEST = Manifest(
    name="digits",
    version="1.0.0+cpu",
    profile=ProfileRef(id="x86-64-cpu", sha256=SHA),
    format=TargetFormat.ONNX,
    precision=Precision.FP32,
    created_at="2026-11-29T12:00:00+00:00",
    files=[
        FileEntry(path="model.onnx", sha256=SHA, length=1234),
        FileEntry(path="model.mlpackage/Data/com.apple.CoreML/model.mlmodel", sha256=SHA, length=5),
        FileEntry(path="golden.npz", sha256=SHA, length=99),
    ],
    model_file="model.onnx",
    inputs=[TensorSpec(name="x", shape=[1, 1, 8, 8], dtype="float32")],
    outputs=[TensorSpec(name="logits", shape=[1, 10], dtype="float32")],
    verification=Verification(status=BundleStatus.OK, data="generated", gate={"cosine": 0.99}),
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

DOCUMENT = SignedDirectorDocument(
    signed=DirectorDocument(
        fleet="lab",
        device="pi-1",
        profile="x86-64-cpu",
        version=7,
        expires=dt.datetime(2026, 12, 1, tzinfo=dt.UTC),
        rollout="r1",
        action=Action.INSTALL,
        release="digits:1.0.0",
        files=[
            DirectorFile(path="digits/1.0.0/x86-64-cpu/model.onnx", sha256=SHA, length=1234),
            DirectorFile(path="digits/1.0.0/x86-64-cpu/manifest.json", sha256=SHA, length=800),
        ],
    ),
    signatures=[DirectorSignature(keyid="k1", sig="00" * 64)],
).model_dump(mode="json")

# -- hostile values -----------------------------------------------------------------------------
HOSTILE_STRINGS = [
    "..",
    ".",
    "",
    "../../../pwn",
    "/etc/passwd",
    "a/../../b",
    "C:\\Windows",
    "\\\\server\\share",
    "pi-#",
    "pi+1",
    "a/+/#",
    "x\x00y",
    "with space",
    "line\nbreak",
    "digits:1:2",
    "dígits",
    "\u202eexe.txt",
    "a" * 65,
    "a" * 5000,
    "~root",
    "$(reboot)",
    "%2e%2e%2f",
    "model.onnx/",
    "/",
    "//",
    "a//b",
]
hostile_text = st.one_of(st.sampled_from(HOSTILE_STRINGS), st.text(max_size=80))
json_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    hostile_text,
)
json_value = st.recursive(
    json_leaf,
    lambda children: st.one_of(
        st.lists(children, max_size=4), st.dictionaries(st.text(max_size=12), children, max_size=4)
    ),
    max_leaves=12,
)


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every location in a JSON value (the root included)."""
    found = [prefix]
    if isinstance(value, dict):
        for key, item in value.items():
            found += _paths(item, (*prefix, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found += _paths(item, (*prefix, index))
    return found


def _replace(value: Any, path: tuple[Any, ...], new: Any) -> Any:
    if not path:
        return new
    copy = dict(value) if isinstance(value, dict) else list(value)
    copy[path[0]] = _replace(value[path[0]], path[1:], new)
    return copy


def _delete(value: Any, path: tuple[Any, ...]) -> Any:
    if len(path) == 1:
        copy = dict(value) if isinstance(value, dict) else list(value)
        del copy[path[0]]
        return copy
    return _replace(value, path[:1], _delete(value[path[0]], path[1:]))


@st.composite
def mutated(draw: st.DrawFn, document: dict[str, Any]) -> Any:
    """``document`` with 1-4 edits: a value replaced (by a hostile one), a key removed, a key added."""
    value: Any = document
    for _ in range(draw(st.integers(1, 4))):
        paths = _paths(value)
        path = draw(st.sampled_from(paths))
        action = draw(st.sampled_from(["replace", "replace", "delete", "add"]))
        if action == "delete" and path:
            value = _delete(value, path)
        elif action == "add":
            target = value
            for key in path:
                target = target[key]
            if isinstance(target, dict):
                value = _replace(value, path, {**target, draw(st.text(max_size=12)): draw(json_value)})
        else:
            value = _replace(value, path, draw(st.one_of(json_value, hostile_text)))
    return value


@st.composite
def flipped(draw: st.DrawFn, data: bytes) -> bytes:
    """``data`` with a few bytes changed, inserted or cut."""
    buffer = bytearray(data)
    for _ in range(draw(st.integers(1, 6))):
        at = draw(st.integers(0, max(len(buffer) - 1, 0)))
        action = draw(st.sampled_from(["flip", "insert", "cut"]))
        if action == "flip" and buffer:
            buffer[at] ^= draw(st.integers(1, 255))
        elif action == "insert":
            buffer[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif buffer:
            del buffer[at : at + draw(st.integers(1, 16))]
    return bytes(buffer)


def _deep(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


def inputs_from(document: dict[str, Any]) -> st.SearchStrategy[bytes | str]:
    encoded = json.dumps(document).encode()
    return st.one_of(
        st.binary(max_size=512),
        json_value.map(json.dumps),
        mutated(document).map(lambda v: json.dumps(v, allow_nan=True)),
        flipped(encoded),
        st.integers(10, 200_000).map(_deep),
    )


def _outcome(parse: Any, value: Any, documented: type[Exception]) -> tuple[Any, Any]:
    """``(result, None)``, or ``(None, error)`` for the documented error; any other exception
    propagates and fails the property."""
    try:
        return parse(value), None
    except documented as e:
        return None, e


def _one_line(error: Exception) -> None:
    text = str(error)
    assert text
    assert "\n" not in text
    assert len(text) < 2000


def _stays_inside(relative: str) -> None:
    resolved = resolve_inside(ROOT, relative)  # raises if it would leave ROOT
    assert resolved.is_relative_to(ROOT)


# -- the properties -------------------------------------------------------------------------------
@given(inputs_from(MANIFEST))
def test_manifest_parses_or_is_a_bundle_error(data):
    manifest, error = _outcome(parse_manifest, data, BundleError)
    if manifest is None:
        _one_line(error)
        return
    check_name(manifest.name)
    check_version(manifest.version)
    for relative in [f.path for f in manifest.files] + [manifest.model_file, manifest.profile.id]:
        _stays_inside(relative)
    _stays_inside(f"{manifest.name}/{manifest.version}/{manifest.profile.id}")


@given(inputs_from(DOCUMENT))
def test_director_document_parses_or_is_a_trust_error(data):
    envelope, error = _outcome(parse_signed_document, data, TrustError)
    if envelope is None:
        _one_line(error)
        assert error.role == "director"
        return
    doc = envelope.signed
    folder = StateStore.folder_name(doc.release)
    assert "/" not in folder
    assert folder not in (".", "..")
    _stays_inside(f"models/{folder}")
    for file in doc.files:
        _stays_inside(file.path)
    device_topics(doc.fleet, doc.device)  # the ids are valid topic levels


@given(
    st.one_of(
        st.binary(max_size=600),
        flipped(encode_request("abc", "targets/digits/1.0.0/x86-64-cpu/0a.model.onnx", 262144)),
        mutated({"id": "abc", "path": "metadata/timestamp.json", "offset": 0})
        .map(json.dumps)
        .map(str.encode),
        st.integers(10, 100_000).map(_deep),
        st.integers(4000, 10_000).map(lambda n: b'{"id":"' + b"x" * n + b'"}'),
    )
)
def test_fetch_request_decodes_or_is_a_protocol_error(payload):
    request, error = _outcome(decode_request, payload, ProtocolError)
    if request is None:
        _one_line(error)
        return
    assert isinstance(request, FetchRequest)
    assert request.offset >= 0
    _stays_inside(request.path)


_RESPONSE_HEADER = {"id": "abc", "path": "metadata/timestamp.json", "offset": 0, "total": 10, "status": 200}


@st.composite
def responses(draw: st.DrawFn) -> bytes:
    header = draw(st.one_of(mutated(_RESPONSE_HEADER), json_value))
    raw = json.dumps(header, allow_nan=True).encode()
    size = draw(st.one_of(st.just(len(raw)), st.integers(0, 2**32 - 1)))
    return size.to_bytes(4, "big") + raw + draw(st.binary(max_size=64))


@given(
    st.one_of(
        st.binary(max_size=600),
        responses(),
        flipped(encode_response(_RESPONSE_HEADER, b"0123456789")),
        st.integers(10, 100_000).map(lambda n: n.to_bytes(4, "big") + b"[" * n),
    )
)
def test_fetch_response_decodes_or_is_a_protocol_error(payload):
    decoded, error = _outcome(decode_response, payload, ProtocolError)
    if decoded is None:
        _one_line(error)
        return
    header, data = decoded
    assert isinstance(header["id"], str)
    assert isinstance(data, bytes)
    if header["status"] == 200:
        assert header["total"] >= 0
        assert header["offset"] >= 0


@given(st.one_of(hostile_text, st.text(alphabet="abc./+-_:", max_size=20)))
def test_names_are_safe_path_components_or_refused(value):
    for check in (check_name, check_version):
        accepted, error = _outcome(check, value, InvalidNameError)
        if accepted is None:
            _one_line(error)
            continue
        assert accepted == value
        assert "/" not in value
        assert "\\" not in value
        assert value not in (".", "..")
        assert not set(value) & set("#:\x00 \t\n")
        assert resolve_inside(ROOT, value).parent == ROOT


@given(st.one_of(hostile_text, st.lists(hostile_text, min_size=1, max_size=5).map("/".join)))
def test_relative_paths_stay_inside_their_root_or_are_refused(value):
    try:
        check_relative_path(value)
    except InvalidNameError:
        return
    _stays_inside(value)
    assert not value.startswith("/")
    assert ".." not in value.split("/")


@given(
    st.one_of(
        hostile_text,
        st.tuples(hostile_text, hostile_text).map(":".join),
        st.text(alphabet="ab.:+/-", max_size=12),
    )
)
def test_parse_release_splits_into_safe_names_or_refuses(value):
    release, error = _outcome(parse_release, value, InvalidNameError)
    if release is None:
        _one_line(error)
        return
    assert str(release) == value
    _stays_inside(f"{release.name}/{release.version}")
    assert "/" not in StateStore.folder_name(value)


_TOPIC_LEVELS = st.one_of(hostile_text, st.sampled_from(["lab", "pi-1", "devices", "fetch", *DEVICE_KINDS]))


@given(
    st.one_of(
        st.text(max_size=120),
        st.lists(_TOPIC_LEVELS, min_size=1, max_size=8).map("/".join),
        st.lists(_TOPIC_LEVELS, min_size=4, max_size=4).map(
            lambda p: f"edgec/v1/{p[0]}/{p[1]}/{p[2]}/{p[3]}"
        ),
    )
)
def test_topic_parses_to_valid_ids_or_is_a_protocol_error(topic):
    parsed, error = _outcome(parse_topic, topic, ProtocolError)
    if parsed is None:
        _one_line(error)
        return
    if parsed.kind in DEVICE_KINDS:
        assert device_topics(parsed.fleet, parsed.device)[parsed.kind] == topic
    else:
        assert topic.rsplit("/", 1)[0] == fetch_request(parsed.fleet, parsed.device).rsplit("/", 1)[0]
    try:
        resolve_inside(ROOT, parsed.fleet, parsed.device)
    except PathOutsideRootError as e:  # pragma: no cover - the property under test
        raise AssertionError(f"{topic!r} parsed to ids that leave a folder") from e
