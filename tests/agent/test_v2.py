"""The v2 (KServe) encoding on its own: request bodies parsed to arrays with no server and no I/O."""

from __future__ import annotations

import json

import numpy as np
import pytest

from agent._http_messages import HttpError
from agent._v2 import InferRequest


def _binary_request(document: dict, *blobs: bytes) -> tuple[bytes, dict[bytes, bytes]]:
    head = json.dumps(document).encode()
    return head + b"".join(blobs), {b"inference-header-content-length": str(len(head)).encode()}


def _input(name: str, shape: list[int], datatype: str, **parameters: object) -> dict:
    return {"name": name, "shape": shape, "datatype": datatype, "parameters": parameters}


def test_binary_inputs_are_read_in_order_after_the_json_header():
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    b = np.array([7, -8], dtype=np.int64)
    body, headers = _binary_request(
        {
            "inputs": [
                _input("a", [2, 3], "FP32", binary_data_size=24),
                _input("b", [2], "INT64", binary_data_size=16),
            ]
        },
        a.astype("<f4").tobytes(),
        b.astype("<i8").tobytes(),
    )
    request = InferRequest(body, headers)
    np.testing.assert_array_equal(request.inputs["a"], a)
    np.testing.assert_array_equal(request.inputs["b"], b)
    assert request.inputs["a"].dtype == np.float32
    assert request.outputs is None


def test_a_binary_size_that_does_not_fit_the_shape_is_refused():
    body, headers = _binary_request({"inputs": [_input("a", [2, 3], "FP32", binary_data_size=20)]}, bytes(20))
    with pytest.raises(HttpError, match="does not match its shape") as caught:
        InferRequest(body, headers)
    assert caught.value.status == 400


def test_bytes_after_the_declared_inputs_are_refused():
    body, headers = _binary_request({"inputs": [_input("a", [1], "UINT8", binary_data_size=1)]}, b"\x01\x02")
    with pytest.raises(HttpError, match="1 bytes of binary data follow") as caught:
        InferRequest(body, headers)
    assert caught.value.status == 400


def test_a_header_length_past_the_body_is_refused():
    with pytest.raises(HttpError, match="not a length within") as caught:
        InferRequest(b"{}", {b"inference-header-content-length": b"3"})
    assert caught.value.status == 400


def test_json_data_with_the_wrong_count_for_its_shape_is_refused():
    body = json.dumps({"inputs": [{"name": "x", "shape": [2, 2], "datatype": "FP32", "data": [1, 2, 3]}]})
    with pytest.raises(HttpError, match="holds 3 values") as caught:
        InferRequest(body.encode(), {})
    assert caught.value.status == 400


def test_outputs_asked_for_binary_follow_the_request_default():
    body = json.dumps(
        {
            "inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1.0]}],
            "parameters": {"binary_data_output": True},
            "outputs": [{"name": "y"}, {"name": "z", "parameters": {"binary_data": False}}],
        }
    )
    assert InferRequest(body.encode(), {}).outputs == {"y": True, "z": False}
