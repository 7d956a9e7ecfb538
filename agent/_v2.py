"""The Open Inference Protocol (KServe v2) encoding, with no I/O: bodies in, bodies out.

``InferRequest`` parses an infer request's body (JSON, or JSON followed by the binary tensor
data extension's raw little-endian tensors) into arrays, bounded and checked, raising
``HttpError`` (400) that says what is wrong. ``infer_response`` encodes a model's outputs
as the request asked (JSON ``data`` or binary), ``model_metadata`` describes the model's
tensors in the source layout, and ``DATATYPES`` maps v2 datatypes to numpy dtypes.
``agent.serving`` routes requests to these; its docstring describes the API.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from agent._http_messages import HttpError, Response
from agent.runtime import convert_dtype
from agent.slot import LoadedModel
from edgec.manifest import TensorSpec

__all__ = [
    "DATATYPES",
    "MAX_DIM",
    "MAX_DIMS",
    "MAX_ID_CHARS",
    "InferRequest",
    "infer_response",
    "json_response",
    "model_metadata",
]

logger = logging.getLogger(__name__)

MAX_DIMS = 32  # of a request's tensor
MAX_DIM = (1 << 31) - 1
MAX_ID_CHARS = 1024

# KServe v2 datatypes and their numpy dtypes (BYTES and BF16 are not supported)
DATATYPES: dict[str, np.dtype[Any]] = {
    name: np.dtype(dtype)
    for name, dtype in {
        "BOOL": "bool",
        "UINT8": "uint8",
        "UINT16": "uint16",
        "UINT32": "uint32",
        "UINT64": "uint64",
        "INT8": "int8",
        "INT16": "int16",
        "INT32": "int32",
        "INT64": "int64",
        "FP16": "float16",
        "FP32": "float32",
        "FP64": "float64",
    }.items()
}
_KSERVE_NAMES = {dtype: name for name, dtype in DATATYPES.items()}  # keyed by np.dtype (.name is slow)
_ENCODER = json.JSONEncoder(separators=(",", ":"))
_PLATFORMS = {"onnx": "onnxruntime_onnx", "tflite": "tflite", "coreml": "coreml", "tensorrt": "tensorrt_plan"}


def json_response(status: int, document: Any) -> Response:
    return Response(status, _ENCODER.encode(document).encode())


def _tensor_metadata(spec: TensorSpec) -> dict[str, Any]:
    shape = spec.source_shape if spec.source_shape is not None else spec.shape
    quantized = spec.scale is not None and spec.zero_point is not None
    dtype = "float32" if quantized else spec.dtype  # the agent (de)quantizes int8 I/O itself
    return {
        "name": spec.name,
        "datatype": _KSERVE_NAMES.get(np.dtype(dtype), dtype.upper()),
        "shape": list(shape),
    }


def model_metadata(model: LoadedModel) -> dict[str, Any]:
    m = model.manifest
    return {
        "name": m.name,
        "versions": [m.version],
        "platform": _PLATFORMS.get(m.format.value, m.format.value),
        "inputs": [_tensor_metadata(s) for s in m.inputs],
        "outputs": [_tensor_metadata(s) for s in m.outputs],
    }


def _shape(name: str, value: Any) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(type(d) is int and d >= 0 for d in value):
        raise HttpError(400, f"input {name!r}: 'shape' must be a list of non-negative integers")
    if len(value) > MAX_DIMS or max(value, default=0) > MAX_DIM:
        raise HttpError(
            400, f"input {name!r}: 'shape' may have at most {MAX_DIMS} dimensions of at most {MAX_DIM}"
        )
    return tuple(value)


def _datatype(name: str, value: Any) -> np.dtype[Any]:
    dtype = DATATYPES.get(value) if isinstance(value, str) else None
    if dtype is None:
        raise HttpError(
            400, f"input {name!r}: unsupported datatype {value!r} (supported: {', '.join(DATATYPES)})"
        )
    return dtype


def _json_tensor(name: str, data: Any, shape: tuple[int, ...], dtype: np.dtype[Any]) -> np.ndarray:
    datatype = _KSERVE_NAMES[dtype]
    try:
        array = np.array(data)
    except (ValueError, TypeError, OverflowError):
        array = None
    if array is None or array.dtype.kind not in "biuf":
        raise HttpError(400, f"input {name!r}: 'data' is not a regular array of {datatype} values")
    count = math.prod(shape)
    if array.size != count:
        raise HttpError(
            400, f"input {name!r}: 'data' holds {array.size} values, its shape {list(shape)} needs {count}"
        )
    return _reshaped(name, convert_dtype(name, array, dtype, wanted="its datatype is"), shape)


def _reshaped(name: str, array: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    try:
        return array.reshape(shape)
    except ValueError:  # numpy's own bound: an empty array whose other dimensions overflow
        raise HttpError(400, f"input {name!r}: shape {list(shape)} is too large an array") from None


class InferRequest:
    """A parsed infer request: its inputs as arrays, and the outputs asked for."""

    def __init__(self, body: bytes | bytearray, headers: Mapping[bytes, bytes]) -> None:
        header = headers.get(b"inference-header-content-length")
        self._binary: bytes | bytearray
        if header is None:
            json_part, self._binary, self._offset = body, b"", 0
        else:
            header_length = header.decode("latin-1")
            length = int(header) if header.isdigit() else -1
            if not 0 <= length <= len(body):
                raise HttpError(
                    400,
                    f"Inference-Header-Content-Length {header_length!r} is not a length within "
                    f"the {len(body)}-byte body",
                )
            json_part, self._binary, self._offset = body[:length], body, length
        try:
            document = json.loads(json_part)
        except (ValueError, UnicodeDecodeError) as e:
            raise HttpError(400, f"request body is not valid JSON: {e}") from None
        except RecursionError:
            raise HttpError(400, "request body is JSON nested too deeply to parse") from None
        if not isinstance(document, dict):
            raise HttpError(400, "request body must be a JSON object with 'inputs'")
        self.id = document.get("id")
        if self.id is not None and not (isinstance(self.id, str) and len(self.id) <= MAX_ID_CHARS):
            raise HttpError(400, f"'id' must be a string of at most {MAX_ID_CHARS} characters")
        parameters = self._parameters(document, "request")
        self.binary_default = bool(parameters.get("binary_data_output", False))
        self.inputs = self._inputs(document.get("inputs"))
        self.outputs = self._outputs(document.get("outputs"))

    @staticmethod
    def _parameters(obj: Mapping[str, Any], where: str) -> Mapping[str, Any]:
        parameters = obj.get("parameters", {})
        if not isinstance(parameters, dict):
            raise HttpError(400, f"{where}: 'parameters' must be an object")
        return parameters

    def _inputs(self, inputs: Any) -> dict[str, np.ndarray]:
        if not isinstance(inputs, list) or not inputs:
            raise HttpError(400, "'inputs' must be a non-empty list of tensors")
        arrays: dict[str, np.ndarray] = {}
        for tensor in inputs:
            if not isinstance(tensor, dict) or not isinstance(tensor.get("name"), str):
                raise HttpError(400, "each input must be an object with a 'name'")
            name = tensor["name"]
            if name in arrays:
                raise HttpError(400, f"input {name!r} is given twice")
            shape = _shape(name, tensor.get("shape"))
            dtype = _datatype(name, tensor.get("datatype"))
            size = self._parameters(tensor, f"input {name!r}").get("binary_data_size")
            if size is not None:
                arrays[name] = self._binary_tensor(name, size, shape, dtype)
            elif "data" in tensor:
                arrays[name] = _json_tensor(name, tensor["data"], shape, dtype)
            else:
                raise HttpError(400, f"input {name!r} has neither 'data' nor parameters.binary_data_size")
        extra = len(self._binary) - self._offset
        if extra:
            raise HttpError(400, f"{extra} bytes of binary data follow the inputs that declare them")
        return arrays

    def _binary_tensor(
        self, name: str, size: Any, shape: tuple[int, ...], dtype: np.dtype[Any]
    ) -> np.ndarray:
        if not self._binary:
            raise HttpError(
                400,
                f"input {name!r} declares binary data but the request has no Inference-Header-Content-Length",
            )
        if type(size) is not int or size < 0:
            raise HttpError(400, f"input {name!r}: binary_data_size must be a non-negative integer")
        expected = math.prod(shape) * dtype.itemsize
        if size != expected:
            raise HttpError(
                400,
                f"input {name!r}: binary_data_size {size} does not match its shape {list(shape)} "
                f"of {_KSERVE_NAMES[dtype]} ({expected} bytes)",
            )
        end = self._offset + size
        if end > len(self._binary):
            raise HttpError(
                400,
                f"input {name!r}: binary data ends after {len(self._binary) - self._offset} of {size} bytes",
            )
        array = np.frombuffer(
            self._binary, dtype=dtype.newbyteorder("<"), count=math.prod(shape), offset=self._offset
        )
        self._offset = end
        return _reshaped(name, array.astype(dtype), shape)  # a native-order, aligned copy

    def _outputs(self, outputs: Any) -> dict[str, bool] | None:
        """Output name -> binary, or None for every output in the default form."""
        if outputs is None:
            return None
        if not isinstance(outputs, list):
            raise HttpError(400, "'outputs' must be a list of {'name': ...} objects")
        wanted: dict[str, bool] = {}
        for tensor in outputs:
            if not isinstance(tensor, dict) or not isinstance(tensor.get("name"), str):
                raise HttpError(400, "each requested output must be an object with a 'name'")
            parameters = self._parameters(tensor, f"output {tensor['name']!r}")
            wanted[tensor["name"]] = bool(parameters.get("binary_data", self.binary_default))
        return wanted


def infer_response(model: LoadedModel, request: InferRequest, outputs: dict[str, np.ndarray]) -> Response:
    m = model.manifest
    names = [s.name for s in m.outputs]
    wanted = request.outputs if request.outputs is not None else dict.fromkeys(names, request.binary_default)
    tensors = []
    blobs = []
    for name, binary in wanted.items():
        array = np.asarray(outputs[name])
        datatype = _KSERVE_NAMES.get(array.dtype)
        if datatype is None:
            raise HttpError(500, f"output {name!r} has dtype {array.dtype}, which v2 cannot carry")
        tensor: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(array.shape)}
        if binary:
            blob = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()
            tensor["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            tensor["data"] = array.ravel().tolist()
        tensors.append(tensor)
    document: dict[str, Any] = {"model_name": m.name, "model_version": m.version}
    if request.id is not None:
        document["id"] = request.id
    document["outputs"] = tensors
    head = _ENCODER.encode(document).encode()
    if not blobs:
        return Response(200, head)
    return Response(
        200,
        b"".join([head, *blobs]),
        content_type="application/octet-stream",
        headers=(("Inference-Header-Content-Length", str(len(head))),),
    )
