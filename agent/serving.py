"""The agent's local inference API: the Open Inference Protocol (KServe v2) over HTTP/1.1.

``InferenceServer`` serves whatever model is current in a ``ModelSlot``; every inference
leases that model for its duration, so a swap never drops a request, and every response
names the ``model_version`` of the model that actually answered. Endpoints::

    GET  /v2/health/live                       200 while the server runs
    GET  /v2/health/ready                      200 when a model is installed, else 503
    GET  /v2                                   server metadata
    GET  /v2/models/{name}[/versions/{v}]      model metadata (tensors in the SOURCE layout)
    GET  /v2/models/{name}[/versions/{v}]/ready
    POST /v2/models/{name}[/versions/{v}]/infer

Tensors travel as JSON (``data``, row-major, flat or nested) or with the binary tensor data
extension: the body starts with the JSON header, whose length the
``Inference-Header-Content-Length`` HTTP header gives, and raw little-endian tensors follow in
the order of the inputs that declare ``parameters.binary_data_size``. Outputs come back binary
when the request asks (per output ``parameters.binary_data``, or for all of them with
``parameters.binary_data_output``).

Client mistakes are 4xx with ``{"error": "..."}`` saying what is wrong (never a 500); no model
installed is 503; a runtime failure is 500. The HTTP layer is a small asyncio protocol
(keep-alive, pipelining, ``Content-Length`` bodies, ``Expect: 100-continue``; no chunked
request bodies) running its own event loop in its own thread.

``workers`` picks where inference runs. ``0`` (the default) runs it inline in the event loop;
``workers=N`` in a pool of N threads. On the digits model on 2 cores, inline gave more
requests/s at every concurrency measured (1, 4, 16: 1.9k, 2.5k, 2.9k against 1.5k, 1.9k, 2.0k
with 2 threads), 0.33 ms against 0.47 ms p50 over a direct ``session.run`` at concurrency 1,
and 270-300 against 410-480 us of server CPU per request (bench/bench_agent_serving.py,
bench/results/agent_serving.md): handing a request to a thread and back costs more than such
a model's whole inference. A pool keeps health checks answering while a slow model computes
and lets several cores share the work (onnxruntime releases the GIL).

In-process callers need no HTTP: they use the ``ModelSlot`` itself::

    model, outputs = slot.infer({"x": array})  # outputs keyed by name, source layout
    model.manifest.version                     # the model that answered

which raises ``agent.runtime.InputError`` for tensors that do not fit and
``agent.slot.NoModelError`` before a model is installed.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import math
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

import numpy as np

from agent.runtime import InputError, convert_dtype
from agent.slot import LoadedModel, ModelSlot, NoModelError
from edgec import __version__
from edgec.errors import UserInputError
from edgec.manifest import TensorSpec

__all__ = ["DATATYPES", "InferenceServer", "ListenError", "OnRequest"]

logger = logging.getLogger(__name__)

MAX_HEAD_BYTES = 64 * 1024
MAX_BODY_BYTES = 64 * 1024 * 1024
SERVER_NAME = "edgec-agent"

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

OnRequest = Callable[
    [str, float, bool, Mapping[str, np.ndarray] | None, Mapping[str, np.ndarray] | None], None
]
"""``on_request(model_version, latency_s, ok, inputs, outputs)``: called in the server's
thread after each inference's response is written (``ok`` False for a runtime failure; a
request refused for bad input never reaches the model and is not reported). Keep it cheap:
it runs on the event loop (``agent.telemetry.WindowRecorder.record`` fits)."""


class ListenError(UserInputError):
    """The server cannot listen on the host and port asked for."""


class _HttpError(Exception):
    """A request that gets a 4xx/5xx JSON error."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


_REASONS = {
    100: "Continue",
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    411: "Length Required",
    413: "Content Too Large",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


@dataclass
class _Response:
    status: int
    body: bytes
    content_type: str = "application/json"
    headers: tuple[tuple[str, str], ...] = ()
    report: tuple[str, float, bool, Any, Any] | None = None  # on_request's arguments

    def encode(self, keep_alive: bool, announce: bool = False) -> bytes:
        """The response on the wire; ``announce``: say keep-alive (to HTTP/1.0 clients)."""
        head = [
            f"HTTP/1.1 {self.status} {_REASONS.get(self.status, 'Error')}",
            f"Content-Type: {self.content_type}",
            f"Content-Length: {len(self.body)}",
        ]
        head += [f"{k}: {v}" for k, v in self.headers]
        if not keep_alive:
            head.append("Connection: close")
        elif announce:
            head.append("Connection: keep-alive")
        return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + self.body


def _json(status: int, document: Any) -> _Response:
    return _Response(status, _ENCODER.encode(document).encode())


def _error(status: int, message: str) -> _Response:
    return _json(status, {"error": message})


# --------------------------------------------------------------------------- the v2 API


def _tensor_metadata(spec: TensorSpec) -> dict[str, Any]:
    shape = spec.source_shape if spec.source_shape is not None else spec.shape
    quantized = spec.scale is not None and spec.zero_point is not None
    dtype = "float32" if quantized else spec.dtype  # the agent (de)quantizes int8 I/O itself
    return {
        "name": spec.name,
        "datatype": _KSERVE_NAMES.get(np.dtype(dtype), dtype.upper()),
        "shape": list(shape),
    }


def _model_metadata(model: LoadedModel) -> dict[str, Any]:
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
        raise _HttpError(400, f"input {name!r}: 'shape' must be a list of non-negative integers")
    return tuple(value)


def _datatype(name: str, value: Any) -> np.dtype[Any]:
    dtype = DATATYPES.get(value) if isinstance(value, str) else None
    if dtype is None:
        raise _HttpError(
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
        raise _HttpError(400, f"input {name!r}: 'data' is not a regular array of {datatype} values")
    count = math.prod(shape)
    if array.size != count:
        raise _HttpError(
            400, f"input {name!r}: 'data' holds {array.size} values, its shape {list(shape)} needs {count}"
        )
    return convert_dtype(name, array, dtype, wanted="its datatype is").reshape(shape)


class _Request:
    """A parsed infer request: its inputs as arrays, and the outputs asked for."""

    def __init__(self, body: bytes, headers: Mapping[str, str]) -> None:
        header_length = headers.get("inference-header-content-length")
        if header_length is None:
            json_part, self._binary, self._offset = body, b"", 0
        else:
            try:
                length = int(header_length)
            except ValueError:
                length = -1
            if not 0 <= length <= len(body):
                raise _HttpError(
                    400,
                    f"Inference-Header-Content-Length {header_length!r} is not a length within "
                    f"the {len(body)}-byte body",
                )
            json_part, self._binary, self._offset = body[:length], body, length
        try:
            document = json.loads(json_part)
        except (ValueError, UnicodeDecodeError) as e:
            raise _HttpError(400, f"request body is not valid JSON: {e}") from None
        if not isinstance(document, dict):
            raise _HttpError(400, "request body must be a JSON object with 'inputs'")
        self.id = document.get("id")
        parameters = self._parameters(document, "request")
        self.binary_default = bool(parameters.get("binary_data_output", False))
        self.inputs = self._inputs(document.get("inputs"))
        self.outputs = self._outputs(document.get("outputs"))

    @staticmethod
    def _parameters(obj: Mapping[str, Any], where: str) -> Mapping[str, Any]:
        parameters = obj.get("parameters", {})
        if not isinstance(parameters, dict):
            raise _HttpError(400, f"{where}: 'parameters' must be an object")
        return parameters

    def _inputs(self, inputs: Any) -> dict[str, np.ndarray]:
        if not isinstance(inputs, list) or not inputs:
            raise _HttpError(400, "'inputs' must be a non-empty list of tensors")
        arrays: dict[str, np.ndarray] = {}
        for tensor in inputs:
            if not isinstance(tensor, dict) or not isinstance(tensor.get("name"), str):
                raise _HttpError(400, "each input must be an object with a 'name'")
            name = tensor["name"]
            if name in arrays:
                raise _HttpError(400, f"input {name!r} is given twice")
            shape = _shape(name, tensor.get("shape"))
            dtype = _datatype(name, tensor.get("datatype"))
            size = self._parameters(tensor, f"input {name!r}").get("binary_data_size")
            if size is not None:
                arrays[name] = self._binary_tensor(name, size, shape, dtype)
            elif "data" in tensor:
                arrays[name] = _json_tensor(name, tensor["data"], shape, dtype)
            else:
                raise _HttpError(400, f"input {name!r} has neither 'data' nor parameters.binary_data_size")
        extra = len(self._binary) - self._offset
        if extra:
            raise _HttpError(400, f"{extra} bytes of binary data follow the inputs that declare them")
        return arrays

    def _binary_tensor(
        self, name: str, size: Any, shape: tuple[int, ...], dtype: np.dtype[Any]
    ) -> np.ndarray:
        if not self._binary:
            raise _HttpError(
                400,
                f"input {name!r} declares binary data but the request has no Inference-Header-Content-Length",
            )
        if type(size) is not int or size < 0:
            raise _HttpError(400, f"input {name!r}: binary_data_size must be a non-negative integer")
        expected = math.prod(shape) * dtype.itemsize
        if size != expected:
            raise _HttpError(
                400,
                f"input {name!r}: binary_data_size {size} does not match its shape {list(shape)} "
                f"of {_KSERVE_NAMES[dtype]} ({expected} bytes)",
            )
        end = self._offset + size
        if end > len(self._binary):
            raise _HttpError(
                400,
                f"input {name!r}: binary data ends after {len(self._binary) - self._offset} of {size} bytes",
            )
        array = np.frombuffer(
            self._binary, dtype=dtype.newbyteorder("<"), count=math.prod(shape), offset=self._offset
        )
        self._offset = end
        return array.astype(dtype).reshape(shape)  # a native-order, aligned copy

    def _outputs(self, outputs: Any) -> dict[str, bool] | None:
        """Output name -> binary, or None for every output in the default form."""
        if outputs is None:
            return None
        if not isinstance(outputs, list):
            raise _HttpError(400, "'outputs' must be a list of {'name': ...} objects")
        wanted: dict[str, bool] = {}
        for tensor in outputs:
            if not isinstance(tensor, dict) or not isinstance(tensor.get("name"), str):
                raise _HttpError(400, "each requested output must be an object with a 'name'")
            parameters = self._parameters(tensor, f"output {tensor['name']!r}")
            wanted[tensor["name"]] = bool(parameters.get("binary_data", self.binary_default))
        return wanted


def _infer_response(model: LoadedModel, request: _Request, outputs: dict[str, np.ndarray]) -> _Response:
    m = model.manifest
    names = [s.name for s in m.outputs]
    wanted = request.outputs if request.outputs is not None else dict.fromkeys(names, request.binary_default)
    tensors = []
    blobs = []
    for name, binary in wanted.items():
        array = np.asarray(outputs[name])
        datatype = _KSERVE_NAMES.get(array.dtype)
        if datatype is None:
            raise _HttpError(500, f"output {name!r} has dtype {array.dtype}, which v2 cannot carry")
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
        return _Response(200, head)
    return _Response(
        200,
        b"".join([head, *blobs]),
        content_type="application/octet-stream",
        headers=(("Inference-Header-Content-Length", str(len(head))),),
    )


class _Api:
    """Routes a request to the v2 endpoint; runs in the event loop (or a worker for infer)."""

    def __init__(self, slot: ModelSlot) -> None:
        self.slot = slot

    def route(self, method: str, target: str) -> tuple[str, Any]:
        """(endpoint, arguments); raises ``_HttpError`` for an unknown path or method."""
        path = target.split("?", 1)[0]
        parts = [unquote(p) for p in path.strip("/").split("/")]
        if parts[:1] != ["v2"]:
            raise _HttpError(
                404, f"no such endpoint {path!r}; this server speaks the KServe v2 API under /v2"
            )
        rest = parts[1:]
        endpoint: str | None = None
        arguments: tuple[str, str | None] | None = None
        if rest == []:
            endpoint = "server"
        elif rest in (["health", "live"], ["health", "ready"]):
            endpoint = f"health_{rest[1]}"
        elif len(rest) >= 2 and rest[0] == "models" and rest[1]:
            name, tail = rest[1], rest[2:]
            version = None
            if len(tail) >= 2 and tail[0] == "versions":
                version, tail = tail[1], tail[2:]
            action = tail[0] if len(tail) == 1 else ("metadata" if not tail else None)
            if action in ("metadata", "ready", "infer"):
                endpoint, arguments = action, (name, version)
        if endpoint is None:
            raise _HttpError(404, f"no such endpoint {path!r}")
        allowed = "POST" if endpoint == "infer" else "GET"
        if method != allowed:
            raise _HttpError(405, f"{path} takes {allowed}, not {method}")
        return endpoint, arguments

    def get(self, endpoint: str, arguments: Any) -> _Response:
        if endpoint == "health_live":
            return _json(200, {"live": True})
        if endpoint == "health_ready":
            ready = self.slot.model is not None
            return _json(200 if ready else 503, {"ready": ready})
        if endpoint == "server":
            return _json(
                200, {"name": SERVER_NAME, "version": __version__, "extensions": ["binary_tensor_data"]}
            )
        with self.slot.lease() as model:
            self._check_model(model, *arguments)
            if endpoint == "ready":
                return _json(200, {"name": model.manifest.name, "ready": True})
            return _json(200, _model_metadata(model))

    @staticmethod
    def _check_model(model: LoadedModel, name: str, version: str | None) -> None:
        m = model.manifest
        if name != m.name:
            raise _HttpError(404, f"unknown model {name!r}; this agent serves {m.name!r}")
        if version is not None and version != m.version:
            raise _HttpError(
                404, f"model {name!r} version {version!r} is not being served (serving {m.version})"
            )

    def infer(self, arguments: Any, headers: Mapping[str, str], body: bytes) -> _Response:
        started = time.perf_counter()
        with self.slot.lease() as model:
            self._check_model(model, *arguments)
            request = _Request(body, headers)
            names = {s.name for s in model.manifest.outputs}
            for name in request.outputs or ():
                if name not in names:
                    raise _HttpError(
                        400, f"unknown output {name!r}: the model gives {', '.join(map(repr, sorted(names)))}"
                    )
            try:
                outputs = model.infer(request.inputs)
            except InputError as e:
                raise _HttpError(400, str(e)) from None
            except Exception as e:  # the runtime's own failure: the server's fault, not the client's
                logger.exception("inference failed on %s %s", model.manifest.name, model.manifest.version)
                text = (str(e).strip() or type(e).__name__).splitlines()[0][:300]
                response = _error(500, f"inference failed: {text}")
                response.report = (
                    model.manifest.version,
                    time.perf_counter() - started,
                    False,
                    request.inputs,
                    None,
                )
                return response
            response = _infer_response(model, request, outputs)
            response.report = (
                model.manifest.version,
                time.perf_counter() - started,
                True,
                request.inputs,
                outputs,
            )
            return response


def _handle(api: _Api, endpoint: str, arguments: Any, headers: Mapping[str, str], body: bytes) -> _Response:
    try:
        if endpoint == "infer":
            return api.infer(arguments, headers, body)
        return api.get(endpoint, arguments)
    except _HttpError as e:
        return _error(e.status, str(e))
    except InputError as e:
        return _error(400, str(e))
    except NoModelError as e:
        return _error(503, str(e))


# --------------------------------------------------------------------------- HTTP/1.1


class _Connection(asyncio.Protocol):
    """One keep-alive connection: parses requests from the buffer and answers them in order.

    Reading pauses while the client does not read its answers (the transport's write buffer
    is full) and while a worker thread holds a request and more than one request's worth of
    bytes waits, so a client cannot make the server buffer without bound.
    """

    def __init__(self, server: InferenceServer) -> None:
        self._server = server
        self._buffer = bytearray()
        self._transport: asyncio.Transport | None = None
        self._busy = False  # a request is in a worker thread; later ones wait in the buffer
        self._blocked = False  # the client is not reading: answer nothing more until it does
        self._reading_paused = False
        self._continued = False  # "100 Continue" sent for the request being received
        self._http10 = False  # the request being answered is HTTP/1.0 (keep-alive is announced)
        self._max_buffer = MAX_HEAD_BYTES + server.max_body_bytes

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        self._server._connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self._server._connections.discard(self)
        self._transport = None
        self._buffer.clear()

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
            self._transport = None

    def pause_writing(self) -> None:
        self._blocked = True
        self._pause_reading()

    def resume_writing(self) -> None:
        self._blocked = False
        self._resume_reading()

    def _pause_reading(self) -> None:
        if self._transport is not None and not self._reading_paused:
            self._reading_paused = True
            self._transport.pause_reading()

    def _resume_reading(self) -> None:
        if self._busy or self._blocked:
            return
        if self._reading_paused and self._transport is not None:
            self._reading_paused = False
            self._transport.resume_reading()
        if self._buffer:
            self._process()

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        if not self._busy and not self._blocked:
            self._process()
        elif len(self._buffer) > self._max_buffer:
            self._pause_reading()

    def _refuse(self, status: int, message: str) -> None:
        """An error after which the request's framing cannot be trusted: answer and close."""
        if self._transport is not None:
            self._transport.write(_error(status, message).encode(keep_alive=False))
        self.close()

    def _process(self) -> None:
        while self._transport is not None and not self._busy and not self._blocked:
            buffer = self._buffer
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(buffer) > MAX_HEAD_BYTES:
                    self._refuse(431, f"request head is over {MAX_HEAD_BYTES} bytes")
                return
            lines = bytes(buffer[:end]).decode("latin-1").split("\r\n")
            request_line = lines[0].split(" ")
            if len(request_line) != 3 or not request_line[2].startswith("HTTP/1."):
                self._refuse(400, f"malformed request line {lines[0][:100]!r}")
                return
            method, target, version = request_line
            headers: dict[str, str] = {}
            for line in lines[1:]:
                key, sep, value = line.partition(":")
                if not sep:
                    self._refuse(400, f"malformed header line {line[:100]!r}")
                    return
                headers[key.strip().lower()] = value.strip()
            if "transfer-encoding" in headers:
                self._refuse(411, "chunked request bodies are not supported: send a Content-Length")
                return
            try:
                length = int(headers.get("content-length", "0"))
                if length < 0:
                    raise ValueError
            except ValueError:
                self._refuse(400, f"bad Content-Length {headers.get('content-length')!r}")
                return
            if length > self._server.max_body_bytes:
                self._refuse(
                    413, f"request body of {length} bytes is over the {self._server.max_body_bytes} limit"
                )
                return
            start = end + 4
            if len(buffer) < start + length:
                if not self._continued and headers.get("expect", "").lower() == "100-continue":
                    self._continued = True
                    self._transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                return
            body = bytes(buffer[start : start + length])
            del buffer[: start + length]
            self._continued = False
            connection = headers.get("connection", "").lower()
            self._http10 = version == "HTTP/1.0"
            keep_alive = connection == "keep-alive" if self._http10 else connection != "close"
            self._dispatch(method, target, headers, body, keep_alive)

    def _dispatch(
        self, method: str, target: str, headers: dict[str, str], body: bytes, keep_alive: bool
    ) -> None:
        server = self._server
        try:
            endpoint, arguments = server._api.route(method, target)
        except _HttpError as e:
            self._respond(_error(e.status, str(e)), keep_alive)
            return
        if endpoint != "infer" or server._executor is None:
            self._respond(_handle(server._api, endpoint, arguments, headers, body), keep_alive)
            return
        self._busy = True
        future = asyncio.get_running_loop().run_in_executor(
            server._executor, _handle, server._api, endpoint, arguments, headers, body
        )
        future.add_done_callback(lambda f: self._finished(f, keep_alive))

    def _finished(self, future: asyncio.Future[_Response], keep_alive: bool) -> None:
        self._busy = False
        if future.cancelled():
            return
        error = future.exception()
        if error is not None:  # _handle turns every request's failure into a response
            logger.error("request handler failed", exc_info=error)
            self._respond(_error(500, f"internal error: {type(error).__name__}"), keep_alive=False)
            return
        self._respond(future.result(), keep_alive)
        self._resume_reading()

    def _respond(self, response: _Response, keep_alive: bool) -> None:
        if self._transport is None:
            return
        self._transport.write(response.encode(keep_alive, announce=self._http10))
        if not keep_alive:
            self.close()
        if response.report is not None and self._server.on_request is not None:
            try:
                self._server.on_request(*response.report)
            except Exception:  # telemetry must never break serving
                logger.exception("on_request callback failed")


class InferenceServer:
    """The v2 API over ``slot`` on ``host:port`` (``port=0``: a free one), in its own thread.

    ``start()`` returns the port once the server listens; ``stop()`` closes it and every
    connection. ``workers``: 0 runs inference inline on the event loop, N in N threads (see
    the module docstring). ``on_request``: see ``OnRequest``.
    """

    def __init__(
        self,
        slot: ModelSlot,
        host: str = "127.0.0.1",
        port: int = 0,
        on_request: OnRequest | None = None,
        *,
        workers: int = 0,
        max_body_bytes: int = MAX_BODY_BYTES,
    ) -> None:
        if workers < 0:
            raise ValueError(f"workers must be >= 0, got {workers}")
        self.slot = slot
        self.host = host
        self.port = port
        self.on_request = on_request
        self.workers = workers
        self.max_body_bytes = max_body_bytes
        self._api = _Api(slot)
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._connections: set[_Connection] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self) -> int:
        if self._thread is not None:
            raise RuntimeError("the server is already started")
        if self.workers:
            self._executor = concurrent.futures.ThreadPoolExecutor(
                self.workers, thread_name_prefix="edgec-infer"
            )
        ready: concurrent.futures.Future[int] = concurrent.futures.Future()
        self._thread = threading.Thread(target=self._serve, args=(ready,), name="edgec-v2-http", daemon=True)
        self._thread.start()
        try:
            self.port = ready.result()
        except OSError as e:
            self._thread.join()
            self._thread = None
            raise ListenError(f"cannot listen on {self.host}:{self.port}: {e.strerror or e}") from e
        logger.info("serving the v2 inference API on %s", self.url)
        return self.port

    def _serve(self, ready: concurrent.futures.Future[int]) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            try:
                self._server = loop.run_until_complete(
                    loop.create_server(
                        lambda: _Connection(self), self.host, self.port, reuse_address=True, backlog=1024
                    )
                )
            except OSError as e:
                ready.set_exception(e)
                return
            ready.set_result(int(self._server.sockets[0].getsockname()[1]))
            loop.run_forever()
            self._server.close()
            for connection in list(self._connections):
                connection.close()
            loop.run_until_complete(self._server.wait_closed())
        finally:
            loop.close()

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop listening, close every connection, and wait for the server's thread."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        if not loop.is_closed():
            loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout_s)
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None
        self._thread = self._loop = self._server = None

    def __enter__(self) -> InferenceServer:
        self.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()
