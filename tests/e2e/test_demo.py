"""``edgec demo`` as a user runs it: the whole loop ends with the fleet table, and neither the
end nor Ctrl-C leaves a process or the work folder behind."""

from __future__ import annotations

import importlib.util
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests._services import MOSQUITTO
from tests.conftest import ROOT

pytestmark = pytest.mark.slow

HAS_AMQTT = importlib.util.find_spec("amqtt") is not None
DEVICES = ("x86-1", "x86-2", "pi4-1")


def _demo(tmp_path: Path, *args: str) -> subprocess.Popen[str]:
    """``edgec demo`` with its temp folder under ``tmp_path`` (and this test's build cache)."""
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    return subprocess.Popen(
        [sys.executable, "-m", "edgec", "demo", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _stop(proc: subprocess.Popen[str]) -> None:
    """Ctrl-C first (the demo stops its services), SIGKILL only if that does not end it."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _workdir(first_line: str) -> Path:
    match = re.match(r"edgec demo: working in (\S+) ", first_line)
    assert match, first_line
    return Path(match[1])


def _leftovers(workdir: Path) -> list[str]:
    """Processes whose command line names the demo's folder (broker, server, agents)."""
    ps = subprocess.run(["ps", "-ww", "-eo", "pid,args"], capture_output=True, text=True, check=True)
    return [line for line in ps.stdout.splitlines() if str(workdir) in line]


@pytest.mark.parametrize(
    "broker",
    [
        pytest.param("mosquitto", marks=pytest.mark.skipif(MOSQUITTO is None, reason="no mosquitto binary")),
        pytest.param("embedded", marks=pytest.mark.skipif(not HAS_AMQTT, reason="edgec[demo] not installed")),
    ],
)
def test_demo_rolls_out_two_releases_and_ends_with_the_fleet_table(tmp_path, broker):
    proc = _demo(tmp_path, "--broker", broker)
    try:
        out, _ = proc.communicate(timeout=420)
    finally:
        _stop(proc)
    assert proc.returncode == 0, out[-5000:]
    lines = out.splitlines()
    workdir = _workdir(lines[0])
    assert not workdir.exists()
    assert not _leftovers(workdir)

    header = max(i for i, line in enumerate(lines) if line.startswith("device  group  profile"))
    table = lines[header:]
    assert table[-1].startswith(DEVICES), out[-3000:]  # the fleet table is the last thing printed
    columns = re.split(r"\s{2,}", table[0])
    rows = {line.split()[0]: dict(zip(columns, line.split(), strict=False)) for line in table[2:]}
    assert sorted(rows) == sorted(DEVICES)
    for device, row in rows.items():
        assert row["installed"] == "digits:2.0.0", (device, row)
        assert float(row["p50 ms"]) > 0, (device, row)
        assert float(row["p95 ms"]) >= float(row["p50 ms"]), (device, row)
        assert row["drift"] == "ok", (device, row)
    assert out.count("completed, wave") >= 2  # both rollouts, followed to the end


def _pump(stream, lines: queue.Queue) -> None:
    for line in stream:
        lines.put(line)
    lines.put(None)


@pytest.mark.skipif(MOSQUITTO is None and not HAS_AMQTT, reason="no MQTT broker for the demo")
def test_ctrl_c_leaves_no_process_and_no_folder(tmp_path):
    proc = _demo(tmp_path)
    lines: queue.Queue[str | None] = queue.Queue()
    threading.Thread(target=_pump, args=(proc.stdout, lines), daemon=True).start()
    seen: list[str] = []
    try:
        deadline = time.monotonic() + 300
        while not any(line.startswith("[8/") for line in seen):  # broker, server, agents all up
            assert time.monotonic() < deadline, "".join(seen)[-3000:]
            line = lines.get(timeout=300)
            assert line is not None, "".join(seen)[-3000:]
            seen.append(line)
        workdir = _workdir(seen[0])
        assert len(_leftovers(workdir)) >= 1 + len(DEVICES)  # the server and the agents, at least
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
    finally:
        _stop(proc)
    while (line := lines.get(timeout=10)) is not None:
        seen.append(line)
    assert proc.returncode == 130, "".join(seen)[-3000:]
    assert "interrupted" in "".join(seen)
    assert not workdir.exists()
    assert not _leftovers(workdir)
