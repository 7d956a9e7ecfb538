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
    GET  /metrics                              Prometheus metrics (with ``metrics``: ``agent.metrics``)
    POST|GET|DELETE /v2/shadow                 a shadow run by hand (with ``shadow``: ``agent._shadow_api``)

Tensors travel as JSON (``data``, row-major, flat or nested) or with the binary tensor data
extension: the body starts with the JSON header, whose length the
``Inference-Header-Content-Length`` HTTP header gives, and raw little-endian tensors follow in
the order of the inputs that declare ``parameters.binary_data_size``. Outputs come back binary
when the request asks (per output ``parameters.binary_data``, or for all of them with
``parameters.binary_data_output``).

The module holds the routes and the server's life cycle; the v2 encoding (request and
response bodies, the binary tensor data extension) is ``agent._v2``, with no I/O, and the
transport is ``agent._http`` (``HttpServer``), handed ``InferenceServer``'s dispatch.

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

With ``metrics`` (an ``agent.metrics.AgentMetrics``; the agent's ``[metrics] enabled``), every
infer request is counted once with the status it was answered, under the served model's
name and version (empty for one that named no model served here), its handling time goes
into a histogram, and ``GET /metrics`` answers the Prometheus text format 0.0.4. The request
path pays two dictionary lookups, one counter and one histogram observation (1.5-3 us, against
about 200 us of server CPU per request); a scrape is rendered on the event loop (0.6-1.2 ms,
8 KB). bench/bench_agent_serving.py ``--metrics-overhead`` measures both sides
(bench/results/agent_serving_metrics.md).

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
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import unquote

import numpy as np

from agent._http import HttpConnection, HttpServer, ListenError
from agent._http_messages import HttpError, Request, Response, error_response
from agent._shadow_api import ShadowControl
from agent._v2 import DATATYPES, InferRequest, infer_response, json_response, model_metadata
from agent.config import ServingLimits
from agent.metrics import CONTENT_TYPE, AgentMetrics, RequestSeries
from agent.runtime import InputError
from agent.slot import LoadedModel, ModelSlot, NoModelError
from edgec import __version__

__all__ = ["DATATYPES", "InferenceServer", "ListenError", "OnInfer", "OnRequest", "ServingLimits"]

logger = logging.getLogger(__name__)

SERVER_NAME = "edgec-agent"
MAX_CACHED_TARGET = 256

OnRequest = Callable[
    [str, float, bool, Mapping[str, np.ndarray] | None, Mapping[str, np.ndarray] | None], None
]
"""``on_request(model_version, latency_s, ok, inputs, outputs)``: called in the server's
thread after each inference's response is written (``ok`` False for a runtime failure; a
request refused for bad input never reaches the model and is not reported). Keep it cheap:
it runs on the event loop (``agent.telemetry.WindowRecorder.record`` fits)."""

OnInfer = Callable[[str, float, bool, Mapping[str, np.ndarray], Mapping[str, np.ndarray] | None], None]
"""``on_infer(model_version, infer_s, ok, inputs, outputs)``: as ``on_request``, called right
after it, with the model's own inference time (``model.infer`` alone, no HTTP handling): what
a shadow run compares a candidate's time with (``agent.shadow.ShadowTap.offer`` fits)."""


# --------------------------------------------------------------------------- the routes


class _Api:
    """Routes a request to the v2 endpoint; runs in the event loop (or a worker for infer)."""

    def __init__(self, slot: ModelSlot, metrics: AgentMetrics | None = None) -> None:
        self.slot = slot
        self.metrics = metrics
        self.on_request: OnRequest | None = None
        self.on_infer: OnInfer | None = None
        self.shadow: ShadowControl | None = None
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
        if path == "/metrics" and self.metrics is not None:
            if method not in ("GET", "HEAD"):
                raise HttpError(405, f"/metrics takes GET, not {method}")
            return "metrics", None
        parts = [unquote(p) for p in path.strip("/").split("/")]
        if parts[:1] != ["v2"]:
            raise HttpError(404, f"no such endpoint {path!r}; this server speaks the KServe v2 API under /v2")
        rest = parts[1:]
        if rest == ["shadow"] and self.shadow is not None:
            if method not in ("GET", "HEAD", "POST", "DELETE"):
                raise HttpError(405, f"/v2/shadow takes GET, POST or DELETE, not {method}")
            return "shadow", None
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
            return json_response(200, {"live": True})
        if endpoint == "health_ready":
            ready = self.slot.model is not None
            return json_response(200 if ready else 503, {"ready": ready})
        if endpoint == "server":
            return json_response(
                200, {"name": SERVER_NAME, "version": __version__, "extensions": ["binary_tensor_data"]}
            )
        if endpoint == "metrics" and self.metrics is not None:
            return Response(200, self.metrics.exposition(), CONTENT_TYPE)
        with self.slot.lease() as model:
            self._check_model(model, *arguments)
            if endpoint == "ready":
                return json_response(200, {"name": model.manifest.name, "ready": True})
            return json_response(200, model_metadata(model))

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
        """The answer to an infer request, a refusal included; counted in ``metrics`` (under
        the served model once the request is known to be for it)."""
        started = time.perf_counter()
        metrics = self.metrics
        series: RequestSeries | None = None if metrics is None else metrics.unserved
        try:
            with self.slot.lease() as model:
                self._check_model(model, *arguments)
                if metrics is not None:
                    series = metrics.series(model.manifest)
                response = self._infer(model, headers, body, started)
        except Exception as e:
            response = _refusal(e, "infer")
        if series is not None:
            series.observe(response.status, time.perf_counter() - started)
        return response

    def _infer(
        self, model: LoadedModel, headers: Mapping[bytes, bytes], body: bytes | bytearray, started: float
    ) -> Response:
        request = InferRequest(body, headers)
        names = {s.name for s in model.manifest.outputs} if request.outputs else ()
        for name in request.outputs or ():
            if name not in names:
                raise HttpError(
                    400, f"unknown output {name!r}: the model gives {', '.join(map(repr, sorted(names)))}"
                )
        infer_started = time.perf_counter()
        try:
            outputs = model.infer(request.inputs)
        except InputError as e:
            raise HttpError(400, str(e)) from None
        except Exception as e:  # the runtime's own failure: the server's fault, not the client's
            infer_s = time.perf_counter() - infer_started
            logger.exception("inference failed on %s %s", model.manifest.name, model.manifest.version)
            text = (str(e).strip() or type(e).__name__).splitlines()[0][:300]
            response = error_response(500, f"inference failed: {text}")
            self._report(response, model, started, infer_s, ok=False, inputs=request.inputs, outputs=None)
            return response
        infer_s = time.perf_counter() - infer_started
        response = infer_response(model, request, outputs)
        self._report(response, model, started, infer_s, ok=True, inputs=request.inputs, outputs=outputs)
        return response

    def _report(
        self,
        response: Response,
        model: LoadedModel,
        started: float,
        infer_s: float,
        *,
        ok: bool,
        inputs: Mapping[str, np.ndarray],
        outputs: Mapping[str, np.ndarray] | None,
    ) -> None:
        """Call ``on_request`` and ``on_infer`` once ``response`` is written."""
        on_request, on_infer = self.on_request, self.on_infer
        if on_request is None and on_infer is None:
            return
        version, latency_s = model.manifest.version, time.perf_counter() - started

        def report() -> None:
            if on_request is not None:
                try:
                    on_request(version, latency_s, ok, inputs, outputs)
                except Exception:  # telemetry must never break serving
                    logger.exception("on_request callback failed")
            if on_infer is not None:
                try:
                    on_infer(version, infer_s, ok, inputs, outputs)
                except Exception:  # nor a shadow run
                    logger.exception("on_infer callback failed")

        response.after_write = report


def _handle(
    api: _Api, endpoint: str, arguments: Any, headers: Mapping[bytes, bytes], body: bytes | bytearray
) -> Response:
    if endpoint == "infer":
        return api.infer(arguments, headers, body)
    try:
        return api.get(endpoint, arguments)
    except Exception as e:
        return _refusal(e, endpoint)


def _refusal(error: Exception, endpoint: str) -> Response:
    """The answer to a request whose handler raised ``error``: whose fault it is decides the
    status. Call it from an ``except`` block (a bug is logged with its traceback)."""
    if isinstance(error, HttpError):
        return error_response(error.status, str(error))
    if isinstance(error, InputError):
        return error_response(400, str(error))
    if isinstance(error, NoModelError):
        return error_response(503, str(error))
    logger.exception("request handler failed on %s", endpoint)  # a bug: answered, and logged
    return error_response(500, f"internal error: {type(error).__name__}")


# --------------------------------------------------------------------------- the server


class InferenceServer:
    """The v2 API over ``slot`` on ``host:port`` (``port=0``: a free one), in its own thread.

    ``start()`` returns the port once the server listens; ``stop()`` closes it and every
    connection. ``workers``: 0 runs inference inline on the event loop, N in N threads (see
    the module docstring). ``on_request``: see ``OnRequest``; ``on_infer``: see ``OnInfer``.
    ``limits``: see the module docstring (None: the defaults). ``metrics``: counts every infer
    request and serves ``GET /metrics`` (``agent.metrics``; None: neither). ``shadow``: serves
    ``/v2/shadow`` (``agent._shadow_api``; None: a 404), stopped with the server.
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
        metrics: AgentMetrics | None = None,
        on_infer: OnInfer | None = None,
        shadow: ShadowControl | None = None,
    ) -> None:
        if workers < 0:
            raise ValueError(f"workers must be >= 0, got {workers}")
        self.slot = slot
        self.host = host
        self.port = port
        self.workers = workers
        self.limits = limits or ServingLimits()
        self.metrics = metrics
        if metrics is not None:
            metrics.watch(slot)
        self._api = _Api(slot, metrics)
        self._api.shadow = self.shadow = shadow
        self.on_request = on_request
        self.on_infer = on_infer
        self._http = HttpServer(self._dispatch, self.limits, host, port)
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None

    @property
    def on_request(self) -> OnRequest | None:
        return self._api.on_request

    @on_request.setter
    def on_request(self, callback: OnRequest | None) -> None:
        self._api.on_request = callback

    @property
    def on_infer(self) -> OnInfer | None:
        return self._api.on_infer

    @on_infer.setter
    def on_infer(self, callback: OnInfer | None) -> None:
        self._api.on_infer = callback

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def max_connections(self) -> int:
        """The connection cap in force (``limits.max_connections``, or derived from RLIMIT_NOFILE)."""
        return self._http.max_connections

    @property
    def buffered_body_bytes(self) -> int:
        """Bytes of request bodies held now (declared lengths, read or still arriving)."""
        return self._http.buffered_body_bytes

    @property
    def _connections(self) -> set[HttpConnection]:
        return self._http.connections

    def _dispatch(self, request: Request) -> Response | asyncio.Future[Response]:
        method, target, headers, body, _keep_alive, _http10, _reserved = request
        endpoint, arguments = self._api.route(method, target)
        if endpoint == "shadow" and self.shadow is not None:  # loading a bundle takes seconds: off the loop
            return asyncio.get_running_loop().run_in_executor(None, self.shadow.request, method, body)
        if endpoint != "infer" or self._executor is None:
            return _handle(self._api, endpoint, arguments, headers, body)
        return asyncio.get_running_loop().run_in_executor(
            self._executor, _handle, self._api, endpoint, arguments, headers, body
        )

    def start(self) -> int:
        if self.workers and self._executor is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(
                self.workers, thread_name_prefix="edgec-infer"
            )
        try:
            self.port = self._http.start()
        except ListenError:
            self._shut_down_workers()
            raise
        logger.info(
            "serving the v2 inference API on %s (at most %d connections)", self.url, self.max_connections
        )
        return self.port

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop listening, close every connection, and wait for the server's thread."""
        self._http.stop(timeout_s)
        self._shut_down_workers()
        if self.shadow is not None:
            self.shadow.close()

    def _shut_down_workers(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None

    def __enter__(self) -> InferenceServer:
        self.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()
