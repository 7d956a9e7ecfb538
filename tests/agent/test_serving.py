"""The KServe v2 HTTP API over a ModelSlot: real requests on a real socket."""

from __future__ import annotations

import http.client
import json
import re
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from typing import Any

import numpy as np
import pytest
from pydantic import ValidationError

from agent.config import AgentConfig, ServingLimits
from agent.runtime import load_bundle
from agent.serving import InferenceServer, ListenError
from agent.slot import ModelSlot
from edgec.manifest import read_manifest
from tests._services import wait_for
from tests.conftest import ROOT, run_edgec

INFER = "/v2/models/digits/infer"


class Client:
    """One keep-alive connection."""

    def __init__(self, port: int) -> None:
        self.connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)

    def request(
        self, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None
    ) -> tuple[int, dict[str, str], bytes]:
        self.connection.request(method, path, body=body, headers=headers or {})
        response = self.connection.getresponse()
        data = response.read()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, data

    def get(self, path: str) -> tuple[int, Any]:
        status, _, data = self.request("GET", path)
        return status, json.loads(data)

    def post(self, path: str, document: Any, headers: dict[str, str] | None = None) -> tuple[int, Any]:
        body = document if isinstance(document, bytes) else json.dumps(document).encode()
        status, _, data = self.request(
            "POST", path, body, {"Content-Type": "application/json", **(headers or {})}
        )
        return status, json.loads(data)

    def close(self) -> None:
        self.connection.close()


def infer_document(x: np.ndarray, **extra: Any) -> dict[str, Any]:
    tensor = {"name": "x", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}
    return {"inputs": [tensor], **extra}


def binary_body(document: dict[str, Any], *blobs: bytes) -> tuple[bytes, dict[str, str]]:
    head = json.dumps(document).encode()
    return head + b"".join(blobs), {"Inference-Header-Content-Length": str(len(head))}


def split_binary(headers: dict[str, str], body: bytes) -> tuple[dict[str, Any], bytes]:
    size = int(headers["inference-header-content-length"])
    return json.loads(body[:size]), body[size:]


@pytest.fixture(scope="module")
def samples(digits_bundles) -> np.ndarray:
    with np.load(digits_bundles["x86-64-cpu"] / "golden.npz") as golden:
        return golden["inputs/x"]  # [8, 1, 1, 8, 8]


@pytest.fixture
def serve():
    """serve(slot, **options) -> (server, client); everything stops after the test."""
    started: list[tuple[InferenceServer, Client]] = []

    def start(slot: ModelSlot, **options: Any) -> tuple[InferenceServer, Client]:
        server = InferenceServer(slot, **options)
        client = Client(server.start())
        started.append((server, client))
        return server, client

    yield start
    for server, client in started:
        client.close()
        server.stop()


@pytest.fixture
def digits_slot(digits_bundles) -> ModelSlot:
    slot = ModelSlot()
    slot.swap(load_bundle(digits_bundles["x86-64-cpu"]))
    return slot


# --------------------------------------------------------------------------- health and metadata


def test_health_and_ready_before_and_after_a_model(serve, digits_bundles, samples):
    slot = ModelSlot()
    _, client = serve(slot)
    assert client.get("/v2/health/live") == (200, {"live": True})
    assert client.get("/v2/health/ready") == (503, {"ready": False})
    assert client.get("/v2/models/digits") == (503, {"error": "no model is installed yet"})
    assert client.get("/v2/models/digits/ready")[0] == 503
    assert client.post(INFER, infer_document(samples[0]))[0] == 503

    slot.swap(load_bundle(digits_bundles["x86-64-cpu"]))
    assert client.get("/v2/health/ready") == (200, {"ready": True})
    assert client.get("/v2/models/digits/ready") == (200, {"name": "digits", "ready": True})
    assert client.get("/v2/models/digits/versions/1.0.0/ready")[0] == 200
    assert client.post(INFER, infer_document(samples[0]))[0] == 200


def test_server_metadata(serve, digits_slot):
    _, client = serve(digits_slot)
    status, document = client.get("/v2")
    assert status == 200
    assert document["name"] == "edgec-agent"
    assert document["extensions"] == ["binary_tensor_data"]


@pytest.mark.parametrize(
    ("bundle", "platform"),
    [("x86-64-cpu", "onnxruntime_onnx"), ("raspberry-pi-4", "tflite"), ("int8-io", "tflite")],
)
def test_model_metadata_gives_source_shapes_and_kserve_datatypes(
    serve, digits_bundles, digits_int8_io_bundle, bundle, platform
):
    folder = digits_int8_io_bundle if bundle == "int8-io" else digits_bundles[bundle]
    slot = ModelSlot()
    slot.swap(load_bundle(folder))
    _, client = serve(slot)
    status, document = client.get("/v2/models/digits")
    assert status == 200
    # the TFLite artifacts take [1, 8, 8, 1] (and int8 for the int8-I/O one): callers never see it
    assert document == {
        "name": "digits",
        "versions": ["1.0.0"],
        "platform": platform,
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 1, 8, 8]}],
        "outputs": [{"name": "logits", "datatype": "FP32", "shape": [1, 10]}],
    }
    assert client.get("/v2/models/digits/versions/1.0.0")[1] == document


def test_unknown_model_version_and_path_are_404(serve, digits_slot):
    _, client = serve(digits_slot)
    assert client.get("/v2/models/cats") == (
        404,
        {"error": "unknown model 'cats'; this agent serves 'digits'"},
    )
    status, document = client.post(
        "/v2/models/digits/versions/9.9.9/infer", infer_document(np.zeros((1, 1, 8, 8)))
    )
    assert status == 404
    assert document["error"] == "model 'digits' version '9.9.9' is not being served (serving 1.0.0)"
    status, document = client.get("/v1/models")
    assert status == 404
    assert "KServe v2" in document["error"]
    assert client.get("/v2/models/digits/explain")[0] == 404


def test_wrong_method_is_405(serve, digits_slot):
    _, client = serve(digits_slot)
    assert client.get(INFER) == (405, {"error": f"{INFER} takes POST, not GET"})
    assert client.post("/v2/health/ready", {})[0] == 405


# --------------------------------------------------------------------------- inference


def test_json_infer_matches_the_runtime_directly(serve, digits_bundles, samples):
    for profile in ("x86-64-cpu", "raspberry-pi-4"):
        direct = load_bundle(digits_bundles[profile])
        slot = ModelSlot()
        slot.swap(load_bundle(digits_bundles[profile]))
        _, client = serve(slot)
        for x in samples[:4]:
            status, document = client.post(INFER, infer_document(x, id="req-7"))
            assert status == 200, document
            assert document["model_name"] == "digits"
            assert document["model_version"] == "1.0.0"
            assert document["id"] == "req-7"
            [output] = document["outputs"]
            assert output["name"] == "logits"
            assert output["datatype"] == "FP32"
            assert output["shape"] == [1, 10]
            want = direct.infer({"x": x})["logits"]
            np.testing.assert_array_equal(np.array(output["data"], np.float32).reshape(1, 10), want)


def test_nested_json_data_and_the_versioned_path(serve, digits_slot, samples):
    _, client = serve(digits_slot)
    x = samples[1]
    document = {"inputs": [{"name": "x", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": x.tolist()}]}
    status, nested = client.post("/v2/models/digits/versions/1.0.0/infer", document)
    assert status == 200, nested
    assert nested["outputs"] == client.post(INFER, infer_document(x))[1]["outputs"]
    assert "id" not in nested


def test_binary_inputs_and_outputs(serve, digits_slot, samples):
    _, client = serve(digits_slot)
    x = samples[2]
    want = np.array(client.post(INFER, infer_document(x))[1]["outputs"][0]["data"], np.float32)
    blob = x.astype("<f4").tobytes()
    tensor = {
        "name": "x",
        "shape": [1, 1, 8, 8],
        "datatype": "FP32",
        "parameters": {"binary_data_size": len(blob)},
    }

    # binary in, binary out (for every output)
    body, headers = binary_body(
        {"id": "b1", "inputs": [tensor], "parameters": {"binary_data_output": True}}, blob
    )
    status, response_headers, data = client.request("POST", INFER, body, headers)
    assert status == 200
    assert response_headers["content-type"] == "application/octet-stream"
    document, rest = split_binary(response_headers, data)
    assert document["id"] == "b1"
    assert document["model_version"] == "1.0.0"
    [output] = document["outputs"]
    assert output["parameters"] == {"binary_data_size": 40}
    assert "data" not in output
    np.testing.assert_array_equal(np.frombuffer(rest, "<f4"), want)

    # binary in, JSON out
    body, headers = binary_body({"inputs": [tensor]}, blob)
    status, response_headers, data = client.request("POST", INFER, body, headers)
    assert status == 200
    assert "inference-header-content-length" not in response_headers
    np.testing.assert_array_equal(np.array(json.loads(data)["outputs"][0]["data"], np.float32), want)

    # JSON in, binary out asked for per output
    document = infer_document(x, outputs=[{"name": "logits", "parameters": {"binary_data": True}}])
    status, response_headers, data = client.request("POST", INFER, json.dumps(document).encode())
    assert status == 200
    document, rest = split_binary(response_headers, data)
    assert document["outputs"][0]["shape"] == [1, 10]
    np.testing.assert_array_equal(np.frombuffer(rest, "<f4"), want)


def test_json_numbers_of_another_datatype_convert(serve, digits_slot):
    _, client = serve(digits_slot)
    zeros = np.zeros((1, 1, 8, 8), np.float32)
    want = client.post(INFER, infer_document(zeros))[1]["outputs"]
    as_ints = {"inputs": [{"name": "x", "shape": [1, 1, 8, 8], "datatype": "INT64", "data": [0] * 64}]}
    assert client.post(INFER, as_ints) == (
        200,
        {"model_name": "digits", "model_version": "1.0.0", "outputs": want},
    )
    as_fp64 = {"inputs": [{"name": "x", "shape": [1, 1, 8, 8], "datatype": "FP64", "data": [0.0] * 64}]}
    assert client.post(INFER, as_fp64)[0] == 200


# --------------------------------------------------------------------------- client mistakes

GOOD = {"name": "x", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": [0.5] * 64}


def _x(**changes: Any) -> dict[str, Any]:
    """A request whose one input is GOOD with ``changes`` (None removes a key)."""
    tensor = {k: v for k, v in {**GOOD, **changes}.items() if v is not None}
    return {"inputs": [tensor]}


NOT_FP32 = "input 'x': 'data' is not a regular array of FP32 values"
BAD_REQUESTS = [
    (b'{"inputs": [', "request body is not valid JSON: "),
    (b"[1, 2]", "request body must be a JSON object with 'inputs'"),
    ({"inputs": []}, "'inputs' must be a non-empty list of tensors"),
    (_x(name="image"), "unknown input 'image': the model takes 'x'"),
    ({"inputs": [GOOD, GOOD]}, "input 'x' is given twice"),
    (_x(shape=[1, 8, 8]), "input 'x' has shape [1, 8, 8], the model takes [1, 1, 8, 8]"),
    (_x(shape=[1, 1, 8, 9]), "input 'x': 'data' holds 64 values, its shape [1, 1, 8, 9] needs 72"),
    (_x(shape="1x1x8x8"), "input 'x': 'shape' must be a list of non-negative integers"),
    (_x(datatype="BYTES"), "input 'x': unsupported datatype 'BYTES'"),
    (_x(datatype="BOOL", data=[True] * 64), "input 'x' is bool, the model takes float32"),
    (_x(data=["a"] * 64), NOT_FP32),
    (_x(data=[[0.5] * 60, [0.5] * 4]), NOT_FP32),
    (_x(data=[None] * 64), NOT_FP32),
    (_x(datatype="INT64"), "input 'x' holds non-integer values, its datatype is int64"),
    (_x(data=None), "input 'x' has neither 'data' nor parameters.binary_data_size"),
    ({"inputs": [GOOD], "outputs": [{"name": "probs"}]}, "unknown output 'probs': the model gives 'logits'"),
    (
        _x(data=None, parameters={"binary_data_size": 256}),
        "input 'x' declares binary data but the request has no Inference-Header-Content-Length",
    ),
]


@pytest.mark.parametrize(("body", "message"), BAD_REQUESTS)
def test_client_mistakes_are_400_with_what_is_wrong(serve, digits_slot, samples, body, message):
    _, client = serve(digits_slot)
    status, document = client.post(INFER, body)
    assert status == 400
    assert document["error"].startswith(message), document["error"]
    # the connection stays usable
    assert client.post(INFER, infer_document(samples[0]))[0] == 200


@pytest.mark.parametrize(
    ("size", "blob_bytes", "header", "message"),
    [
        (
            255,
            256,
            None,
            "input 'x': binary_data_size 255 does not match its shape [1, 1, 8, 8] of FP32 (256 bytes)",
        ),
        (256, 200, None, "input 'x': binary data ends after 200 of 256 bytes"),
        (256, 300, None, "44 bytes of binary data follow the inputs that declare them"),
        (256, 256, "9999", "Inference-Header-Content-Length '9999' is not a length within the"),
    ],
)
def test_binary_length_mismatches_are_400(serve, digits_slot, size, blob_bytes, header, message):
    _, client = serve(digits_slot)
    tensor = {
        "name": "x",
        "shape": [1, 1, 8, 8],
        "datatype": "FP32",
        "parameters": {"binary_data_size": size},
    }
    body, headers = binary_body({"inputs": [tensor]}, b"\0" * blob_bytes)
    if header is not None:
        headers["Inference-Header-Content-Length"] = header
    status, document = client.post(INFER, body, headers)
    assert status == 400
    assert document["error"].startswith(message), document["error"]


def _raw(port: int, data: bytes, expect: int = 1) -> list[bytes]:
    """Send raw bytes; read ``expect`` responses (or until the server closes)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(data)
        buffer = b""
        responses: list[bytes] = []
        while len(responses) < expect:
            head_end = buffer.find(b"\r\n\r\n")
            if head_end >= 0:
                length = int(re.search(rb"Content-Length: (\d+)", buffer[:head_end]).group(1))
                if len(buffer) >= head_end + 4 + length:
                    responses.append(buffer[: head_end + 4 + length])
                    buffer = buffer[head_end + 4 + length :]
                    continue
            chunk = sock.recv(65536)
            if not chunk:
                break
            buffer += chunk
        return responses


def test_pipelined_requests_are_answered_in_order(serve, digits_slot):
    server, _ = serve(digits_slot)
    body = json.dumps({"inputs": [GOOD]}).encode()
    post = f"POST {INFER} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body
    get = b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n"
    responses = _raw(server.port, post + get + post, expect=3)
    assert [r.split(b" ", 2)[1] for r in responses] == [b"200", b"200", b"200"]
    assert b'"model_version":"1.0.0"' in responses[0]
    assert responses[1].endswith(b'{"live":true}')


def test_a_client_that_pipelines_without_reading_gets_every_answer(serve, digits_slot):
    """The server stops reading while its answers back up, then answers all in order."""
    server, _ = serve(digits_slot)
    count = 1500
    bodies = [json.dumps({"id": str(i), "inputs": [GOOD]}).encode() for i in range(count)]
    data = b"".join(f"POST {INFER} HTTP/1.1\r\nContent-Length: {len(b)}\r\n\r\n".encode() + b for b in bodies)
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a small window: answers back up
        sock.settimeout(30)
        sock.connect(("127.0.0.1", server.port))
        assert wait_for(lambda: server._connections, 5)
        for connection in server._connections:  # and a small send buffer on the server's side
            connection._transport.get_extra_info("socket").setsockopt(
                socket.SOL_SOCKET, socket.SO_SNDBUF, 4096
            )
        sender = threading.Thread(target=sock.sendall, args=(data,))
        sender.start()
        time.sleep(0.5)  # answers pile up unread meanwhile
        received = b""
        while received.count(b"HTTP/1.1 200 OK") < count or not received.endswith(b"]}]}"):
            chunk = sock.recv(1 << 20)
            assert chunk, "the server closed the connection"
            received += chunk
        sender.join(10)
    ids = re.findall(rb'"id":"(\d+)"', received)
    assert [int(i) for i in ids] == list(range(count))


def test_http10_keep_alive_is_announced(serve, digits_slot):
    server, _ = serve(digits_slot)
    request = b"GET /v2/health/live HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"
    responses = _raw(server.port, request + request, expect=2)
    assert len(responses) == 2
    assert b"Connection: keep-alive" in responses[0]
    [closing] = _raw(server.port, b"GET /v2/health/live HTTP/1.0\r\n\r\n")
    assert b"Connection: close" in closing


def test_http_framing_errors(serve, digits_slot):
    server, _ = serve(digits_slot)
    [chunked] = _raw(
        server.port, f"POST {INFER} HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n".encode()
    )
    assert chunked.startswith(b"HTTP/1.1 411 ")
    assert b"send a Content-Length" in chunked
    [huge] = _raw(server.port, f"POST {INFER} HTTP/1.1\r\nContent-Length: {1 << 40}\r\n\r\n".encode())
    assert huge.startswith(b"HTTP/1.1 413 ")
    [garbage] = _raw(server.port, b"HELLO\r\n\r\n")
    assert garbage.startswith(b"HTTP/1.1 400 ")
    assert b"malformed request line" in garbage


def test_expect_100_continue(serve, digits_slot):
    server, _ = serve(digits_slot)
    body = json.dumps({"inputs": [GOOD]}).encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(
            f"POST {INFER} HTTP/1.1\r\nContent-Length: {len(body)}\r\nExpect: 100-continue\r\n\r\n".encode()
        )
        assert sock.recv(100) == b"HTTP/1.1 100 Continue\r\n\r\n"
        sock.sendall(body)
        assert sock.recv(65536).startswith(b"HTTP/1.1 200 OK")


def test_a_head_dribbled_past_the_limit_is_431(serve, digits_slot):
    """A header that never ends, a few KiB per packet (llhttp holds an unfinished header
    whole): refused once 64 KiB of it arrived, not when it ends."""
    server, _ = serve(digits_slot)
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(f"POST {INFER} HTTP/1.1\r\nX-Pad: ".encode())
        for _ in range(200):  # up to 800 KiB
            try:
                sock.sendall(b"a" * 4096)
            except (BrokenPipeError, ConnectionResetError):
                break
            time.sleep(0.002)
        received = sock.recv(65536)
    assert received.startswith(b"HTTP/1.1 431 ")


def test_an_upgrade_header_is_ignored(serve, digits_slot):
    """HTTP/1.1 goes on after a request that asks for another protocol (h2c), body and all."""
    server, _ = serve(digits_slot)
    body = json.dumps({"inputs": [GOOD]}).encode()
    upgrade = "Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n"
    get = f"GET /v2/health/live HTTP/1.1\r\n{upgrade}\r\n".encode()
    post = f"POST {INFER} HTTP/1.1\r\n{upgrade}Content-Length: {len(body)}\r\n\r\n".encode() + body
    responses = _raw(server.port, get + post + get, expect=3)
    assert [r.split(b" ", 2)[1] for r in responses] == [b"200", b"200", b"200"]
    assert b'"model_version":"1.0.0"' in responses[1]


def test_head_gets_the_length_without_the_body(serve, digits_slot):
    server, _ = serve(digits_slot)
    get = b"GET /v2/health/live HTTP/1.1\r\n\r\n"
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(
            b"HEAD /v2/health/live HTTP/1.1\r\n\r\n" + f"HEAD {INFER} HTTP/1.1\r\n\r\n".encode() + get
        )
        received = b""
        while not received.endswith(b'{"live":true}'):
            chunk = sock.recv(65536)
            assert chunk
            received += chunk
    head, head_infer, get = received.split(b"HTTP/1.1 ")[1:]
    assert head.startswith(b"200 OK")
    assert head.endswith(b"Content-Length: 13\r\n\r\n")  # no body follows
    assert head_infer.startswith(b"405 ")
    assert head_infer.endswith(b"\r\n\r\n")
    assert get.startswith(b"200 OK")


def test_limits_come_from_the_agent_config_and_typos_fail():
    base = {
        "device": "pi-01",
        "fleet": "lab",
        "profile": "x86-64-cpu",
        "mqtt": {"username": "u", "password": "p"},
    }
    config = AgentConfig.model_validate(
        {**base, "http": {"limits": {"max_connections": 8, "idle_timeout_s": 5}}}
    )
    assert config.http.limits == ServingLimits(max_connections=8, idle_timeout_s=5)
    assert AgentConfig.model_validate(base).http.limits == ServingLimits()
    with pytest.raises(ValidationError, match="max_conections"):
        AgentConfig.model_validate({**base, "http": {"limits": {"max_conections": 8}}})


def test_serve_refuses_an_unknown_limit(digits_bundles):
    result = run_edgec(
        "agent", "serve", digits_bundles["x86-64-cpu"], "--port", "0", "--limit", "max_conections=3"
    )
    assert result.returncode == 2
    assert "--limit max_conections: Extra inputs are not permitted" in result.stderr
    assert "max_connections" in result.stderr


@pytest.mark.parametrize("workers", [0, 2])
def test_100_continue_comes_after_the_answers_before_it(serve, digits_slot, workers):
    server, _ = serve(digits_slot, workers=workers)
    body = json.dumps({"inputs": [GOOD]}).encode()
    first = f"POST {INFER} HTTP/1.1\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body
    second = f"POST {INFER} HTTP/1.1\r\nContent-Length: {len(body)}\r\nExpect: 100-continue\r\n\r\n"
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(first + second.encode())
        received = b""
        while b"HTTP/1.1 100 Continue\r\n\r\n" not in received:
            chunk = sock.recv(65536)
            assert chunk
            received += chunk
        assert received.startswith(b"HTTP/1.1 200 OK")  # the first answer, then the 100
        assert received.endswith(b"HTTP/1.1 100 Continue\r\n\r\n")
        sock.sendall(body)
        answer = b""
        while not answer.endswith(b"]}]}"):
            chunk = sock.recv(65536)
            assert chunk
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 200 OK")


class _Broken:
    """A loaded model whose runtime fails."""

    def __init__(self, manifest) -> None:
        self.manifest = manifest

    def infer(self, inputs):
        raise RuntimeError("the accelerator fell over\nsecond line")

    def close(self) -> None:
        pass


def test_runtime_failure_is_a_500_and_reported(serve, digits_bundles):
    slot = ModelSlot()
    slot.swap(_Broken(read_manifest(digits_bundles["x86-64-cpu"])))
    calls = []
    _, client = serve(slot, on_request=lambda *args: calls.append(args))
    status, document = client.post(INFER, {"inputs": [GOOD]})
    assert (status, document) == (500, {"error": "inference failed: the accelerator fell over"})
    assert wait_for(lambda: calls, 5)  # called right after the response is written
    [(version, latency_s, ok, inputs, outputs)] = calls
    assert (version, ok, outputs) == ("1.0.0", False, None)
    assert latency_s > 0
    assert list(inputs) == ["x"]


def test_on_request_gets_each_inference(serve, digits_slot, samples):
    calls = []
    _, client = serve(digits_slot, on_request=lambda *args: calls.append(args))
    client.post(INFER, infer_document(samples[0]))
    client.post(INFER, {"inputs": [{**GOOD, "shape": [1, 8, 8]}]})  # refused: never reaches the model
    client.get("/v2/health/ready")
    assert wait_for(lambda: calls, 5)
    time.sleep(0.1)  # the refused request must not add a call
    [(version, latency_s, ok, inputs, outputs)] = calls
    assert version == "1.0.0"
    assert ok
    assert 0 < latency_s < 5
    np.testing.assert_array_equal(inputs["x"], samples[0])
    assert outputs["logits"].shape == (1, 10)


def test_a_failing_on_request_does_not_break_serving(serve, digits_slot, samples):
    def broken(*_args):
        raise ValueError("telemetry bug")

    _, client = serve(digits_slot, on_request=broken)
    assert client.post(INFER, infer_document(samples[0]))[0] == 200
    assert client.post(INFER, infer_document(samples[0]))[0] == 200


def test_a_taken_port_is_a_listen_error(serve, digits_slot):
    server, _ = serve(digits_slot)
    with pytest.raises(ListenError, match=f"cannot listen on 127.0.0.1:{server.port}"):
        InferenceServer(digits_slot, port=server.port).start()


# --------------------------------------------------------------------------- swaps under load


@pytest.mark.parametrize("workers", [0, 2])
def test_swap_under_load_loses_no_request_and_each_answer_names_its_model(
    serve, digits_bundles, digits_doubled_bundle, samples, workers
):
    v1, v2 = digits_bundles["x86-64-cpu"], digits_doubled_bundle
    expected = {"1.0.0": [], "2.0.0": []}
    reference = {"1.0.0": load_bundle(v1), "2.0.0": load_bundle(v2)}
    for x in samples:
        for version, model in reference.items():
            expected[version].append(model.infer({"x": x})["logits"].ravel())
    np.testing.assert_allclose(expected["2.0.0"][0], 2 * expected["1.0.0"][0], rtol=1e-5)

    slot = ModelSlot()
    slot.swap(load_bundle(v1))
    server, _ = serve(slot, workers=workers)
    stop = threading.Event()
    sent = Counter()
    answered: list[tuple[int, str, int, bool]] = []  # (client, version, sample, matches)
    failures: list[str] = []

    def client_loop(index: int) -> None:
        client = Client(server.port)
        n = 0
        try:
            while not stop.is_set():
                sample = (index + n) % len(samples)
                n += 1
                sent[index] += 1
                status, document = client.post(INFER, infer_document(samples[sample]))
                if status != 200:
                    failures.append(f"{status} {document}")
                    continue
                version = document["model_version"]
                got = np.array(document["outputs"][0]["data"], np.float32)
                answered.append(
                    (index, version, sample, np.allclose(got, expected[version][sample], rtol=1e-5))
                )
        except Exception as e:  # a dropped connection is a lost request
            failures.append(repr(e))
        finally:
            client.close()

    threads = [threading.Thread(target=client_loop, args=(i,)) for i in range(6)]
    for thread in threads:
        thread.start()
    drained = []
    for swap in range(6):
        time.sleep(0.15)
        bundle = v2 if swap % 2 == 0 else v1
        event = slot.swap(load_bundle(bundle))
        assert event is not None
        drained.append(event)
    time.sleep(0.15)
    stop.set()
    for thread in threads:
        thread.join(20)

    assert not failures, failures[:3]
    assert len(answered) == sum(sent.values()) > 100  # every request got its answer
    assert all(matches for *_, matches in answered), "an answer's outputs do not match the version it names"
    versions = Counter(version for _, version, _, _ in answered)
    assert set(versions) == {"1.0.0", "2.0.0"}, versions
    assert all(event.wait(5) for event in drained)  # every swapped-out model drained and closed


def test_in_process_api_is_the_slot(digits_slot, samples):
    model, outputs = digits_slot.infer({"x": samples[0]})
    assert model.manifest.version == "1.0.0"
    assert outputs["logits"].shape == (1, 10)


def test_edgec_agent_serve_serves_a_bundle(digits_bundles, samples):
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "edgec",
            "agent",
            "serve",
            str(digits_bundles["raspberry-pi-4"]),
            "--port",
            "0",
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = process.stdout.readline()
        found = re.search(r"http://127\.0\.0\.1:(\d+)", line)
        assert found, line + process.stderr.read()
        client = Client(int(found.group(1)))
        assert client.get("/v2/health/ready")[0] == 200
        status, document = client.post(INFER, infer_document(samples[0]))
        assert status == 200
        assert document["model_version"] == "1.0.0"
        client.close()
    finally:
        process.terminate()
        process.wait(10)
