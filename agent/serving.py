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
installed is 503; a runtime failure is 500. HTTP/1.1 is parsed by llhttp (httptools) in an
asyncio protocol (``agent._http``: keep-alive, pipelining, ``Content-Length`` bodies,
``Expect: 100-continue``, HTTP/1.0, ``HEAD``; a chunked body is answered 411) running its own
event loop in its own thread.

Everything a client sends is bounded on what arrives (``ServingLimits`` in ``agent.config``:
``[http.limits]`` in agent.toml, ``--limit NAME=VALUE`` on ``edgec agent serve``), and every
refusal is an answer, after which the connection closes. The defaults:

- ``max_head_bytes`` 64 KiB: a longer head is a 431, counted as it arrives;
- ``max_body_bytes`` 64 MiB: a longer ``Content-Length`` is a 413, before the body is read;
- ``max_json_bytes`` 8 MiB: a longer JSON part (the whole body, or the binary extension's
  JSON header) is a 413, from the head: parsed JSON takes about ten times its size;
- ``max_buffered_body_bytes`` 256 MiB: the declared bodies held across all connections until
  their answers are written; a body that would pass it is a 503;
- ``max_connections``: the soft RLIMIT_NOFILE less an eighth of it (at least 64 kept for the
  model's own files), at most 4,096 (896 under the common 1,024); a new connection past it
  is answered 503;
- ``header_timeout_s`` 10, ``body_timeout_s`` 60: a head or a body not complete in time is a
  408; ``idle_timeout_s`` 30: a connection with no request in progress, or whose client does
  not read its answers, is closed.

JSON nested deeper than the parser's recursion limit (about 1,000) is a 400, as is any other
malformed request. Out of file descriptors, accepting pauses briefly and one warning per 10 s
is logged (``agent._http``).

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
import functools
import json
import logging
import math
import socket
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import unquote

import numpy as np

from agent._http import HttpCore, HttpError, Listener, Request, Response, error_response
from agent.config import ServingLimits
from agent.runtime import InputError, convert_dtype
from agent.slot import LoadedModel, ModelSlot, NoModelError
from edgec import __version__
from edgec.errors import UserInputError
from edgec.manifest import TensorSpec

__all__ = ["DATATYPES", "InferenceServer", "ListenError", "OnRequest", "ServingLimits"]

logger = logging.getLogger(__name__)

SERVER_NAME = "edgec-agent"
MAX_DIMS = 32  # of a request's tensor
MAX_DIM = (1 << 31) - 1
MAX_ID_CHARS = 1024
MAX_CACHED_TARGET = 256

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


def _json(status: int, document: Any) -> Response:
    return Response(status, _ENCODER.encode(document).encode())


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


class _Request:
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


def _infer_response(model: LoadedModel, request: _Request, outputs: dict[str, np.ndarray]) -> Response:
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


class _Api:
    """Routes a request to the v2 endpoint; runs in the event loop (or a worker for infer)."""

    def __init__(self, slot: ModelSlot) -> None:
        self.slot = slot
        self.on_request: OnRequest | None = None
        # the routes of short targets, remembered: a client asks for the same few over and over
        # (2 us a request saved); failures are not remembered, and 256 x 256 characters is small
        self._routes = functools.lru_cache(maxsize=256)(self._route)

    def route(self, method: str, target: str) -> tuple[str, Any]:
        """(endpoint, arguments); raises ``HttpError`` for an unknown path or method."""
        if len(target) <= MAX_CACHED_TARGET:
            return self._routes(method, target)
        return self._route(method, target)

    def _route(self, method: str, target: str) -> tuple[str, Any]:
        path = target.split("?", 1)[0]
        parts = [unquote(p) for p in path.strip("/").split("/")]
        if parts[:1] != ["v2"]:
            raise HttpError(404, f"no such endpoint {path!r}; this server speaks the KServe v2 API under /v2")
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
            raise HttpError(404, f"no such endpoint {path!r}")
        allowed = "POST" if endpoint == "infer" else "GET"
        if method != allowed and not (method == "HEAD" and allowed == "GET"):
            raise HttpError(405, f"{path} takes {allowed}, not {method}")
        return endpoint, arguments

    def get(self, endpoint: str, arguments: Any) -> Response:
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
            raise HttpError(404, f"unknown model {name!r}; this agent serves {m.name!r}")
        if version is not None and version != m.version:
            raise HttpError(
                404, f"model {name!r} version {version!r} is not being served (serving {m.version})"
            )

    def infer(self, arguments: Any, headers: Mapping[bytes, bytes], body: bytes | bytearray) -> Response:
        started = time.perf_counter()
        with self.slot.lease() as model:
            self._check_model(model, *arguments)
            request = _Request(body, headers)
            names = {s.name for s in model.manifest.outputs} if request.outputs else ()
            for name in request.outputs or ():
                if name not in names:
                    raise HttpError(
                        400, f"unknown output {name!r}: the model gives {', '.join(map(repr, sorted(names)))}"
                    )
            try:
                outputs = model.infer(request.inputs)
            except InputError as e:
                raise HttpError(400, str(e)) from None
            except Exception as e:  # the runtime's own failure: the server's fault, not the client's
                logger.exception("inference failed on %s %s", model.manifest.name, model.manifest.version)
                text = (str(e).strip() or type(e).__name__).splitlines()[0][:300]
                response = error_response(500, f"inference failed: {text}")
                self._report(response, model, started, ok=False, inputs=request.inputs, outputs=None)
                return response
            response = _infer_response(model, request, outputs)
            self._report(response, model, started, ok=True, inputs=request.inputs, outputs=outputs)
            return response

    def _report(
        self,
        response: Response,
        model: LoadedModel,
        started: float,
        *,
        ok: bool,
        inputs: Mapping[str, np.ndarray],
        outputs: Mapping[str, np.ndarray] | None,
    ) -> None:
        """Call ``on_request`` once ``response`` is written."""
        on_request = self.on_request
        if on_request is None:
            return
        arguments = (model.manifest.version, time.perf_counter() - started, ok, inputs, outputs)

        def report() -> None:
            try:
                on_request(*arguments)
            except Exception:  # telemetry must never break serving
                logger.exception("on_request callback failed")

        response.after_write = report


def _handle(
    api: _Api, endpoint: str, arguments: Any, headers: Mapping[bytes, bytes], body: bytes | bytearray
) -> Response:
    try:
        if endpoint == "infer":
            return api.infer(arguments, headers, body)
        return api.get(endpoint, arguments)
    except HttpError as e:
        return error_response(e.status, str(e))
    except InputError as e:
        return error_response(400, str(e))
    except NoModelError as e:
        return error_response(503, str(e))
    except Exception as e:  # a bug: answered, and logged once per request
        logger.exception("request handler failed on %s", endpoint)
        return error_response(500, f"internal error: {type(e).__name__}")


# --------------------------------------------------------------------------- the server


class InferenceServer:
    """The v2 API over ``slot`` on ``host:port`` (``port=0``: a free one), in its own thread.

    ``start()`` returns the port once the server listens; ``stop()`` closes it and every
    connection. ``workers``: 0 runs inference inline on the event loop, N in N threads (see
    the module docstring). ``on_request``: see ``OnRequest``. ``limits``: see the module
    docstring (None: the defaults).
    """

    def __init__(
        self,
        slot: ModelSlot,
        host: str = "127.0.0.1",
        port: int = 0,
        on_request: OnRequest | None = None,
        *,
        workers: int = 0,
        limits: ServingLimits | None = None,
    ) -> None:
        if workers < 0:
            raise ValueError(f"workers must be >= 0, got {workers}")
        self.slot = slot
        self.host = host
        self.port = port
        self.workers = workers
        self.limits = limits or ServingLimits()
        self._api = _Api(slot)
        self.on_request = on_request
        self._core = HttpCore(self._dispatch, self.limits)
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._listener: Listener | None = None
        self._thread: threading.Thread | None = None

    @property
    def on_request(self) -> OnRequest | None:
        return self._api.on_request

    @on_request.setter
    def on_request(self, callback: OnRequest | None) -> None:
        self._api.on_request = callback

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def max_connections(self) -> int:
        """The connection cap in force (``limits.max_connections``, or derived from RLIMIT_NOFILE)."""
        return self._core.max_connections

    @property
    def buffered_body_bytes(self) -> int:
        """Bytes of request bodies held now (declared lengths, read or still arriving)."""
        return self._core.buffered_body_bytes

    @property
    def _connections(self) -> set[Any]:
        return self._core.connections

    def _dispatch(self, request: Request) -> Response | asyncio.Future[Response]:
        method, target, headers, body, _keep_alive, _http10, _reserved = request
        endpoint, arguments = self._api.route(method, target)
        if endpoint != "infer" or self._executor is None:
            return _handle(self._api, endpoint, arguments, headers, body)
        return asyncio.get_running_loop().run_in_executor(
            self._executor, _handle, self._api, endpoint, arguments, headers, body
        )

    def start(self) -> int:
        if self._thread is not None:
            raise RuntimeError("the server is already started")
        try:
            sock = _listen(self.host, self.port)
        except OSError as e:
            raise ListenError(f"cannot listen on {self.host}:{self.port}: {e.strerror or e}") from e
        self.port = int(sock.getsockname()[1])
        if self.workers:
            self._executor = concurrent.futures.ThreadPoolExecutor(
                self.workers, thread_name_prefix="edgec-infer"
            )
        ready = threading.Event()
        self._thread = threading.Thread(
            target=self._serve, args=(sock, ready), name="edgec-v2-http", daemon=True
        )
        self._thread.start()
        ready.wait()
        logger.info(
            "serving the v2 inference API on %s (at most %d connections)", self.url, self.max_connections
        )
        return self.port

    def _serve(self, sock: socket.socket, ready: threading.Event) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        loop.set_exception_handler(self._core.loop_exception)
        try:
            self._listener = Listener(loop, sock, self._core)
            self._listener.start()
            self._core.start_sweeping(loop)
            ready.set()
            loop.run_forever()
            self._listener.close()
            self._core.close()
            loop.run_until_complete(asyncio.sleep(0))  # let the closed transports finish
        finally:
            ready.set()
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
        self._thread = self._loop = self._listener = None

    def __enter__(self) -> InferenceServer:
        self.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()


def _listen(host: str, port: int) -> socket.socket:
    """A listening socket on the first address ``host`` resolves to."""
    family, kind, proto, _, address = socket.getaddrinfo(
        host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(1024)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock
