"""The agent's configuration: the TOML file ``edgec devices add`` writes for each device."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from edgec.errors import OptionError

__all__ = ["AgentConfig", "ServingLimits", "load_config"]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class MqttSettings(_Model):
    host: str = "127.0.0.1"
    port: int = 1883
    username: str
    password: str
    ca_file: Path | None = None  # set: connect with TLS and check the broker against this CA
    keepalive_s: Annotated[int, Field(ge=5)] = 30
    reconnect_max_s: Annotated[float, Field(gt=0)] = 60.0


class TrustSettings(_Model):
    root: str  # the image repository's root.json the device is provisioned with
    director_key: str  # the director's public key (JSON, as in the repository's director.pub.json)


class ServingLimits(_Model):
    """Bounds on what the local inference API accepts (``[http.limits]``; the defaults and
    what each answers are in ``agent.serving``'s docstring)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_head_bytes: Annotated[int, Field(ge=1024)] = 64 << 10
    max_body_bytes: Annotated[int, Field(ge=0)] = 64 << 20
    max_json_bytes: Annotated[int, Field(ge=0)] = 8 << 20
    max_buffered_body_bytes: Annotated[int, Field(ge=0)] = 256 << 20
    max_connections: Annotated[int, Field(ge=1)] | None = None  # None: from RLIMIT_NOFILE
    idle_timeout_s: Annotated[float, Field(gt=0, allow_inf_nan=False)] = 30.0
    header_timeout_s: Annotated[float, Field(gt=0, allow_inf_nan=False)] = 10.0
    body_timeout_s: Annotated[float, Field(gt=0, allow_inf_nan=False)] = 60.0


class HttpSettings(_Model):
    host: str = "127.0.0.1"  # loopback: the local inference API is for this device's programs
    port: int = 8000
    limits: ServingLimits = ServingLimits()
    # POST /v2/shadow runs bundles under this folder only (agent._shadow_api); unset: field-tests/
    # in the state folder
    shadow_root: Path | None = None


class InstallSettings(_Model):
    transport: Literal["mqtt", "http"] = "mqtt"
    http_url: str | None = None  # the server's repository over HTTP, e.g. http://ota:8080/v1/repo/
    chunk_timeout_s: Annotated[float, Field(gt=0)] = 10.0
    max_target_bytes: Annotated[int, Field(gt=0)] = 2 << 30
    max_fetch_bytes_per_s: Annotated[int, Field(gt=0)] | None = None  # unset: as fast as the link
    probation_s: Annotated[float, Field(ge=0)] = 30.0
    probation_min_requests: Annotated[int, Field(ge=1)] = 20  # golden probes fill in when traffic is low
    max_error_rate: Annotated[float, Field(ge=0, le=1)] = 0.01
    warmup_runs: Annotated[int, Field(ge=0)] = 5
    max_attempts: Annotated[int, Field(ge=1)] = 5  # retriable failures (network) before abandoning
    # memory fit (agent.memory): where the available memory is read, and the margin an install
    # keeps free beyond the release's signed peak
    meminfo_path: Path = Path("/proc/meminfo")
    cgroup_root: Path = Path("/sys/fs/cgroup")
    memory_headroom_bytes: Annotated[int, Field(ge=0)] = 64 << 20
    # a shadow run (a director document's action shadow): the candidate's share of one core at
    # most, how often a window of figures is reported, sampled requests waiting for it at most
    shadow_cpu_budget: Annotated[float, Field(gt=0, le=1)] = 0.5
    shadow_window_s: Annotated[float, Field(gt=0)] = 10.0
    shadow_queue: Annotated[int, Field(ge=1, le=1024)] = 8


class TelemetrySettings(_Model):
    window_s: Annotated[float, Field(gt=0)] = 60.0
    buffer_max_windows: Annotated[int, Field(ge=1)] = 10_000


class MetricsSettings(_Model):
    """``[metrics]``: Prometheus metrics on the v2 port (``GET /metrics``, ``agent.metrics``)."""

    enabled: bool = True


class AgentConfig(_Model):
    device: str
    fleet: str
    profile: str
    state_dir: Path = Path("/var/lib/edgec")
    threads: Annotated[int, Field(ge=1)] = 1  # runtime threads per session
    mqtt: MqttSettings
    trust: TrustSettings | None = None
    http: HttpSettings = HttpSettings()
    install: InstallSettings = InstallSettings()
    telemetry: TelemetrySettings = TelemetrySettings()
    metrics: MetricsSettings = MetricsSettings()


def load_config(path: Path) -> AgentConfig:
    """Read and validate the agent's TOML file. Raises ``OptionError`` naming what is wrong."""
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise OptionError(f"cannot read the agent config {path}: {e.strerror}") from e
    except tomllib.TOMLDecodeError as e:
        raise OptionError(f"{path} is not valid TOML: {e}") from e
    try:
        config = AgentConfig.model_validate(raw)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise OptionError(f"{path}: {where}: {first['msg']}") from e
    if config.trust is None:
        raise OptionError(
            f"{path} has no [trust] section (the repository root and director key): "
            "write it again with edgec devices add ... --repo REPO"
        )
    if config.install.transport == "http" and not config.install.http_url:
        raise OptionError(f"{path}: install.transport = 'http' needs install.http_url")
    return config
