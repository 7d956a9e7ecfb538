"""Property-based fuzzing of the agent's v2 inference API over a real socket.

Generated raw request bytes go to one live ``InferenceServer`` serving the digits bundle:
methods, targets, HTTP versions, headers (``Content-Length`` right, wrong, repeated, negative,
huge; ``Transfer-Encoding``, ``Expect``, ``Connection``, ``Upgrade``,
``Inference-Header-Content-Length``), bodies (random bytes, infer documents of the right
shape with hostile values, binary tensors), several requests pipelined, and byte-level
mutations of all of it. The client then half-closes and reads until the server closes.

The property, for every input:

- what comes back is a sequence of well-formed HTTP/1.1 responses (status line, headers, a
  ``Content-Length`` and exactly that many bytes of body; ``100 Continue`` and the bodiless
  answer to ``HEAD`` allowed), nothing after them, and then the server closes: bytes that are
  not HTTP get a 400 and a close, never silence while the connection stays open;
- every status is below 500;
- a stream of well-formed requests (no mutation) gets exactly one answer per request;
- nothing is logged at ERROR by the agent or by asyncio;
- the server then still answers a valid infer request with 200.

The example budget comes from tests/security/conftest.py (``ci`` in make test, 10,000 in
``make fuzz``).
"""

from __future__ import annotations

import json
import logging
import re
import socket
from typing import Any

import pytest
from hypothesis import event, given
from hypothesis import strategies as st

from agent.config import ServingLimits
from agent.runtime import load_bundle
from agent.serving import DATATYPES, InferenceServer
from agent.slot import ModelSlot
from tests.security._agent_api import INFER, INFER_THEN_CLOSE
from tests.security._agent_api import agent_bundle as agent_bundle  # noqa: PLC0414  (fixture)

LIMITS = ServingLimits(
    header_timeout_s=5, body_timeout_s=5, idle_timeout_s=5, max_body_bytes=1 << 20, max_json_bytes=1 << 19
)
_STATUS_LINE = re.compile(rb"HTTP/1\.1 (\d{3}) [^\r\n]*\r\n")


class _Errors(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture(scope="module")
def live(agent_bundle):
    errors = _Errors()
    loggers = [logging.getLogger(name) for name in ("agent", "asyncio")]
    for logger in loggers:
        logger.addHandler(errors)
    slot = ModelSlot()
    slot.swap(load_bundle(agent_bundle))
    server = InferenceServer(slot, limits=LIMITS)
    server.start()
    yield server, errors
    server.stop()
    for logger in loggers:
        logger.removeHandler(errors)


# --------------------------------------------------------------------------- strategies

_TOKEN = st.text(
    alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_!#$%&'*+.^`|~", max_size=12
)
_ANY_TEXT = st.text(alphabet=st.characters(codec="latin-1"), max_size=40)


def _mostly(common: st.SearchStrategy[Any], rare: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """``common`` seven times in ten: hostile values in one field, the others plausible."""
    return st.integers(0, 9).flatmap(lambda i: common if i < 7 else rare)


methods = _mostly(
    st.sampled_from(["GET", "POST", "POST", "HEAD"]),
    st.one_of(
        st.sampled_from(["PUT", "DELETE", "OPTIONS", "PATCH", "CONNECT", "TRACE", "PRI", "M-SEARCH"]),
        st.sampled_from(["get", "G ET", "", "POST\x00", "PROPFIND"]),
        _TOKEN,
    ),
)
_WELL_FORMED_PATHS = [
    INFER,
    "/v2/models/digits/versions/1.0.0/infer",
    "/v2/models/digits/versions/9.9.9/infer",
    "/v2/models/digits",
    "/v2/models/digits/ready",
    "/v2/health/live",
    "/v2/health/ready",
    "/v2",
    "/",
    "/v2/models/digits/infer?x=1&y=%ff",
]
_PATHS = [
    INFER,
    "/v2/models/digits/versions/1.0.0/infer",
    "/v2/models/digits/versions/9.9.9/infer",
    "/v2/models/digits",
    "/v2/models/digits/ready",
    "/v2/health/live",
    "/v2/health/ready",
    "/v2",
    "/",
    "*",
    "http://127.0.0.1/v2/health/live",
    "/v2/models/%2e%2e/infer",
    "/v2/models//infer",
    "/v2/models/digits/infer?x=1&y=%ff",
]
targets = st.one_of(
    st.sampled_from(_PATHS),
    st.builds(lambda base, tail: base + tail, st.sampled_from(_PATHS), _ANY_TEXT),
    st.text(alphabet="/%abcdefgv0123456789?&=#.", max_size=60),
    st.just("/" + "a" * 70_000),
)
versions = _mostly(
    st.just("HTTP/1.1"),
    st.sampled_from(["HTTP/1.0", "HTTP/2.0", "HTTP/0.9", "HTTP/1.2", "http/1.1", "HTTP/1", ""]),
)
_HEADER_NAMES = [
    "Content-Length",
    "Transfer-Encoding",
    "Expect",
    "Connection",
    "Inference-Header-Content-Length",
    "Upgrade",
    "Host",
    "Content-Type",
]
header_values = st.one_of(
    st.sampled_from(["chunked", "gzip", "100-continue", "close", "keep-alive", "Upgrade", "h2c", "0", "-1"]),
    st.sampled_from(["chunked", "100-continue"]),
    st.integers(-(10**3), 10**25).map(str),
    _ANY_TEXT,
)
extra_headers = st.lists(
    st.tuples(_mostly(st.sampled_from(_HEADER_NAMES), _TOKEN | _ANY_TEXT), header_values), max_size=4
)


def _tensor_values() -> st.SearchStrategy[Any]:
    number = st.one_of(
        st.integers(-(2**70), 2**70),
        st.floats(allow_nan=True, allow_infinity=True),
        st.booleans(),
        st.none(),
        st.text(max_size=3),
    )
    flat = st.lists(number, max_size=80)
    return st.one_of(
        st.just([0.5] * 64),
        flat,
        st.lists(st.lists(number, max_size=8), max_size=8),
        st.recursive(number, lambda inner: st.lists(inner, max_size=3), max_leaves=20),
        st.dictionaries(st.text(max_size=3), number, max_size=3),
    )


shapes = st.one_of(
    st.just([1, 1, 8, 8]),
    st.lists(st.integers(-2, 10), max_size=6),
    st.lists(st.sampled_from([0, 1, 8, 2**31, 2**40, 2**63, 2**70]), max_size=6),
    st.lists(st.one_of(st.floats(allow_nan=False), st.text(max_size=2), st.none()), max_size=4),
    st.just("1x1x8x8"),
    st.lists(st.just(1), min_size=30, max_size=70),
)
datatypes = st.one_of(st.sampled_from([*DATATYPES, "BYTES", "BF16", "fp32", ""]), st.integers(), st.none())
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=10,
)


@st.composite
def infer_documents(draw: st.DrawFn) -> tuple[bytes, dict[str, str]]:
    """An infer body of the right shape with hostile values, optionally with binary tensors."""
    tensor: dict[str, Any] = {
        "name": draw(st.sampled_from(["x", "x", "image", ""]) | st.integers()),
        "shape": draw(shapes),
        "datatype": draw(datatypes),
    }
    binary = draw(st.booleans())
    blob = b""
    if binary:
        blob = draw(st.sampled_from([b"\0" * 256, b"\x00\x00\x80\x3f" * 64]) | st.binary(max_size=300))
        size = draw(st.sampled_from([len(blob), 256, -1, 2**64, "256", None]))
        tensor["parameters"] = {"binary_data_size": size}
    else:
        tensor["data"] = draw(_tensor_values())
    document: dict[str, Any] = {"inputs": draw(st.sampled_from([[tensor], [tensor, tensor], tensor, []]))}
    if draw(st.booleans()):
        document["id"] = draw(json_values)
    if draw(st.booleans()):
        document["outputs"] = draw(
            st.sampled_from([[{"name": "logits"}], [{"name": "probs"}], "logits", [{}], [{"name": 1}]])
            | st.lists(st.fixed_dictionaries({"name": st.text(max_size=6), "parameters": json_values}))
        )
    if draw(st.booleans()):
        document["parameters"] = draw(json_values)
    head = json.dumps(document).encode()
    headers: dict[str, str] = {}
    if binary:
        headers["Inference-Header-Content-Length"] = str(
            draw(st.sampled_from([len(head), len(head) + 1, 0, -5, 10**9]))
        )
    return head + blob, headers


bodies = st.one_of(
    st.just(b""),
    st.binary(max_size=400),
    infer_documents().map(lambda document: document[0]),
    st.sampled_from(
        [b"[" * 5000, b'{"inputs": ' + b"[" * 3000, b"{" * 2000, b'{"inputs": [' + b'{"a":' * 3000]
    ),
)


@st.composite
def http_requests(draw: st.DrawFn, structured: bool) -> tuple[bytes, bool]:
    """One request; (its bytes, whether it is well-formed HTTP with a matching length)."""
    method = draw(st.sampled_from(["GET", "POST", "HEAD"])) if structured else draw(methods)
    target = draw(st.sampled_from(_WELL_FORMED_PATHS)) if structured else draw(targets)
    version = "HTTP/1.1" if structured else draw(versions)
    headers: list[tuple[str, str]] = [("Host", "127.0.0.1")]
    body = b""
    if method == "POST" or draw(st.booleans()):
        if structured and draw(st.booleans()):
            body, extra = draw(infer_documents())
            headers += list(extra.items())
        else:
            body = draw(bodies)
    well_formed = structured
    if structured:
        headers.append(("Content-Length", str(len(body))))
        if draw(st.booleans()):
            headers.append(("Expect", "100-continue"))
    else:
        length = draw(
            st.sampled_from(
                [
                    "right",
                    "right",
                    "none",
                    "short",
                    "long",
                    "twice",
                    "negative",
                    "huge",
                    "text",
                    "over",
                    "json",
                ]
            )
        )
        value = {
            "right": str(len(body)),
            "short": str(max(0, len(body) - 3)),
            "long": str(len(body) + 5),
            "negative": "-1",
            "huge": str(2**64),
            "text": "ten",
            "over": str(LIMITS.max_body_bytes + 1),
            "json": str(LIMITS.max_json_bytes + 1),
        }.get(length)
        if value is not None:
            headers.append(("Content-Length", value))
        if length == "twice":
            headers += [("Content-Length", str(len(body))), ("Content-Length", str(len(body) + 1))]
        headers += draw(extra_headers)
    eol = "\r\n" if structured or draw(st.integers(0, 9)) else "\n"
    head = f"{method} {target} {version}{eol}" + "".join(f"{k}: {v}{eol}" for k, v in headers) + eol
    return head.encode("latin-1", "replace") + body, well_formed


@st.composite
def streams(draw: st.DrawFn) -> tuple[bytes, int | None]:
    """Bytes to send; the number of answers owed when they are well-formed requests, else None."""
    structured = draw(st.booleans())
    requests = draw(st.lists(http_requests(structured), min_size=1, max_size=3))
    data = b"".join(r for r, _ in requests)
    owed: int | None = len(requests) if structured else None
    if draw(st.integers(0, 3)) == 0:  # mutate: flip, insert, delete bytes, or truncate
        data = bytearray(data)
        for _ in range(draw(st.integers(1, 4))):
            kind = draw(st.sampled_from(["flip", "insert", "delete", "truncate"]))
            at = draw(st.integers(0, max(0, len(data) - 1)))
            if kind == "flip" and data:
                data[at] = draw(st.integers(0, 255))
            elif kind == "insert":
                data[at:at] = draw(st.binary(min_size=1, max_size=8))
            elif kind == "delete":
                del data[at : at + draw(st.integers(1, 8))]
            else:
                del data[at:]
        data = bytes(data)
        owed = None
    if draw(st.integers(0, 9)) == 0:
        data = draw(
            st.sampled_from(
                [b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"]
            )
        )
        owed = None
    return data, owed


# --------------------------------------------------------------------------- the property


def _send_and_read(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
        try:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass  # refused early: what it answered is still to be read
        received = bytearray()
        while True:
            try:
                chunk = sock.recv(1 << 16)
            except ConnectionResetError:
                break
            if not chunk:
                break
            received += chunk
    return bytes(received)


def _responses(data: bytes) -> list[int]:
    """The statuses of the well-formed responses that make up ``data`` (100s left out)."""
    statuses: list[int] = []
    at = 0
    while at < len(data):
        line = _STATUS_LINE.match(data, at)
        assert line, f"not a status line at byte {at}: {data[at : at + 80]!r}"
        end = data.find(b"\r\n\r\n", line.start())
        assert end >= 0, f"unfinished head: {data[at : at + 200]!r}"
        status = int(line.group(1))
        at = end + 4
        if status == 100:
            continue
        head = data[line.end() : end].decode("latin-1")
        lengths = re.findall(r"(?im)^content-length: (\d+)\r?$", head)
        assert len(lengths) == 1, head
        length = int(lengths[0])
        if data.startswith(b"HTTP/1.1 ", at) or at == len(data):
            length = 0  # the answer to HEAD: the length, no body (bodies here start with "{")
        body = data[at : at + length]
        assert len(body) == length, f"body of {len(body)} bytes, Content-Length {length}"
        if length and b"application/json" in line.string[line.start() : end]:
            json.loads(body)  # JSON answers parse, with an "error" for every 4xx
        at += length
        statuses.append(status)
    return statuses


def _check(live, data: bytes, owed: int | None) -> None:
    server, errors = live
    before = len(errors.records)
    statuses = _responses(_send_and_read(server.port, data))
    for status in set(statuses) or {"no answer"}:
        event(f"status {status}")  # pytest --hypothesis-show-statistics
    assert all(s < 500 for s in statuses), statuses
    if owed is not None:
        assert len(statuses) == owed, statuses
    answer = _send_and_read(server.port, INFER_THEN_CLOSE)
    assert answer.startswith(b"HTTP/1.1 200 OK"), answer[:300]
    assert errors.records[before:] == [], [r.getMessage() for r in errors.records[before:]]


@given(stream=streams())
def test_fuzzed_requests_get_well_formed_4xx_answers(live, stream):
    _check(live, *stream)


@given(document=infer_documents(), pipelined=st.booleans())
def test_fuzzed_infer_documents_get_200_or_400(live, document, pipelined):
    body, headers = document
    lines = [f"POST {INFER} HTTP/1.1", f"Content-Length: {len(body)}"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    data = ("\r\n".join(lines) + "\r\n\r\n").encode() + body
    _check(live, data + (INFER_THEN_CLOSE if pipelined else b""), 2 if pipelined else 1)
