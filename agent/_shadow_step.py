"""The install pipeline's shadow step: a candidate run beside the serving model, reported.

A director document with action ``shadow`` asks for it once the candidate is loaded,
self-tested and warmed up. The candidate is fed a sampled share of live requests through the
agent's ``ShadowTap`` (``agent.shadow``: off the request path, within a CPU budget); each
window of figures is reported as a ``shadow`` event and the totals as ``shadowed``, which
the server's rollout judges with its ``shadow_*`` rules. The candidate never answers a
request here.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

from agent._install_parts import InstallSettingsView, Reporter
from agent.memory import available_memory, shadow_fits, signed_peak
from agent.shadow import ShadowFigures, ShadowMismatchError, ShadowPlan, ShadowRun, ShadowTap
from agent.slot import LoadedModel
from edgec.director import DirectorDocument
from edgec.errors import EdgecError
from edgec.reports import SHADOW_FIGURES, EventKind

__all__ = ["MAX_REPORTED_OUTPUTS", "ShadowSkipped", "reported", "shadow_candidate", "skip_reason"]

MAX_REPORTED_OUTPUTS = 32  # per-output agreement in an event: a flat object of at most this many (MAX_ITEMS)


class ShadowSkipped(EdgecError):
    """A shadow run cannot run on this device (reported as a ``shadowed`` event, skipped, with
    the reason); the serving model serves on and nothing more of the release is fetched."""


def skip_reason(
    infos: Mapping[str, Any], serving: LoadedModel | None, settings: InstallSettingsView
) -> str | None:
    """Why a shadow run of the release ``infos`` (its signed targets) signs cannot run here,
    known before any byte of it is fetched: no model serves, or the two models would not fit
    in memory at once (``agent.memory.shadow_fits``, on the peaks the builds measured)."""
    if serving is None:
        return "no model serves here: there is nothing to compare the candidate with"
    memory = serving.manifest.memory
    fits, reason = shadow_fits(
        signed_peak(infos),
        memory.peak_bytes if memory else None,
        available_memory(settings.meminfo_path, settings.cgroup_root),
        settings.memory_headroom_bytes,
    )
    return None if fits else reason


def shadow_candidate(
    doc: DirectorDocument,
    candidate: LoadedModel,
    *,
    serving: LoadedModel | None,
    tap: ShadowTap | None,
    settings: InstallSettingsView,
    reporter: Reporter,
    stop: threading.Event,
) -> ShadowFigures:
    """Run ``candidate`` in shadow of ``serving`` as ``doc.shadow`` asks, until its time or
    request count is reached or ``stop`` is set, and report it; the totals. ``ShadowSkipped``
    where it cannot run."""
    assert doc.shadow is not None  # a shadow document says for how long (DirectorDocument checks)
    if tap is None:
        raise ShadowSkipped("this agent runs no shadows (no serving callback feeds them)")
    if serving is None:  # (checked before the download too; a restart may have lost it since)
        raise ShadowSkipped("no model serves here: there is nothing to compare the candidate with")
    plan = ShadowPlan(
        duration_s=doc.shadow.duration_s,
        requests=doc.shadow.requests,
        sample=doc.shadow.sample,
        cpu_budget=settings.shadow_cpu_budget,
        window_s=settings.shadow_window_s,
        queue=settings.shadow_queue,
    )

    def window(figures: ShadowFigures) -> None:
        reporter.event(EventKind.SHADOW, doc.release, None, **reported(figures))

    try:
        run = ShadowRun(candidate, serving.manifest, plan, on_window=window)
        if run.isolated:
            candidate.close()  # its child process holds it now: one copy in memory, not two
    except ShadowMismatchError as e:  # no output in common, no thresholds: nothing to judge by
        raise ShadowSkipped(str(e)) from e
    try:
        tap.attach(run)
        try:
            figures = run.wait(stop=stop)
        finally:
            tap.detach(run)
    finally:
        run.close()
    agreement = "-" if figures.agreement is None else f"{figures.agreement:.4f}"
    detail = f"agreement {agreement} on {figures.compared} requests ({figures.reason})"
    reporter.event(EventKind.SHADOWED, doc.release, detail, **reported(figures))
    return figures


def reported(figures: ShadowFigures) -> dict[str, Any]:
    """A shadow run's figures as an event's extra fields (``Event`` keeps at most 16, flat):
    the counts, the agreement, both models' latency and why it ended, and the per-output
    agreement as one flat object of at most ``MAX_REPORTED_OUTPUTS``."""
    data = figures.as_dict()
    outputs = dict(list((data.get("outputs") or {}).items())[:MAX_REPORTED_OUTPUTS])
    return {**{k: data.get(k) for k in SHADOW_FIGURES}, "outputs": outputs}
