"""A fleet on one machine for ``edgec demo``, the end-to-end tests and the benchmarks.

``LocalFleet`` (``fleet.py``) drives the real command line and runs the real processes: a
broker, the OTA server and one agent per device; ``LoadGenerator`` (``load.py``) sends paced
inference requests to the agents; ``processes.py`` starts and stops them.
"""

from localfleet.commands import ROOT, CliResult, code_env, export_commit, http_status, run_edgec
from localfleet.fleet import AgentProcess, LocalFleet
from localfleet.load import LoadGenerator, Response
from localfleet.processes import (
    EmbeddedBroker,
    HarnessError,
    Service,
    choose_broker,
    find_mosquitto,
    free_port,
    port_open,
    start_service,
    stop_process,
    stop_services,
    wait_for,
)

__all__ = [
    "ROOT",
    "AgentProcess",
    "CliResult",
    "EmbeddedBroker",
    "HarnessError",
    "LoadGenerator",
    "LocalFleet",
    "Response",
    "Service",
    "choose_broker",
    "code_env",
    "export_commit",
    "find_mosquitto",
    "free_port",
    "http_status",
    "port_open",
    "run_edgec",
    "start_service",
    "stop_process",
    "stop_services",
    "wait_for",
]
