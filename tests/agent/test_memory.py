"""Memory fit on the device: the available memory read from files in /proc's and the cgroup
file system's formats (real files under tmp_path), and the decisions taken from it."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from tuf.api.metadata import TargetFile

from agent.config import InstallSettings
from agent.memory import (
    Available,
    available_memory,
    cgroup_rooms,
    fit_refusal,
    mem_available,
    shadow_fits,
    signed_peak,
)

MiB = 1 << 20
MEMINFO = """MemTotal:        3884716 kB
MemFree:          101232 kB
MemAvailable:     {available} kB
Buffers:           52312 kB
Cached:           812344 kB
SwapTotal:             0 kB
"""


def _meminfo(tmp_path: Path, available_kib: int) -> Path:
    path = tmp_path / "meminfo"
    path.write_text(MEMINFO.format(available=available_kib))
    return path


def _cgroup_v2(tmp_path: Path, own: str, limits: dict[str, tuple[str, int]]) -> tuple[Path, Path]:
    """A cgroup v2 tree: ``limits`` maps a folder under the root to (memory.max, memory.current);
    the process's /proc/self/cgroup says it lives at ``own``."""
    root = tmp_path / "cgroup"
    root.mkdir()
    (root / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    for folder, (limit, current) in limits.items():
        path = root / folder
        path.mkdir(parents=True, exist_ok=True)
        (path / "memory.max").write_text(f"{limit}\n")
        (path / "memory.current").write_text(f"{current}\n")
    proc = tmp_path / "proc-cgroup"
    proc.write_text(f"0::{own}\n")
    return root, proc


def test_mem_available_is_read_in_bytes(tmp_path):
    assert mem_available(_meminfo(tmp_path, 524_288)) == 512 * MiB


def test_no_mem_available_says_nothing(tmp_path):
    path = tmp_path / "meminfo"
    path.write_text("MemTotal:        3884716 kB\nMemFree:  101232 kB\n")
    assert mem_available(path) is None
    assert mem_available(tmp_path / "missing") is None


@pytest.mark.skipif(sys.platform != "linux", reason="/proc/meminfo is Linux's")
def test_this_machine_has_memory_available():
    assert (mem_available(Path("/proc/meminfo")) or 0) > 0


def test_cgroup_v2_limit_less_usage_along_the_agent_path(tmp_path):
    root, proc = _cgroup_v2(
        tmp_path,
        "/system.slice/edgec-agent.service",
        {
            "system.slice": (str(2048 * MiB), 1900 * MiB),  # the parent's limit leaves less room
            "system.slice/edgec-agent.service": (str(1024 * MiB), 300 * MiB),
        },
    )
    rooms = cgroup_rooms(root, proc)
    assert sorted(r.bytes for r in rooms) == [148 * MiB, 724 * MiB]
    found = available_memory(_meminfo(tmp_path, 4 << 20), root, proc)
    assert found is not None
    assert found.bytes == 148 * MiB
    assert "cgroup v2" in found.source
    assert "system.slice:" in found.source
    assert "memory.max 2.0 GiB less memory.current 1.9 GiB" in found.source


def test_cgroup_v2_max_is_no_limit(tmp_path):
    root, proc = _cgroup_v2(tmp_path, "/agent", {"agent": ("max", 300 * MiB)})
    assert cgroup_rooms(root, proc) == []
    found = available_memory(_meminfo(tmp_path, 1 << 20), root, proc)
    assert found == Available(1024 * MiB, f"MemAvailable in {tmp_path / 'meminfo'}")


def test_a_container_sees_its_own_cgroup_at_the_root(tmp_path):
    # /proc/self/cgroup names a path of the host's; the mount is the container's cgroup itself
    root, proc = _cgroup_v2(tmp_path, "/docker/0123abcd", {".": (str(256 * MiB), 100 * MiB)})
    (room,) = cgroup_rooms(root, proc)
    assert room.bytes == 156 * MiB


def test_cgroup_v1_memory_controller(tmp_path):
    root = tmp_path / "cgroup"
    own = root / "memory" / "edgec"
    own.mkdir(parents=True)
    (root / "memory" / "memory.limit_in_bytes").write_text("9223372036854771712\n")  # none
    (root / "memory" / "memory.usage_in_bytes").write_text(f"{3000 * MiB}\n")
    (own / "memory.limit_in_bytes").write_text(f"{512 * MiB}\n")
    (own / "memory.usage_in_bytes").write_text(f"{200 * MiB}\n")
    proc = tmp_path / "proc-cgroup"
    proc.write_text("12:pids:/edgec\n4:memory:/edgec\n0::/\n")
    (room,) = cgroup_rooms(root, proc)
    assert room.bytes == 312 * MiB
    assert room.source.startswith("cgroup v1 ")


def test_usage_over_the_limit_leaves_no_room(tmp_path):
    root, proc = _cgroup_v2(tmp_path, "/a", {"a": (str(100 * MiB), 120 * MiB)})
    (room,) = cgroup_rooms(root, proc)
    assert room.bytes == 0


def _infos(peak: object | None) -> dict[str, TargetFile]:
    custom = {"name": "digits", "version": "1.0.0", "profile": "x86-64-cpu"}
    if peak is not None:
        custom["peak_memory_bytes"] = peak  # type: ignore[assignment]
    info = TargetFile(
        10, {"sha256": "0" * 64}, "digits/1.0.0/x86-64-cpu/model.onnx", {"custom": {"edgec": custom}}
    )
    return {info.path: info}


def test_the_signed_peak_is_read_and_bounded():
    assert signed_peak(_infos(12 * MiB)) == 12 * MiB
    assert signed_peak(_infos(None)) is None
    assert signed_peak(_infos("12")) is None
    assert signed_peak(_infos(True)) is None
    assert signed_peak(_infos(-1)) is None


def _settings(tmp_path: Path, available_kib: int, headroom: int = 64 * MiB) -> InstallSettings:
    return InstallSettings(
        meminfo_path=_meminfo(tmp_path, available_kib),
        cgroup_root=tmp_path / "no-cgroups",
        memory_headroom_bytes=headroom,
    )


def test_an_install_that_does_not_fit_is_refused_with_the_figures(tmp_path):
    reason = fit_refusal("digits:1.0.0", _infos(200 * MiB), _settings(tmp_path, 200 * 1024))
    assert reason is not None
    assert "peak 200.0 MiB (209715200 bytes, measured at build)" in reason
    assert "+ headroom 64.0 MiB > 200.0 MiB available (209715200 bytes, MemAvailable in " in reason
    assert "\n" not in reason


def test_an_install_that_fits_with_its_headroom_goes_on(tmp_path):
    assert fit_refusal("digits:1.0.0", _infos(136 * MiB), _settings(tmp_path, 200 * 1024)) is None
    assert fit_refusal("digits:1.0.0", _infos(137 * MiB), _settings(tmp_path, 200 * 1024)) is not None


def test_a_release_signed_without_a_peak_installs_as_before(tmp_path, caplog):
    with caplog.at_level("INFO", logger="agent.memory"):
        assert fit_refusal("digits:1.0.0", _infos(None), _settings(tmp_path, 1024)) is None
    assert "without a peak memory figure" in caplog.text


def test_shadow_needs_room_for_both_models():
    available = Available(300 * MiB, "MemAvailable in /proc/meminfo")
    fits, reason = shadow_fits(120 * MiB, 100 * MiB, available, headroom=64 * MiB)
    assert fits
    assert "= 284.0 MiB <= 300.0 MiB available" in reason
    fits, reason = shadow_fits(200 * MiB, 100 * MiB, available, headroom=64 * MiB)
    assert not fits
    assert reason.startswith("two models do not fit at once: candidate peak 200.0 MiB")
    assert "364.0 MiB > 300.0 MiB available (MemAvailable in /proc/meminfo)" in reason
    fits, reason = shadow_fits(200 * MiB, None, available)
    assert fits
    assert reason == "not checked: the serving model's peak unknown"
