"""Memory fit on the device: does a release's model fit in the memory this agent can use?

The compiler measures each artifact's peak memory in its runtime (load and inference at its
batch, over the runtime's baseline; ``edgec.manifest.MemoryPeak``) and the image repository
signs it in every target of the release (``peak_memory_bytes``), so the agent decides before
downloading a byte. The memory the agent can use is the least of:

- ``MemAvailable`` in ``/proc/meminfo`` (what the kernel can give without swapping);
- for each cgroup v2 on the agent's own path (``/proc/self/cgroup``'s ``0::`` line, under the
  cgroup root) and its ancestors that set one, ``memory.max`` less ``memory.current``
  (``max`` is no limit);
- likewise for cgroup v1's memory controller: ``memory.limit_in_bytes`` less
  ``memory.usage_in_bytes`` (a limit near 2^63 is none).

A new model is loaded beside the serving one during a hot swap, so an install fits when the
candidate's peak plus the headroom (``install.memory_headroom_bytes``) is at most what is
available now: the serving model's memory is already held, not available. A shadow run
(``shadow_fits``) runs both models' inference at once and needs room for the serving model's
inference as well. A release signed before peaks were measured has no figure and installs as
before (logged).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

__all__ = [
    "Available",
    "MemorySettingsView",
    "available_memory",
    "cgroup_rooms",
    "fit_refusal",
    "format_bytes",
    "mem_available",
    "shadow_fits",
    "signed_peak",
]

logger = logging.getLogger(__name__)

PROC_CGROUP = Path("/proc/self/cgroup")
MAX_FILE_BYTES = 1 << 20  # /proc/meminfo and /proc/self/cgroup are a few KB
MAX_PEAK_BYTES = 1 << 50  # a signed figure above this is not a peak
_V1_NO_LIMIT = 1 << 60  # cgroup v1 writes about 2^63 for no limit


class MemorySettingsView(Protocol):
    """The parts of ``agent.config.InstallSettings`` the fit check reads."""

    meminfo_path: Path
    cgroup_root: Path
    memory_headroom_bytes: int


@dataclass(frozen=True)
class Available:
    """The memory this agent can use now, and where the figure comes from."""

    bytes: int
    source: str  # "MemAvailable in /proc/meminfo", "cgroup v2 /sys/fs/cgroup/x: memory.max ..."


def format_bytes(nbytes: int) -> str:
    """``812.0 MiB``; bytes below 1 KiB as they are."""
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{nbytes} bytes"


def _read(path: Path) -> str | None:
    try:
        with path.open("rb") as f:
            return f.read(MAX_FILE_BYTES).decode("ascii", "replace")
    except OSError:
        return None


def _read_int(path: Path) -> int | None:
    """A cgroup file's number; None for ``max``, a missing file or anything else."""
    text = _read(path)
    text = text.strip() if text is not None else ""
    return int(text) if text.isdigit() else None


def mem_available(meminfo_path: Path) -> int | None:
    """``MemAvailable`` from a file in ``/proc/meminfo``'s format, in bytes; None if absent."""
    text = _read(meminfo_path)
    for line in (text or "").splitlines():
        name, _, rest = line.partition(":")
        if name == "MemAvailable":
            parts = rest.split()
            if parts and parts[0].isdigit():
                scale = 1024 if parts[1:] == ["kB"] else 1
                return int(parts[0]) * scale
    return None


def _own_paths(proc_cgroup: Path) -> tuple[str | None, str | None]:
    """This process's cgroup v2 path (the ``0::`` line) and v1 memory controller path."""
    v2 = v1 = None
    for line in (_read(proc_cgroup) or "").splitlines():
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hierarchy == "0" and controllers == "":
            v2 = path
        elif "memory" in controllers.split(","):
            v1 = path
    return v2, v1


def _chain(root: Path, own: str | None) -> Iterator[Path]:
    """The cgroup folders from the agent's own up to ``root``, those that exist. Inside a
    container the mount is the agent's own cgroup already, and its path may not exist under it."""
    folder = root
    if own:
        for part in [p for p in own.split("/") if p and p not in {".", ".."}]:
            folder /= part
    while True:
        if folder.is_dir():
            yield folder
        if folder == root:
            return
        folder = folder.parent


def cgroup_rooms(cgroup_root: Path, proc_cgroup: Path = PROC_CGROUP) -> list[Available]:
    """The room each memory limit on the agent's cgroups leaves (limit less usage), v2 and v1."""
    v2_path, v1_path = _own_paths(proc_cgroup)
    unified = cgroup_root if (cgroup_root / "cgroup.controllers").is_file() else cgroup_root / "unified"
    rooms: list[Available] = []
    checks = [
        (unified, v2_path, "memory.max", "memory.current", "cgroup v2"),
        (cgroup_root / "memory", v1_path, "memory.limit_in_bytes", "memory.usage_in_bytes", "cgroup v1"),
    ]
    for root, own, limit_name, usage_name, kind in checks:
        if own is None and not (root / limit_name).is_file():
            continue
        for folder in _chain(root, own):
            limit = _read_int(folder / limit_name)
            if limit is None or limit >= _V1_NO_LIMIT:
                continue
            usage = _read_int(folder / usage_name) or 0
            rooms.append(
                Available(
                    max(limit - usage, 0),
                    f"{kind} {folder}: {limit_name} {format_bytes(limit)} less {usage_name} "
                    f"{format_bytes(usage)}",
                )
            )
    return rooms


def available_memory(
    meminfo_path: Path, cgroup_root: Path, proc_cgroup: Path = PROC_CGROUP
) -> Available | None:
    """The least of ``MemAvailable`` and every cgroup limit's room; None when nothing says."""
    found = cgroup_rooms(cgroup_root, proc_cgroup)
    available = mem_available(meminfo_path)
    if available is not None:
        found.append(Available(available, f"MemAvailable in {meminfo_path}"))
    return min(found, key=lambda a: a.bytes) if found else None


def signed_peak(infos: Mapping[str, Any]) -> int | None:
    """The release's peak memory as the image repository signs it in its targets' custom
    fields (``peak_memory_bytes``); None for a release signed before peaks were measured."""
    for info in infos.values():
        custom = info.unrecognized_fields.get("custom", {}).get("edgec", {})
        peak = custom.get("peak_memory_bytes") if isinstance(custom, dict) else None
        if isinstance(peak, int) and not isinstance(peak, bool) and 0 <= peak <= MAX_PEAK_BYTES:
            return peak
    return None


def fit_refusal(release: str, infos: Mapping[str, Any], settings: MemorySettingsView) -> str | None:
    """Why ``release`` cannot be loaded beside the serving model, or None when it can (or its
    peak was never measured, or this device says nothing of its memory)."""
    peak = signed_peak(infos)
    if peak is None:
        logger.info("%s is signed without a peak memory figure: installing without a memory check", release)
        return None
    available = available_memory(settings.meminfo_path, settings.cgroup_root)
    if available is None:
        logger.warning(
            "no memory figure on this device (%s): installing %s unchecked", settings.meminfo_path, release
        )
        return None
    headroom = settings.memory_headroom_bytes
    if peak + headroom <= available.bytes:
        logger.info(
            "%s fits: peak %s + headroom %s <= %s available (%s)",
            release,
            format_bytes(peak),
            format_bytes(headroom),
            format_bytes(available.bytes),
            available.source,
        )
        return None
    return (
        f"does not fit in memory: its peak {format_bytes(peak)} ({peak} bytes, measured at build) "
        f"+ headroom {format_bytes(headroom)} > {format_bytes(available.bytes)} available "
        f"({available.bytes} bytes, {available.source}); free memory on the device, lower "
        "install.memory_headroom_bytes, or build a smaller model for this profile"
    )


def shadow_fits(
    candidate_peak: int | None, serving_peak: int | None, available: Available | None, headroom: int = 0
) -> tuple[bool, str]:
    """Whether a shadow run fits: the candidate loaded and running (its peak) while the serving
    model runs too. The serving model's weights are already held (not in ``available``); its
    measured peak stands in for its inference's share, which it does not report apart (an
    upper bound). Unknown figures are no reason to refuse: they fit, and the reason says so."""
    if candidate_peak is None or serving_peak is None or available is None:
        missing = [
            name
            for name, value in (
                ("the candidate's peak", candidate_peak),
                ("the serving model's peak", serving_peak),
                ("the device's available memory", available),
            )
            if value is None
        ]
        return True, f"not checked: {', '.join(missing)} unknown"
    need = candidate_peak + serving_peak + headroom
    figures = (
        f"candidate peak {format_bytes(candidate_peak)} + serving model's peak {format_bytes(serving_peak)}"
        f" + headroom {format_bytes(headroom)} = {format_bytes(need)}"
    )
    if need <= available.bytes:
        return True, f"{figures} <= {format_bytes(available.bytes)} available ({available.source})"
    return False, (
        f"two models do not fit at once: {figures} > {format_bytes(available.bytes)} available "
        f"({available.source})"
    )
