"""Simulated devices: the real agent's device core and reports, a stand-in for its runtime.

``SimFleet`` runs many ``SimulatedDevice`` s in one process so a rollout can be rehearsed at
scale on one machine. Each device is what ``agent.daemon.Agent`` is, less the model runtime
(both are built on ``agent.device.DeviceCore``):

- its own state folder (``StateStore``, TUF metadata provisioned from the repository's root,
  ``DirectorState`` with the director's key) and its own MQTT client, logged in with its own
  user name and password, subscribed to its desired topic;
- the real ``Installer``: director acceptance, TUF verification, resumable chunked fetch over
  MQTT (``ChunkClient``, ``MqttFetcher``), stage, load, self-test, warm-up, swap, probation,
  commit or roll back; its state (retained) and events go out as the real agent's do;
- a stand-in runtime: the loader reads the staged bundle's ``manifest.json`` and never loads
  the model; ``infer`` takes (sleeps) a latency drawn from the version's behaviour and fails
  at its error rate, and probation judges the drawn latencies against the manifest's budget
  (not the host's scheduling of a thousand sleeps); the self-test passes unless the
  behaviour says ``self_test = "fail"``;
- synthetic telemetry windows every ``window_s`` for the version it serves (``Telemetry``:
  requests, errors, p50/p95/p99 drawn from the behaviour, a drift verdict and PSI per input
  once a window has the requests the real agent needs for one, ``seq`` increasing).

``SimFleet.stop`` is a clean disconnect; an install still running then is left to its
journal and resumes at the next ``start``, as after a crash of the real agent.

Behaviour per model version (``SimBehaviour``), keyed by version, ``"*"`` for every version
(a version's entry overrides the fields it names)::

    ["*"]                      # TOML (or the same as JSON: {"*": {...}, "2.0.0": {...}})
    latency_ms = 5.0           # median latency of one request
    latency_spread = 0.2       # sigma of log(latency): p95 = latency_ms * exp(1.645 * spread)
    requests_per_s = 10.0      # the traffic one device serves (telemetry windows)
    ["2.0.0"]
    latency_ms = 8.0
    error_rate = 0.02          # share of requests that fail
    drift = "warn"             # or psi = 0.18, or input_shift_sd = 0.4 (PSI ~ shift squared)
    ["3.0.0"]
    self_test = "fail"         # or load = "fail"; infer_sleeps = false skips the sleeping

On the command line: ``--behaviour 2.0.0:latency_ms=8,error_rate=0.02,drift=ok`` (``parse``).

Scale: paho's own network loop needs a thread and ``select()`` per client, and ``select()``
stops at file descriptor 1024 (about 340 clients). Here one thread drives every client with
epoll (``sim._network.NetworkLoop``); a packet is written by the thread that queues it when
no other thread is writing that socket, and keepalives are checked a slice of the fleet at a
time. Installs run on a bounded pool of workers (64 by default: probation holds a worker for
``probation_s``, so the pool bounds installs a second) and queue beyond it; one thread closes
every device's telemetry windows. What the simulator does that a device does not, to be
cheap per device: probation figures are computed again only when a request was recorded
(``SimProbation``), and a window's percentiles come from one sort; every check of the
install pipeline still runs for every device, and nothing verified is shared between them.
Measured with ``bench/bench_fleet.py`` (its ``sim_cpu_ms_per_device``). What is left out: TLS
to the broker, the local inference API, the on-disk telemetry buffer (a window due while the
broker is away is dropped), and traffic feeding probation (golden probes do, as on an idle
device).

The package sits outside ``agent``, and the agent never imports it (an import-linter
contract), so a device never loads it. Its modules: ``behaviour`` (``SimBehaviour(s)``),
``runtime`` (the stand-in runtime), ``_network`` (the epoll loop), ``device``
(``SimulatedDevice``), ``_tally`` and ``fleet`` (``SimFleet``).
"""

from sim.behaviour import SimBehaviour, SimBehaviours
from sim.device import SimDeviceConfig, SimSettings, SimulatedDevice
from sim.fleet import FleetSummary, SimFleet, device_ids

__all__ = [
    "FleetSummary",
    "SimBehaviour",
    "SimBehaviours",
    "SimDeviceConfig",
    "SimFleet",
    "SimSettings",
    "SimulatedDevice",
    "device_ids",
]
