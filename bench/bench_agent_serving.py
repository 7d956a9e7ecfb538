"""The agent's v2 inference endpoint against FastAPI + uvicorn and MLServer serving the same model.

Run:  .venv/bin/python bench/bench_agent_serving.py [--repeats 5] [--seconds 2]
          [--mlserver-venv PATH | --no-mlserver]
      (needs the bench extra: pip install -c constraints.txt -e '.[bench]'; the plot needs
      matplotlib, in the dev extra)
      .venv/bin/python bench/bench_agent_serving.py --baseline REF [--repeats 7]
      (the agent of this tree against the agent at git REF only; no extra needed)
      .venv/bin/python bench/bench_agent_serving.py --metrics-overhead [--repeats 5] [--scrape-every 1]
      (the agent with its Prometheus metrics on against off only; no extra needed)

``--baseline REF`` measures whether a change to the agent's HTTP layer kept its speed: the
code at ``REF`` is checked out once as a git worktree under ``build/bench/``, and three agents
serve the same bundle (built by REF's compiler) with this venv, all inline (``workers=0``):
``baseline`` (REF's tree), ``baseline HTTP layer`` (REF's agent/serving.py on this tree: the
HTTP layer's change alone) and ``this tree``. For JSON and binary requests at concurrency 1,
4 and 16, each round measures the three back to back, which one goes first rotating,
``--repeats`` rounds; the tables give this tree against each of the other two: the medians,
their ratios, and the median of the per-round ratios. Writes
``bench/results/agent_serving_baseline.json`` and ``.md``. About 45 s per round.

What it measures, for the digits sample's x86-64-cpu bundle (onnx fp32, built here with
``edgec build`` into ``build/bench/agent_serving/``), on one eval sample:

1. the onnxruntime session called directly, in this process: per-call latency p50/p99 (the
   floor every server adds to), and the agent's in-process API (``RuntimeModel.infer``:
   checks, layout, the session);
2. each server in its own process, one onnxruntime session with 1 intra-op thread and the
   manifest's ``runtime_config`` in every one of them:

   - ``agent inline``: ``agent.serving.InferenceServer``, inference inline in its event loop
     (``workers=0``, the default), JSON tensors;
   - ``agent threads``: the same with a pool of 2 inference threads (``workers=2``);
   - ``agent binary``: inline, with the binary tensor data extension both ways;
   - ``fastapi``: FastAPI + uvicorn (default settings: one worker, h11, asyncio; access log
     off) serving the same v2 JSON request written the way tutorials do it: pydantic
     request models, a plain ``def`` endpoint (FastAPI runs it in its thread pool),
     ``session.run``, ``.tolist()`` into a dict response;
   - ``mlserver``: Seldon's MLServer (``mlserver start <folder>``) with a custom runtime, the
     way its users serve an ONNX model: an ``MLModel`` subclass whose ``load()`` opens the
     session and whose ``predict()`` decodes the v2 request with ``NumpyCodec`` and returns an
     ``InferenceResponse``; one process (``parallel_workers=0``), access log and metrics off,
     gRPC on a port of its own (it cannot be turned off), the agent's JSON request. MLServer
     pins protobuf 6 and edgec 7, so it runs from a venv of its own:
     ``build/bench/mlserver-venv``, created with pip when missing (about 2 minutes;
     ``--mlserver-venv PATH`` for another, ``--no-mlserver`` to leave this side out);

3. one load generator for all of them (this process, asyncio protocols, one keep-alive
   connection per concurrent client, each sending its next request when the last answer is
   in): requests/s and latency p50/p99 at concurrency 1, 4 and 16, ``--seconds`` per
   measurement after a 0.5 s warm-up; ``--repeats`` rounds with the servers and concurrencies
   interleaved; the median of the rounds is reported. Every response's status is checked
   and the first answer from each server is compared with the direct session's output;
4. each server process's resident memory (RSS, and its peak) after the load.

Servers, the load generator and the runtimes share this machine's cores: requests/s are this
machine's, not a device's. Writes ``bench/results/agent_serving.json``, ``.md`` and ``.png``
(requests/s and p99 per side and concurrency). About 3.5 minutes on 2 cores once the MLServer
venv exists; creating it adds 1 to 2 minutes.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
from bench._common import ResponseFramer, library_versions  # noqa: E402

RESULTS = ROOT / "bench" / "results"
DIGITS = ROOT / "samples" / "digits"
CONCURRENCY = (1, 4, 16)
WARMUP_S = 0.5
LIBRARIES = (
    "onnxruntime",
    "numpy",
    "fastapi",
    "uvicorn",
    "starlette",
    "pydantic",
    "h11",
    "uvloop",
    "httptools",
)
MLSERVER_PINS = ("mlserver==1.7.1", "onnxruntime==1.32.0", "numpy==2.4.6")
MLSERVER_LIBRARIES = (
    "mlserver",
    "onnxruntime",
    "numpy",
    "fastapi",
    "uvicorn",
    "starlette",
    "pydantic",
    "h11",
    "uvloop",
    "httptools",
    "orjson",
)
MLSERVER_VENV = ROOT / "build" / "bench" / "mlserver-venv"
MLSERVER_REPO = ROOT / "build" / "bench" / "mlserver-repo"
MLSERVER_START_S = 120
NOTES = """\
- p50 added: the server's p50 at concurrency 1 minus `session.run`'s p50 in-process: what HTTP,
  JSON and the agent's checks add to a request on its own.
- server CPU: the server process's user + system CPU time per answered request (warm-up
  included), a figure less sensitive than requests/s to what else runs on the machine.
- RSS: each server process's resident memory after the load (numpy, onnxruntime, the session).
- agent inline / threads: inference in the event loop (`workers=0`, the default) or in a pool of
  2 threads (`workers=2`); agent binary: inline, with the binary tensor data extension both ways.
- fastapi: uvicorn 1 worker (h11, asyncio; no uvloop/httptools installed), access log off,
  pydantic request model, sync endpoint (run in FastAPI's thread pool)."""
MLSERVER_NOTE = """
- mlserver: `mlserver start` with a custom runtime (`MLModel` subclass, `NumpyCodec` in and out,
  `async def predict` calling `session.run`, so inference runs in the event loop like agent
  inline), `parallel_workers=0` (MLServer's default, 1, sends every request to a separate
  inference process), `debug=false` (access log off), `metrics_endpoint=null` (no metrics
  server or Prometheus middleware), gRPC on its own port, gzip middleware on (its default; the
  load generator sends no Accept-Encoding, so no answer is compressed). Its own venv: uvicorn
  there runs on uvloop (MLServer installs and requires it) with h11 (no httptools)."""
SERVERS = {
    "agent inline": ["agent", "--workers", "0"],
    "agent threads": ["agent", "--workers", "2"],
    "agent binary": ["agent", "--workers", "0"],
    "fastapi": ["fastapi"],
}


# --------------------------------------------------------------------------- servers


def session_for(bundle: Path) -> Any:
    """The onnxruntime session every side uses: 1 intra-op thread, the manifest's config."""
    import onnxruntime as ort

    from edgec.manifest import read_manifest

    manifest = read_manifest(bundle)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    for key, value in manifest.runtime_config.items():
        options.add_session_config_entry(key, value)
    return ort.InferenceSession(
        str(bundle / manifest.model_file), options, providers=["CPUExecutionProvider"]
    )


def use_serving_module(path: Path) -> None:
    """Make ``path`` (another version's agent/serving.py) the ``agent.serving`` module."""
    import importlib.util

    import agent

    spec = importlib.util.spec_from_file_location("agent.serving", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["agent.serving"] = module
    spec.loader.exec_module(module)
    agent.serving = module  # type: ignore[attr-defined]


def serve_agent(bundle: Path, workers: int, metrics: bool = False) -> None:
    import agent.serving
    from agent.runtime import load_bundle
    from agent.serving import InferenceServer
    from agent.slot import ModelSlot

    slot = ModelSlot()
    slot.swap(load_bundle(bundle, threads=1))
    if metrics:
        from agent.metrics import AgentMetrics

        server = InferenceServer(slot, workers=workers, metrics=AgentMetrics())
    else:
        server = InferenceServer(slot, workers=workers)
    print(f"PORT {server.start()} {agent.serving.__file__}", flush=True)
    sys.stdin.read()  # until the benchmark closes our stdin
    server.stop()


class InferInput(BaseModel):
    """The FastAPI side's request models (module level: FastAPI resolves annotations here)."""

    name: str
    shape: list[int]
    datatype: str
    data: list[float]


class InferRequest(BaseModel):
    id: str | None = None
    inputs: list[InferInput]


def fastapi_app(bundle: Path) -> Any:
    """The tutorial way: pydantic models in, session.run, lists out."""
    from fastapi import FastAPI

    from edgec.manifest import read_manifest

    manifest = read_manifest(bundle)
    session = session_for(bundle)
    output_names = [o.name for o in session.get_outputs()]
    app = FastAPI()

    @app.post(f"/v2/models/{manifest.name}/infer")
    def infer(request: InferRequest) -> dict[str, Any]:
        feeds = {i.name: np.array(i.data, dtype=np.float32).reshape(i.shape) for i in request.inputs}
        results = session.run(output_names, feeds)
        return {
            "model_name": manifest.name,
            "model_version": manifest.version,
            "id": request.id,
            "outputs": [
                {"name": name, "datatype": "FP32", "shape": list(value.shape), "data": value.ravel().tolist()}
                for name, value in zip(output_names, results, strict=True)
            ],
        }

    return app


def serve_fastapi(bundle: Path) -> None:
    import threading

    import uvicorn

    port = free_port()
    config = uvicorn.Config(
        fastapi_app(bundle), host="127.0.0.1", port=port, log_level="warning", access_log=False
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    print(f"PORT {port}", flush=True)
    sys.stdin.read()
    server.should_exit = True
    thread.join(5)


class ServerProcess:
    """``--serve SERVER`` in a process of its own (``serve``: its arguments, else ``SERVERS[label]``)."""

    def __init__(self, label: str, bundle: Path, serve: list[str] | None = None) -> None:
        script, serve = str(Path(__file__).resolve()), serve or SERVERS[label]
        self._start(label, [sys.executable, script, "--serve", *serve, "--bundle", str(bundle)])

    def _start(self, label: str, command: list[str]) -> None:
        """Run ``command``, a server that prints ``PORT N [SERVED_FROM]`` once it listens."""
        self.label = label
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line.startswith("PORT "):
            self.process.kill()
            raise SystemExit(f"{label} server did not start: {line!r}")
        self.port = int(line.split()[1])
        self.served_from = line.split(maxsplit=2)[2].strip() if len(line.split()) > 2 else None

    def memory(self) -> dict[str, float]:
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        return {
            "rss_mib": int(fields["VmRSS"].split()[0]) / 1024,
            "peak_rss_mib": int(fields["VmHWM"].split()[0]) / 1024,
        }

    def stop(self) -> None:
        if self.process.stdin:
            self.process.stdin.close()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()


MLSERVER_RUNTIME = '''\
"""An MLServer custom runtime for an ONNX model (written by bench/bench_agent_serving.py)."""

import onnxruntime as ort
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse
from mlserver.utils import get_model_uri


class OnnxModel(MLModel):
    async def load(self) -> bool:
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        for key, value in self.settings.parameters.extra.get("runtime_config", {}).items():
            options.add_session_config_entry(key, value)
        path = await get_model_uri(self.settings)
        self._session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        self._outputs = [o.name for o in self._session.get_outputs()]
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        feeds = {i.name: NumpyCodec.decode_input(i) for i in payload.inputs}
        results = self._session.run(self._outputs, feeds)
        return InferenceResponse(
            model_name=self.name,
            model_version=self.version,
            outputs=[NumpyCodec.encode_output(n, r) for n, r in zip(self._outputs, results)],
        )
'''


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def mlserver_venv(venv: Path) -> Path:
    """The venv's ``mlserver`` command; the venv is created with pip when it has none."""
    command = venv / "bin" / "mlserver"
    if command.exists():
        return command
    shown = venv.relative_to(ROOT) if venv.is_relative_to(ROOT) else venv
    print(f"creating the MLServer venv {shown}: pip install {' '.join(MLSERVER_PINS)} (about 2 minutes)")
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    steps = ([sys.executable, "-m", "venv", "--clear", str(venv)], [*pip, *MLSERVER_PINS])
    for step in steps:
        done = subprocess.run(step, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise SystemExit(
                f"could not create the MLServer venv ({' '.join(step[:3])} ...):\n{done.stderr[-2000:]}\n"
                "point --mlserver-venv at one with mlserver, or leave the side out with --no-mlserver"
            )
    return command


def venv_versions(venv: Path) -> dict[str, str | None]:
    """The versions of ``MLSERVER_LIBRARIES`` in the MLServer venv (None: not installed)."""
    script = (
        "import importlib.metadata as m, importlib.util as u, json, sys\n"
        "print(json.dumps({n: m.version(n) if u.find_spec(n) else None for n in sys.argv[1:]}))"
    )
    command = [str(venv / "bin" / "python"), "-c", script, *MLSERVER_LIBRARIES]
    found: dict[str, str | None] = json.loads(subprocess.check_output(command, text=True))
    return found


def write_mlserver_repo(repo: Path, bundle: Path, http_port: int, grpc_port: int) -> dict[str, Any]:
    """``settings.json``, and ``<model>/model-settings.json`` with the runtime module next to it;
    returns both settings."""
    from edgec.manifest import read_manifest

    manifest = read_manifest(bundle)
    model = repo / manifest.name
    model.mkdir(parents=True, exist_ok=True)
    settings = {
        "debug": False,
        "parallel_workers": 0,
        "host": "127.0.0.1",
        "http_port": http_port,
        "grpc_port": grpc_port,
        "metrics_endpoint": None,
    }
    model_settings = {
        "name": manifest.name,
        "implementation": "onnx_runtime.OnnxModel",
        "parameters": {
            "uri": str((bundle / manifest.model_file).resolve()),
            "version": manifest.version,
            "extra": {"runtime_config": manifest.runtime_config},
        },
    }
    (repo / "settings.json").write_text(json.dumps(settings, indent=2) + "\n")
    (model / "model-settings.json").write_text(json.dumps(model_settings, indent=2) + "\n")
    (model / "onnx_runtime.py").write_text(MLSERVER_RUNTIME)
    return {"settings.json": settings, "model-settings.json": model_settings}


class MLServerProcess(ServerProcess):
    """``mlserver start <repo>``, ready once the model's v2 ready endpoint answers 200."""

    def __init__(self, command: Path, repo: Path, model: str, port: int) -> None:
        self.label = "mlserver"
        self.port = port
        self.log = repo / "mlserver.log"
        with self.log.open("w") as log:
            self.process = subprocess.Popen(
                [str(command), "start", str(repo)], cwd=repo, stdin=subprocess.DEVNULL, stdout=log, stderr=log
            )
        deadline = time.monotonic() + MLSERVER_START_S
        while not self.ready(model):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.process.kill()
                tail = self.log.read_text()[-3000:]
                raise SystemExit(f"mlserver did not start (log {self.log}):\n{tail}")
            time.sleep(0.2)

    def ready(self, model: str) -> bool:
        url = f"http://127.0.0.1:{self.port}/v2/models/{model}/ready"
        try:
            with urllib.request.urlopen(url, timeout=1) as answer:
                return bool(answer.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.process.kill()


# --------------------------------------------------------------------------- load generator


class _Client(asyncio.Protocol):
    """One keep-alive connection sending ``request`` again as soon as each answer is in."""

    def __init__(self, request: bytes, record_from: float, deadline: float, run: _Run) -> None:
        self.request = request
        self.record_from = record_from
        self.deadline = deadline
        self.run = run
        self.framer = ResponseFramer()
        self.sent = 0.0
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.send()

    def send(self) -> None:
        assert self.transport is not None
        self.sent = time.perf_counter()
        self.transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        for status, body in self.framer.feed(data):
            now = time.perf_counter()
            self.run.answered(status, body, now - self.sent, now >= self.record_from)
            if now < self.deadline:
                self.send()
            else:
                assert self.transport is not None
                self.transport.close()
                self.run.closed()
                return

    def connection_lost(self, exc: Exception | None) -> None:
        if self.framer.partial:
            self.run.closed(error=True)


class _Run:
    def __init__(self, clients: int, done: asyncio.Future[None]) -> None:
        self.latencies: list[float] = []
        self.total = 0  # answers, warm-up included
        self.errors = 0
        self.scrapes = 0  # GET /metrics answered 200 meanwhile
        self.first_body: bytes | None = None
        self.open = clients
        self.done = done

    def answered(self, status: int, body: bytes, latency_s: float, record: bool) -> None:
        self.total += 1
        if status != 200:
            self.errors += 1
        if self.first_body is None:
            self.first_body = body
        if record:
            self.latencies.append(latency_s)

    def closed(self, error: bool = False) -> None:
        self.errors += error
        self.open -= 1
        if self.open == 0 and not self.done.done():
            self.done.set_result(None)


async def _load(
    port: int, request: bytes, clients: int, seconds: float, scrape_every_s: float | None = None
) -> tuple[_Run, float]:
    loop = asyncio.get_running_loop()
    started = time.perf_counter()
    record_from = started + WARMUP_S
    deadline = record_from + seconds
    run = _Run(clients, loop.create_future())
    for _ in range(clients):
        await loop.create_connection(lambda: _Client(request, record_from, deadline, run), "127.0.0.1", port)
    scraper = None
    if scrape_every_s is not None:
        scraper = asyncio.create_task(_scrape_until(port, scrape_every_s, deadline, run))
    await asyncio.wait_for(run.done, seconds + 30)
    if scraper is not None:
        await asyncio.wait_for(scraper, 30)
    return run, deadline - record_from


async def _scrape_until(port: int, every_s: float, deadline: float, run: _Run) -> None:
    """``GET /metrics`` on a connection of its own every ``every_s`` until ``deadline``, as a
    Prometheus server would (a scrape that does not answer 200 counts as an error)."""
    while time.perf_counter() < deadline:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        answer = await reader.read()
        writer.close()
        if answer.startswith(b"HTTP/1.1 200"):
            run.scrapes += 1
        else:
            run.errors += 1
        await asyncio.sleep(max(0.0, min(every_s, deadline - time.perf_counter())))


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(
    port: int,
    pid: int,
    request: bytes,
    clients: int,
    seconds: float,
    *,
    scrape_every_s: float | None = None,
) -> dict[str, Any]:
    cpu_before = cpu_seconds(pid)
    run, window = asyncio.run(_load(port, request, clients, seconds, scrape_every_s))
    cpu = cpu_seconds(pid) - cpu_before
    lat = np.array(run.latencies) * 1e3
    return {
        "requests_per_s": len(lat) / window,
        "server_cpu_us_per_request": 1e6 * cpu / max(run.total, 1),
        "p50_ms": float(np.percentile(lat, 50)),
        "p99_ms": float(np.percentile(lat, 99)),
        "requests": len(lat),
        "answered": run.total,
        "scrapes": run.scrapes,
        "errors": run.errors,
        "first_body": run.first_body,
    }


# --------------------------------------------------------------------------- requests


def http_request(path: str, body: bytes, headers: dict[str, str] | None = None) -> bytes:
    lines = [
        f"POST {path} HTTP/1.1",
        "Host: 127.0.0.1",
        "Content-Type: application/json",
        f"Content-Length: {len(body)}",
    ]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def json_request(name: str, sample: np.ndarray, path: str) -> bytes:
    document = {
        "id": "bench",
        "inputs": [
            {"name": name, "shape": list(sample.shape), "datatype": "FP32", "data": sample.ravel().tolist()}
        ],
    }
    return http_request(path, json.dumps(document).encode())


def binary_request(name: str, sample: np.ndarray, path: str) -> bytes:
    blob = sample.astype("<f4").tobytes()
    document = {
        "id": "bench",
        "inputs": [
            {
                "name": name,
                "shape": list(sample.shape),
                "datatype": "FP32",
                "parameters": {"binary_data_size": len(blob)},
            }
        ],
        "parameters": {"binary_data_output": True},
    }
    head = json.dumps(document).encode()
    return http_request(path, head + blob, {"Inference-Header-Content-Length": str(len(head))})


def decode_logits(body: bytes) -> np.ndarray:
    head, _, payload = body.partition(b"\r\n\r\n")
    headers = dict(
        (k.strip().lower(), v.strip())
        for k, _, v in (line.partition(":") for line in head.decode().split("\r\n")[1:])
    )
    if "inference-header-content-length" in headers:
        size = int(headers["inference-header-content-length"])
        return np.frombuffer(payload[size:], dtype="<f4")
    document = json.loads(payload)
    return np.array(document["outputs"][0]["data"], dtype=np.float32)


# --------------------------------------------------------------------------- direct calls


def direct_latency(bundle: Path, sample: np.ndarray, name: str, calls: int) -> dict[str, dict[str, float]]:
    from agent.runtime import load_bundle

    session = session_for(bundle)
    output = session.get_outputs()[0].name
    model = load_bundle(bundle, threads=1)
    feeds = {name: sample}
    results: dict[str, dict[str, float]] = {}
    for label, call in (
        ("session.run", lambda: session.run([output], feeds)),
        ("RuntimeModel.infer", lambda: model.infer(feeds)),
    ):
        for _ in range(200):
            call()
        times = np.empty(calls)
        for i in range(calls):
            started = time.perf_counter()
            call()
            times[i] = time.perf_counter() - started
        times *= 1e3
        results[label] = {
            "p50_ms": float(np.percentile(times, 50)),
            "p99_ms": float(np.percentile(times, 99)),
        }
    model.close()
    return results


# --------------------------------------------------------------------------- report


def versions() -> dict[str, str | None]:
    return library_versions(LIBRARIES)


def machine() -> dict[str, Any]:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.machine(),
    )
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": versions(),
        "loadavg_start": loadavg(),
    }


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def median_of(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        key: float(np.median([r[key] for r in rounds]))
        for key in ("requests_per_s", "p50_ms", "p99_ms", "server_cpu_us_per_request")
    } | {
        "errors": sum(r["errors"] for r in rounds),
        "rounds_requests_per_s": [round(r["requests_per_s"], 1) for r in rounds],
    }


def render(
    direct: dict[str, dict[str, float]],
    table: dict[str, dict[int, dict[str, Any]]],
    memory: dict[str, dict[str, float]],
) -> str:
    session_p50 = direct["session.run"]["p50_ms"]
    lines = [
        "| side | concurrency | requests/s | x fastapi | p50 ms | p99 ms | p50 added, ms "
        "| server CPU us/request | RSS MiB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for label, figures in direct.items():
        lines.append(
            f"| {label} (direct, in-process) | 1 | - | - | {figures['p50_ms']:.3f} | "
            f"{figures['p99_ms']:.3f} | "
            f"{figures['p50_ms'] - session_p50:+.3f} | - | - |"
        )
    for label, per in table.items():
        for clients, figures in per.items():
            ratio = figures["requests_per_s"] / table["fastapi"][clients]["requests_per_s"]
            added = f"{figures['p50_ms'] - session_p50:+.3f}" if clients == 1 else "-"
            lines.append(
                f"| {label} | {clients} | {figures['requests_per_s']:,.0f} | {ratio:.2f} | "
                f"{figures['p50_ms']:.3f} | {figures['p99_ms']:.3f} | {added} | "
                f"{figures['server_cpu_us_per_request']:.0f} | {memory[label]['rss_mib']:.0f} |"
            )
    return "\n".join(lines)


def plot(table: dict[str, dict[int, dict[str, Any]]], path: Path, repeats: int) -> bool:
    """Grouped bars: requests/s (top) and p99 (bottom) per side, grouped by concurrency."""
    try:
        import matplotlib
    except ImportError:
        print("no matplotlib (dev extra): no plot")
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(table)
    width = 0.8 / len(labels)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 7), sharex=True)
    for i, label in enumerate(labels):
        x = np.arange(len(CONCURRENCY)) + (i - (len(labels) - 1) / 2) * width
        for ax, key in ((top, "requests_per_s"), (bottom, "p99_ms")):
            values = [table[label][c][key] for c in CONCURRENCY]
            bars = ax.bar(x, values, width, label=label)
            ax.bar_label(bars, fmt="%.0f" if key == "requests_per_s" else "%.1f", fontsize=7)
    top.set_ylabel("requests/s (higher is better)")
    bottom.set_ylabel("p99 latency, ms (lower is better)")
    bottom.set_xticks(np.arange(len(CONCURRENCY)), [f"concurrency {c}" for c in CONCURRENCY])
    top.set_title(f"digits onnx fp32, one v2 JSON request per call; median of {repeats} rounds")
    top.legend(ncols=len(labels), fontsize=8, loc="upper left")
    for ax in (top, bottom):
        ax.margins(y=0.15)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def build_bundle(out: Path, code_root: Path = ROOT, version: str = "1.0.0") -> tuple[Path, Any, np.ndarray]:
    """The digits x86-64-cpu bundle (built with ``edgec build``, of the code in ``code_root``),
    its manifest, one eval sample."""
    build = subprocess.run(
        [sys.executable, "-m", "edgec", "build", str(DIGITS / "model.onnx"), "--name", "digits",
         "--version", version, "--target", "x86-64-cpu", "--eval", str(DIGITS / "eval.npz"),
         "--out", str(out), "--force", "--json"],
        capture_output=True, text=True, cwd=code_root, check=False,
    )  # fmt: skip
    if build.returncode != 0:
        raise SystemExit(f"edgec build failed:\n{build.stderr}")
    bundle = Path(json.loads(build.stdout)["bundles"][0]["path"])
    from edgec.manifest import read_manifest

    manifest = read_manifest(bundle)
    name = manifest.inputs[0].name
    with np.load(DIGITS / "eval.npz") as data:
        sample = np.ascontiguousarray(data[name][:1], dtype=np.float32).reshape(manifest.inputs[0].shape)
    shown = bundle.relative_to(ROOT) if bundle.is_relative_to(ROOT) else bundle
    print(f"bundle: {shown}, input {list(sample.shape)}")
    return bundle, manifest, sample


# --------------------------------------------------------------------------- against a baseline


def git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()


def baseline_tree(ref: str) -> tuple[Path, str]:
    """A git worktree of ``ref`` under build/bench/ (made the first time), and its commit."""
    try:
        commit = git("rev-parse", "--verify", f"{ref}^{{commit}}")
    except subprocess.CalledProcessError as e:
        raise SystemExit(f"--baseline {ref}: not a commit here: {e.stderr.strip()}") from None
    tree = ROOT / "build" / "bench" / f"baseline-{commit[:10]}"
    if not (tree / "agent" / "serving.py").exists():
        git("worktree", "prune")
        git("worktree", "add", "--detach", "--force", str(tree), commit)
        print(f"checked out {commit[:10]} as {tree.relative_to(ROOT)}")
    return tree, commit


BASELINE_SIDES = ("baseline", "baseline HTTP layer", "this tree")


def compare_with_baseline(args: argparse.Namespace) -> int:
    """The agent of this tree against the agent at ``args.baseline``, JSON and binary.

    Three servers: ``baseline`` (REF's tree, from its worktree), ``baseline HTTP layer``
    (REF's agent/serving.py on this tree: what the parser change alone costs, apart from
    everything else that changed since REF) and ``this tree``."""
    started = time.perf_counter()
    info = machine()
    tree, commit = baseline_tree(args.baseline)
    head = git("rev-parse", "HEAD")
    dirty = bool(git("status", "--porcelain", "--untracked-files=no", "--", "agent", "edgec"))
    print(f"machine: {info['cpu']}, {info['usable_cores']} usable cores, python {info['python']}")
    changes = " + uncommitted changes" if dirty else ""
    print(f"baseline {commit[:10]} from {tree.relative_to(ROOT)}; this tree {head[:10]}{changes}")
    # built by the baseline's compiler, so that its agent can read the manifest; served by all
    bundle, manifest, sample = build_bundle(args.bundles.with_name(args.bundles.name + "-baseline"), tree)
    name = manifest.inputs[0].name
    path = f"/v2/models/{manifest.name}/infer"
    requests = {"json": json_request(name, sample, path), "binary": binary_request(name, sample, path)}
    expected = session_for(bundle).run(None, {name: sample})[0].ravel()
    old_serving = tree / "agent" / "serving.py"
    commands = {
        "baseline": ["agent", "--code-root", str(tree)],
        "baseline HTTP layer": ["agent", "--serving-file", str(old_serving)],
        "this tree": ["agent"],
    }
    servers: dict[str, ServerProcess] = {}
    try:
        for side in BASELINE_SIDES:
            servers[side] = ServerProcess(side, bundle, commands[side])
        served = {side: server.served_from for side, server in servers.items()}
        expected_files = {"baseline": str(old_serving), "baseline HTTP layer": str(old_serving)}
        expected_files["this tree"] = str(ROOT / "agent" / "serving.py")
        if served != expected_files:
            raise SystemExit(f"the sides do not serve the code they should: {served}")
    except BaseException:
        for server in servers.values():
            server.stop()
        raise
    rounds: dict[str, dict[str, dict[int, list[dict[str, Any]]]]] = {
        side: {kind: {c: [] for c in CONCURRENCY} for kind in requests} for side in BASELINE_SIDES
    }
    worst_diff = 0.0
    try:
        for index in range(args.repeats):
            for cell, (kind, clients) in enumerate((k, c) for k in requests for c in CONCURRENCY):
                turn = (index + cell) % len(BASELINE_SIDES)
                for side in BASELINE_SIDES[turn:] + BASELINE_SIDES[:turn]:
                    server = servers[side]
                    result = measure(server.port, server.process.pid, requests[kind], clients, args.seconds)
                    diff = float(np.abs(decode_logits(result.pop("first_body")) - expected).max())
                    worst_diff = max(worst_diff, diff)
                    rounds[side][kind][clients].append(result)
                    print(
                        f"round {index + 1}/{args.repeats} {side:19s} {kind:6s} c={clients:2d}: "
                        f"{result['requests_per_s']:8,.0f} req/s  p50 {result['p50_ms']:.3f} ms  "
                        f"p99 {result['p99_ms']:.3f} ms  server CPU "
                        f"{result['server_cpu_us_per_request']:.0f} us/req  errors {result['errors']}",
                        flush=True,
                    )
        memory = {side: server.memory() for side, server in servers.items()}
    finally:
        for server in servers.values():
            server.stop()
    info["loadavg_end"] = loadavg()
    tables = {
        reference: compare_table(rounds, reference, "this tree")
        for reference in ("baseline", "baseline HTTP layer")
    }
    text = "\n\n".join(
        f"**This tree against {reference}**\n\n" + render_comparison(table, reference)
        for reference, table in tables.items()
    )
    text += "\n\nRSS after the load: " + ", ".join(
        f"{side} {figures['rss_mib']:.0f} MiB" for side, figures in memory.items()
    )
    print()
    print(text)
    print(f"\nmax abs difference of any answer from session.run: {worst_diff:.1e}")
    elapsed = round(time.perf_counter() - started, 1)
    report = {
        "benchmark": "agent_serving_baseline",
        "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": info,
        "bundle": manifest.name + " " + manifest.version + " " + manifest.profile.id,
        "baseline": {"ref": args.baseline, "commit": commit, "served_from": served["baseline"]},
        "this_tree": {"commit": head, "uncommitted_changes": dirty, "served_from": served["this tree"]},
        "settings": {
            "repeats": args.repeats,
            "seconds_per_run": args.seconds,
            "warmup_s": WARMUP_S,
            "concurrency": list(CONCURRENCY),
            "workers": 0,
            "order": "per round and cell, the sides back to back, the first one rotating",
            "sides": commands,
        },
        "comparison": tables,
        "rounds": {
            side: {kind: {str(c): runs for c, runs in per.items()} for kind, per in kinds.items()}
            for side, kinds in rounds.items()
        },
        "memory": memory,
        "answer_max_abs_diff": worst_diff,
        "elapsed_s": elapsed,
    }
    args.results.mkdir(parents=True, exist_ok=True)
    json_path = args.results / "agent_serving_baseline.json"
    md_path = args.results / "agent_serving_baseline.md"
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    md_path.write_text(
        "# Agent serving: this tree against the agent at a baseline commit (digits, onnx fp32)\n\n"
        f"{info['cpu']}, {info['usable_cores']} cores, python {info['python']}; "
        + ", ".join(f"{k} {v}" for k, v in info["versions"].items() if v)
        + f"; {report['created_at']}.\n\n"
        f"Baseline: `{commit[:10]}` ({args.baseline}), served from a git worktree with this venv; "
        f"baseline HTTP layer: that commit's `agent/serving.py` served by this tree; this tree: "
        f"`{head[:10]}`{' with uncommitted changes' if dirty else ''}. All inline (`workers=0`), one "
        f"process each, the same bundle (built by the baseline) and load generator. Median of "
        f"{args.repeats} rounds of {args.seconds:g} s per side, request kind and concurrency; in each "
        "round the sides run back to back, which goes first rotating. Load average "
        f"{info['loadavg_start']} at the start, {info['loadavg_end']} at the end.\n\n"
        + text
        + "\n\n"
        + BASELINE_NOTES
    )
    print(f"\nwrote {json_path}\nwrote {md_path}\n({elapsed} s)")
    return 0


METRICS_SIDES = ("metrics off", "metrics on")
METRICS_NOTES = """\
- metrics on: `InferenceServer(..., metrics=AgentMetrics())`, what the agent runs with
  `[metrics] enabled = true` (the default): every infer request counted (a counter and a
  histogram child, cached per model and status) and `GET /metrics` served on the same port,
  scraped during every measurement of that side on a connection of its own (`--scrape-every`).
  metrics off: `metrics=None` (`enabled = false`), the same code path otherwise.
- ratio: metrics on over metrics off, of the medians; paired: the median over rounds of the
  ratio of the two back-to-back runs of that round. within 5%: requests/s ratio >= 0.95 and p50
  ratio <= 1.05. The issue's bar is the requests/s ratio.
- in-process: the request path's metrics calls (`RequestSeries.observe` after
  `AgentMetrics.series`), one scrape (`AgentMetrics.exposition`), and the whole request
  handler (`InferenceServer._dispatch`: routing, v2 decoding, inference, encoding; no socket)
  with metrics off and on, the fastest of 41 interleaved blocks of 500 requests; all in CPU time of
  the timing thread (`time.thread_time`). The request path's figure is the steady one; on a
  shared 2-core VM the handler's off/on difference still moves by +-15 us from run to run (the
  two sides' own figures move by 30 us), so read it over several runs.
- counted: after the last round, the metrics-on server's `edgec_agent_requests_total{status="200"}`
  and its histogram's count against the answers the load generator received (warm-up included).
"""


def handler_costs(
    bundle: Path, requests: dict[str, bytes], blocks: int = 41, calls: int = 500
) -> dict[str, Any]:
    """The whole request handler (routing, v2 decoding, inference, encoding; no socket) with
    metrics off and on, in this process: the fastest of ``blocks`` interleaved blocks of
    ``calls`` requests each, in microseconds of this thread's CPU time per request (what other
    processes run meanwhile counts far less than in wall-clock time)."""
    from agent._http_messages import Request
    from agent.metrics import AgentMetrics
    from agent.runtime import load_bundle
    from agent.serving import InferenceServer
    from agent.slot import ModelSlot

    slot = ModelSlot()
    slot.swap(load_bundle(bundle, threads=1))
    servers = {
        side: InferenceServer(slot, metrics=AgentMetrics() if side == "metrics on" else None)
        for side in METRICS_SIDES
    }
    costs: dict[str, Any] = {}
    for kind, raw in requests.items():
        head, _, body = raw.partition(b"\r\n\r\n")
        request_line, *lines = head.decode("latin-1").split("\r\n")
        target = request_line.split()[1]
        headers = {
            k.strip().lower().encode(): v.strip().encode() for k, _, v in (h.partition(":") for h in lines)
        }
        request = Request("POST", target, headers, body, True, False, 0)
        best = dict.fromkeys(METRICS_SIDES, float("inf"))
        for block in range(blocks):
            for side in METRICS_SIDES if block % 2 else METRICS_SIDES[::-1]:
                dispatch = servers[side]._dispatch
                started = time.thread_time()
                for _ in range(calls):
                    answer = dispatch(request)
                elapsed = time.thread_time() - started
                assert getattr(answer, "status", None) == 200, answer
                best[side] = min(best[side], elapsed / calls)
        costs[kind] = {side: round(t * 1e6, 2) for side, t in best.items()}
        costs[kind]["added_us"] = round((best["metrics on"] - best["metrics off"]) * 1e6, 2)
        costs[kind]["ratio"] = round(best["metrics off"] / best["metrics on"], 4)  # requests/s on over off
    slot.clear()
    return costs


def metrics_costs(bundle: Path, calls: int) -> dict[str, float]:
    """The request path's metrics calls and one scrape, in microseconds of this thread's CPU time."""
    from agent.metrics import AgentMetrics
    from agent.slot import ModelSlot
    from edgec.manifest import read_manifest

    metrics = AgentMetrics()
    manifest = read_manifest(bundle)
    metrics.watch(ModelSlot())
    for _ in range(1000):
        metrics.series(manifest).observe(200, 0.0003)
    started = time.thread_time()
    for _ in range(calls):
        metrics.series(manifest).observe(200, 0.0003)
    per_request = (time.thread_time() - started) / calls
    scrapes = 200
    started = time.thread_time()
    for _ in range(scrapes):
        text = metrics.exposition()
    per_scrape = (time.thread_time() - started) / scrapes
    return {
        "request_path_us": round(per_request * 1e6, 3),
        "scrape_us": round(per_scrape * 1e6, 1),
        "scrape_bytes": len(text),
    }


def scraped_counts(port: int) -> dict[str, float]:
    """The metrics-on server's count of 200 answers and its histogram's count, by its /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
        text = answer.read().decode()
    counts = {"requests_total_200": 0.0, "duration_count": 0.0}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "edgec_agent_requests_total" and sample.labels.get("status") == "200":
                counts["requests_total_200"] += sample.value
            elif sample.name == "edgec_agent_request_duration_seconds_count":
                counts["duration_count"] += sample.value
    return counts


def compare_metrics_on_off(args: argparse.Namespace) -> int:
    """The agent of this tree with its metrics off and on, JSON and binary, side by side."""
    started = time.perf_counter()
    info = machine()
    print(f"machine: {info['cpu']}, {info['usable_cores']} usable cores, python {info['python']}")
    bundle, manifest, sample = build_bundle(args.bundles)
    name = manifest.inputs[0].name
    path = f"/v2/models/{manifest.name}/infer"
    requests = {"json": json_request(name, sample, path), "binary": binary_request(name, sample, path)}
    expected = session_for(bundle).run(None, {name: sample})[0].ravel()
    costs: dict[str, Any] = metrics_costs(bundle, args.calls * 20)
    print(
        f"in-process: metrics on the request path {costs['request_path_us']:.2f} us/request, "
        f"one scrape {costs['scrape_us']:.0f} us ({costs['scrape_bytes']} bytes)"
    )
    costs["handler"] = handler_costs(bundle, requests)
    for kind, figures in costs["handler"].items():
        print(
            f"in-process handler, {kind}: metrics off {figures['metrics off']:.1f} us, on "
            f"{figures['metrics on']:.1f} us (+{figures['added_us']:.2f} us; "
            f"requests/s ratio {figures['ratio']:.3f})"
        )
    commands = {"metrics off": ["agent"], "metrics on": ["agent", "--with-metrics"]}
    servers: dict[str, ServerProcess] = {}
    try:
        for side in METRICS_SIDES:
            servers[side] = ServerProcess(side, bundle, commands[side])
    except BaseException:
        for server in servers.values():
            server.stop()
        raise
    rounds: dict[str, dict[str, dict[int, list[dict[str, Any]]]]] = {
        side: {kind: {c: [] for c in CONCURRENCY} for kind in requests} for side in METRICS_SIDES
    }
    answered = dict.fromkeys(METRICS_SIDES, 0)
    scrapes = 0
    worst_diff = 0.0
    try:
        for index in range(args.repeats):
            for cell, (kind, clients) in enumerate((k, c) for k in requests for c in CONCURRENCY):
                turn = (index + cell) % len(METRICS_SIDES)
                for side in METRICS_SIDES[turn:] + METRICS_SIDES[:turn]:
                    server = servers[side]
                    scrape = args.scrape_every if side == "metrics on" else None
                    result = measure(
                        server.port,
                        server.process.pid,
                        requests[kind],
                        clients,
                        args.seconds,
                        scrape_every_s=scrape,
                    )
                    diff = float(np.abs(decode_logits(result.pop("first_body")) - expected).max())
                    worst_diff = max(worst_diff, diff)
                    answered[side] += result["answered"]
                    scrapes += result["scrapes"]
                    rounds[side][kind][clients].append(result)
                    print(
                        f"round {index + 1}/{args.repeats} {side:11s} {kind:6s} c={clients:2d}: "
                        f"{result['requests_per_s']:8,.0f} req/s  p50 {result['p50_ms']:.3f} ms  "
                        f"p99 {result['p99_ms']:.3f} ms  server CPU "
                        f"{result['server_cpu_us_per_request']:.0f} us/req  scrapes {result['scrapes']}  "
                        f"errors {result['errors']}",
                        flush=True,
                    )
        counted = scraped_counts(servers["metrics on"].port)
        memory = {side: server.memory() for side, server in servers.items()}
    finally:
        for server in servers.values():
            server.stop()
    info["loadavg_end"] = loadavg()
    errors = sum(
        r["errors"] for kinds in rounds.values() for per in kinds.values() for rs in per.values() for r in rs
    )
    counted_ok = counted["requests_total_200"] == counted["duration_count"] == answered["metrics on"]
    table = compare_table(rounds, "metrics off", "metrics on")
    text = render_comparison(table, "metrics off", "metrics on")
    ratios = [row["requests_per_s_ratio"] for per in table.values() for row in per.values()]
    summary = (
        f"requests/s with metrics on over off: median ratio {float(np.median(ratios)):.3f} "
        f"(lowest {min(ratios):.3f}) over {len(ratios)} cells; {scrapes} scrapes during the load; "
        f"in-process: {costs['request_path_us']:.2f} us per request on the request path, "
        f"{costs['scrape_us']:.0f} us per scrape ({costs['scrape_bytes']:,} bytes); the whole handler "
        "in-process (no socket), off / on: "
        + ", ".join(
            f"{kind} {f['metrics off']:.1f} / {f['metrics on']:.1f} us (ratio {f['ratio']:.3f})"
            for kind, f in costs["handler"].items()
        )
        + ".\n\n"
        f"Counted by the metrics-on server: {counted['requests_total_200']:.0f} answers 200 and a "
        f"histogram count of {counted['duration_count']:.0f}, against {answered['metrics on']} answers "
        f"the load generator received ({'equal' if counted_ok else 'NOT EQUAL'}); errors {errors}."
    )
    text += (
        "\n\n"
        + summary
        + "\n\nRSS after the load: "
        + ", ".join(f"{side} {figures['rss_mib']:.0f} MiB" for side, figures in memory.items())
    )
    print()
    print(text)
    print(f"\nmax abs difference of any answer from session.run: {worst_diff:.1e}")
    elapsed = round(time.perf_counter() - started, 1)
    report = {
        "benchmark": "agent_serving_metrics",
        "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": info,
        "bundle": manifest.name + " " + manifest.version + " " + manifest.profile.id,
        "settings": {
            "repeats": args.repeats,
            "seconds_per_run": args.seconds,
            "warmup_s": WARMUP_S,
            "concurrency": list(CONCURRENCY),
            "workers": 0,
            "scrape_every_s": args.scrape_every,
            "order": "per round and cell, the sides back to back, the first one rotating",
            "sides": commands,
        },
        "in_process": costs,
        "comparison": table,
        "median_requests_per_s_ratio": float(np.median(ratios)),
        "lowest_requests_per_s_ratio": min(ratios),
        "counted": {**counted, "answered": answered["metrics on"], "equal": counted_ok},
        "rounds": {
            side: {kind: {str(c): runs for c, runs in per.items()} for kind, per in kinds.items()}
            for side, kinds in rounds.items()
        },
        "memory": memory,
        "answer_max_abs_diff": worst_diff,
        "elapsed_s": elapsed,
    }
    args.results.mkdir(parents=True, exist_ok=True)
    json_path = args.results / "agent_serving_metrics.json"
    md_path = args.results / "agent_serving_metrics.md"
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    md_path.write_text(
        "# Agent serving: Prometheus metrics on against off (digits, onnx fp32)\n\n"
        f"{info['cpu']}, {info['usable_cores']} cores, python {info['python']}; "
        + ", ".join(f"{k} {v}" for k, v in info["versions"].items() if v)
        + f"; {report['created_at']}.\n\n"
        f"Both inline (`workers=0`), one process each, the same bundle and load generator. Median of "
        f"{args.repeats} rounds of {args.seconds:g} s per side, request kind and concurrency; in each "
        f"round the sides run back to back, which goes first rotating; the metrics-on side scraped "
        f"every {args.scrape_every:g} s. Load average {info['loadavg_start']} at the start, "
        f"{info['loadavg_end']} at the end.\n\n" + text + "\n\n" + METRICS_NOTES
    )
    print(f"\nwrote {json_path}\nwrote {md_path}\n({elapsed} s)")
    return 0 if counted_ok and not errors else 1


BASELINE_NOTES = """\
- ratio: this tree's median over the reference's median; paired: the median over rounds of the
  ratio of the two back-to-back runs of that round (less sensitive to the machine's load
  drifting between rounds). requests/s higher is better, p50 lower is better.
- within 5%: requests/s ratio >= 0.95 and p50 ratio <= 1.05 (both the ratio of medians).
- server CPU: the server process's user + system CPU time per answered request (warm-up
  included).
- baseline HTTP layer isolates the parser change: the rest of the code is this tree's on both
  sides. Against the baseline commit, everything else that changed since it counts too.
"""


def compare_table(
    rounds: dict[str, dict[str, dict[int, list[dict[str, Any]]]]], reference: str, side: str
) -> dict[str, dict[str, dict[str, Any]]]:
    """Per request kind and concurrency: both sides' medians, the ratios, the paired ratios."""
    table: dict[str, dict[str, dict[str, Any]]] = {}
    for kind, per in rounds[side].items():
        table[kind] = {}
        for clients, runs in per.items():
            base_runs = rounds[reference][kind][clients]
            base, this = median_of(base_runs), median_of(runs)
            paired_rps = [
                t["requests_per_s"] / b["requests_per_s"] for t, b in zip(runs, base_runs, strict=True)
            ]
            paired_p50 = [t["p50_ms"] / b["p50_ms"] for t, b in zip(runs, base_runs, strict=True)]
            rps_ratio = this["requests_per_s"] / base["requests_per_s"]
            p50_ratio = this["p50_ms"] / base["p50_ms"]
            table[kind][str(clients)] = {
                "reference": base,
                "this_tree": this,
                "requests_per_s_ratio": rps_ratio,
                "p50_ratio": p50_ratio,
                "paired_requests_per_s_ratio": float(np.median(paired_rps)),
                "paired_p50_ratio": float(np.median(paired_p50)),
                "within_5_percent": rps_ratio >= 0.95 and p50_ratio <= 1.05,
            }
    return table


def render_comparison(
    table: dict[str, dict[str, dict[str, Any]]], reference: str, side: str = "this tree"
) -> str:
    lines = [
        f"| request | concurrency | req/s {reference} | req/s {side} | ratio (paired) "
        f"| p50 ms {reference} | p50 ms {side} | ratio (paired) | p99 ms {reference} / {side} "
        f"| server CPU us/req {reference} / {side} | within 5% |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|:---:|",
    ]
    for kind, per in table.items():
        for clients, row in per.items():
            base, this = row["reference"], row["this_tree"]
            lines.append(
                f"| {kind} | {clients} | {base['requests_per_s']:,.0f} | {this['requests_per_s']:,.0f} | "
                f"{row['requests_per_s_ratio']:.3f} ({row['paired_requests_per_s_ratio']:.3f}) | "
                f"{base['p50_ms']:.3f} | {this['p50_ms']:.3f} | "
                f"{row['p50_ratio']:.3f} ({row['paired_p50_ratio']:.3f}) | "
                f"{base['p99_ms']:.3f} / {this['p99_ms']:.3f} | "
                f"{base['server_cpu_us_per_request']:.0f} / {this['server_cpu_us_per_request']:.0f} | "
                f"{'yes' if row['within_5_percent'] else 'NO'} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="interleaved rounds (default 5)")
    parser.add_argument("--seconds", type=float, default=2.0, help="measured seconds per run (default 2)")
    parser.add_argument("--calls", type=int, default=5000, help="direct calls timed (default 5000)")
    parser.add_argument("--bundles", type=Path, default=ROOT / "build" / "bench" / "agent_serving")
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument(
        "--mlserver-venv",
        type=Path,
        default=MLSERVER_VENV,
        help="venv with mlserver and onnxruntime, created when missing (default build/bench/mlserver-venv)",
    )
    parser.add_argument("--no-mlserver", action="store_true", help="leave the MLServer side out")
    parser.add_argument(
        "--baseline",
        metavar="REF",
        help="compare only the agent of this tree with the agent at git REF (e.g. 1a6018d)",
    )
    parser.add_argument("--serve", nargs="+", help=argparse.SUPPRESS)  # internal: run one server
    parser.add_argument(
        "--metrics-overhead",
        action="store_true",
        help="compare only the agent with its Prometheus metrics on and off (this tree)",
    )
    parser.add_argument(
        "--scrape-every",
        type=float,
        default=1.0,
        metavar="S",
        help="with --metrics-overhead: GET /metrics every S seconds during the load (default 1)",
    )
    parser.add_argument("--workers", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--with-metrics", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--bundle", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--code-root", type=Path, help=argparse.SUPPRESS)  # serve the agent from here
    parser.add_argument("--serving-file", type=Path, help=argparse.SUPPRESS)  # agent.serving from here
    args = parser.parse_args(argv)
    if args.serve:
        if args.code_root:
            sys.path.insert(0, str(args.code_root))
        if args.serving_file:
            use_serving_module(args.serving_file)
        if args.serve[0] == "agent":
            serve_agent(args.bundle, args.workers, args.with_metrics)
        else:
            serve_fastapi(args.bundle)
        return 0
    if args.baseline:
        return compare_with_baseline(args)
    if args.metrics_overhead:
        return compare_metrics_on_off(args)

    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise SystemExit("needs the bench extra: pip install -c constraints.txt -e '.[bench]'") from None
    started = time.perf_counter()
    info = machine()
    print(f"machine: {info['cpu']}, {info['usable_cores']} usable cores, python {info['python']}")
    print("versions: " + ", ".join(f"{k} {v or '-'}" for k, v in info["versions"].items()))
    mlserver_command: Path | None = None
    if not args.no_mlserver:
        venv_started = time.perf_counter()
        mlserver_command = mlserver_venv(args.mlserver_venv.resolve())
        info["mlserver_venv_versions"] = venv_versions(args.mlserver_venv.resolve())
        info["mlserver_venv_setup_s"] = round(time.perf_counter() - venv_started, 1)
        print(
            "mlserver venv: "
            + ", ".join(f"{k} {v or '-'}" for k, v in info["mlserver_venv_versions"].items())
        )

    bundle, manifest, sample = build_bundle(args.bundles)
    name = manifest.inputs[0].name

    direct = direct_latency(bundle, sample, name, args.calls)
    expected = session_for(bundle).run(None, {name: sample})[0].ravel()
    for label, figures in direct.items():
        print(f"direct {label}: p50 {figures['p50_ms']:.3f} ms, p99 {figures['p99_ms']:.3f} ms")

    labels = [*SERVERS, "mlserver"] if mlserver_command else list(SERVERS)
    path = f"/v2/models/{manifest.name}/infer"
    requests = {label: json_request(name, sample, path) for label in labels}
    requests["agent binary"] = binary_request(name, sample, path)
    servers = {label: ServerProcess(label, bundle) for label in SERVERS}
    mlserver_settings: dict[str, Any] | None = None
    if mlserver_command:
        port = free_port()
        mlserver_settings = write_mlserver_repo(MLSERVER_REPO, bundle, port, free_port())
        try:
            servers["mlserver"] = MLServerProcess(mlserver_command, MLSERVER_REPO, manifest.name, port)
        except BaseException:
            for server in servers.values():
                server.stop()
            raise
    rounds: dict[str, dict[int, list[dict[str, Any]]]] = {
        label: {c: [] for c in CONCURRENCY} for label in labels
    }
    checks: dict[str, float] = {}
    try:
        for index in range(args.repeats):
            order = labels[index % len(labels) :] + labels[: index % len(labels)]
            for label in order:
                for clients in CONCURRENCY:
                    server = servers[label]
                    result = measure(server.port, server.process.pid, requests[label], clients, args.seconds)
                    body = result.pop("first_body")
                    if label not in checks:
                        checks[label] = float(np.abs(decode_logits(body) - expected).max())
                    rounds[label][clients].append(result)
                    print(
                        f"round {index + 1}/{args.repeats} {label:13s} c={clients:2d}: "
                        f"{result['requests_per_s']:8,.0f} req/s  p50 {result['p50_ms']:.3f} ms  "
                        f"p99 {result['p99_ms']:.3f} ms  server CPU "
                        f"{result['server_cpu_us_per_request']:.0f} us/req  errors {result['errors']}",
                        flush=True,
                    )
        memory = {label: server.memory() for label, server in servers.items()}
    finally:
        for server in servers.values():
            server.stop()

    info["loadavg_end"] = loadavg()
    table = {label: {c: median_of(rs) for c, rs in per.items()} for label, per in rounds.items()}
    text = render(direct, table, memory)
    print()
    print(text)
    print("\nmax abs difference of each server's answer from session.run: "
          + ", ".join(f"{k} {v:.1e}" for k, v in checks.items()))  # fmt: skip
    elapsed = round(time.perf_counter() - started, 1)

    args.results.mkdir(parents=True, exist_ok=True)
    settings = {
        "repeats": args.repeats,
        "seconds_per_run": args.seconds,
        "warmup_s": WARMUP_S,
        "concurrency": list(CONCURRENCY),
        "direct_calls": args.calls,
        "session": "onnxruntime CPU, intra_op_num_threads=1, manifest runtime_config",
        "fastapi": "uvicorn.Config(log_level='warning', access_log=False), 1 process, sync def endpoint",
        "mlserver": mlserver_settings,
        "input_shape": list(sample.shape),
    }
    report = {
        "benchmark": "agent_serving",
        "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": info,
        "bundle": manifest.name + " " + manifest.version + " " + manifest.profile.id,
        "settings": settings,
        "direct": direct,
        "servers": {label: {str(c): f for c, f in per.items()} for label, per in table.items()},
        "memory": memory,
        "answer_max_abs_diff": checks,
        "elapsed_s": elapsed,
    }
    json_path = args.results / "agent_serving.json"
    md_path = args.results / "agent_serving.md"
    png_path = args.results / "agent_serving.png"
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    mlserver_line = ""
    if mlserver_command:
        mlserver_line = (
            "MLServer side, in its own venv: "
            + ", ".join(f"{k} {v}" for k, v in info["mlserver_venv_versions"].items() if v)
            + ".\n\n"
        )
    md_path.write_text(
        "# Agent serving: v2 endpoint vs FastAPI + uvicorn and MLServer (digits, onnx fp32)\n\n"
        f"{info['cpu']}, {info['usable_cores']} cores, python {info['python']}; "
        + ", ".join(f"{k} {v}" for k, v in info["versions"].items() if v)
        + f"; {report['created_at']}.\n\n"
        + mlserver_line
        + f"Median of {args.repeats} interleaved rounds of {args.seconds:g} s per server and concurrency, "
        "keep-alive connections, one load generator for all. Load average "
        f"{info['loadavg_start']} at the start, {info['loadavg_end']} at the end.\n\n"
        + text
        + "\n\n"
        + NOTES
        + (MLSERVER_NOTE if mlserver_command else "")
        + f"\n\n![requests/s and p99 per side and concurrency]({png_path.name})\n"
    )
    print(f"\nwrote {json_path}\nwrote {md_path}")
    if plot(table, png_path, args.repeats):
        print(f"wrote {png_path}")
    print(f"({elapsed} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
