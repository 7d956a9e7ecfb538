"""Reading what ``edgec demo`` prints: the drawings of ``edgec rollout status --watch``.

``pump_lines`` moves a child's output lines to a queue; ``status_table`` finds a table in one
drawing and ``rollout_summary`` makes one line of it for the demo to print.
"""

from __future__ import annotations

import queue
import re
from typing import IO, Any

__all__ = ["plural", "pump_lines", "rollout_summary", "status_table"]


def plural(items: list[Any], noun: str) -> str:
    return f"{len(items)} {noun}{'s' if len(items) != 1 else ''}"


def pump_lines(stream: IO[str] | None, lines: queue.Queue[str | None]) -> None:
    if stream is not None:
        for line in stream:
            lines.put(line)
    lines.put(None)


def status_table(frame: list[str], first_column: str) -> list[dict[str, str]] | None:
    """The rows of the table whose header starts with ``first_column``; None until it is whole."""
    header = next((i for i, line in enumerate(frame) if line.startswith(first_column + " ")), None)
    if header is None:
        return None
    columns = re.split(r"\s{2,}", frame[header].strip())
    rows: list[dict[str, str]] = []
    for line in frame[header + 2 :]:
        if not line.strip():  # a blank line ends the table
            return rows
        rows.append(dict(zip(columns, line.split(), strict=False)))
    return None


def rollout_summary(frame: list[str]) -> str:
    """One line from a drawing of ``edgec rollout status`` (once its cohort table is whole): state,
    wave, devices installed, and the p95 latency of canary vs control that the abort rule compares."""
    waves, cohorts = status_table(frame, "wave"), status_table(frame, "cohort")
    if waves is None or cohorts is None:
        return ""
    state = re.sub(r", baking until \S+", ", baking", frame[0].split(" — ", 1)[-1])
    installed = sum(int(w.get("installed", "0")) for w in waves)
    line = f"{state}: {installed}/{sum(int(w['devices']) for w in waves)} devices installed"
    p95 = {row["cohort"]: row.get("p95 ms", "-") for row in cohorts}
    if "-" not in (p95.get("canary", "-"), p95.get("control", "-")):
        line += f"; p95 canary {p95['canary']} ms, control {p95['control']} ms"
    if len(frame) > 1 and frame[1].startswith("reason: "):
        line += f" ({frame[1].removeprefix('reason: ')})"
    return line
