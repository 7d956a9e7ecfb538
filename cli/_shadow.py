"""``edgec agent shadow``: a shadow run by hand on a running agent, for a field test.

It talks to the agent's local API (``/v2/shadow``, ``agent._shadow_api``): it starts a run of
a bundle folder on the device beside the model being served, and with ``--wait`` polls until
the run ends and prints its figures. ``--show`` prints the current or last run's figures,
``--stop`` ends it. A BUNDLE that exists here is sent as its absolute path (the agent accepts
it if it lies under its shadow root); any other is taken by the agent relative to that root.

Exit statuses: 0 started (or, with ``--wait``, ended); 2 the agent refused the request (a busy
agent's 409 included: one run at a time) or an option is wrong; 4 the agent could not be
reached or failed; 1 the run itself failed.
"""

from __future__ import annotations

import argparse
import json
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from edgec._table import render_table
from edgec.errors import (
    ConflictError,
    EdgecError,
    NotFoundError,
    OptionError,
    ServerError,
    UserInputError,
)

__all__ = ["add_shadow", "run_shadow"]

DEFAULT_URL = "http://127.0.0.1:8000"
POLL_S = 1.0
TIMEOUT_S = 120.0  # a POST loads and self-tests the bundle before it answers


def add_shadow(sub: Any) -> None:
    shadow = sub.add_parser(
        "shadow",
        help="run a bundle in shadow beside the served model on a running agent (a field test)",
        description=(
            "Start a shadow run of BUNDLE (a bundle folder on the device, under the agent's shadow root) "
            "beside the model the agent serves: a share of live requests also runs on it and is compared. "
            "--show and --stop act on the current or last run."
        ),
    )
    shadow.add_argument("bundle", nargs="?", help="the bundle folder to run in shadow")
    shadow.add_argument("--for", dest="duration", help="how long, e.g. 600, 30s, 10m, 2h")
    shadow.add_argument("--requests", type=int, help="how many requests to run on the candidate")
    shadow.add_argument("--sample", type=float, help="share of served requests also run on it (default 0.1)")
    shadow.add_argument("--url", default=DEFAULT_URL, help=f"the agent's local API (default {DEFAULT_URL})")
    shadow.add_argument("--wait", action="store_true", help="wait for the run to end and print its figures")
    shadow.add_argument("--show", action="store_true", help="print the current or last run's figures")
    shadow.add_argument("--stop", action="store_true", help="stop the current run and print its figures")
    shadow.add_argument("--json", action="store_true", help="print JSON")
    shadow.set_defaults(run=run_shadow)


def run_shadow(args: argparse.Namespace) -> int:
    if args.show or args.stop:
        if args.bundle or (args.show and args.stop):
            raise OptionError("give a BUNDLE to start a run, or --show, or --stop: one of them")
        figures = _call(args.url, "DELETE" if args.stop else "GET")
        if args.wait and not args.stop:
            figures = _wait(args.url, figures)
        return _print_figures(args, figures)
    if not args.bundle:
        raise OptionError("give the BUNDLE folder to run in shadow (or --show, or --stop)")
    if args.duration is None and args.requests is None:
        raise OptionError("say how long the run lasts: --for 10m, --requests N, or both")
    body: dict[str, Any] = {"bundle": _bundle(args.bundle)}
    if args.duration is not None:
        from edgec.rollout_spec import parse_duration

        body["duration_s"] = parse_duration(args.duration)
    if args.requests is not None:
        body["requests"] = args.requests
    if args.sample is not None:
        body["sample"] = args.sample
    started = _call(args.url, "POST", body)
    if not args.wait:
        if args.json:
            print(json.dumps(started, indent=2))
        else:
            print(
                f"shadow run {started['id']}: {started['release']} beside {started['serving']}, started "
                f"(edgec agent shadow --show --url {args.url} prints its figures)"
            )
        return 0
    if not args.json:
        print(f"shadow run {started['id']}: {started['release']} beside {started['serving']}", flush=True)
    return _print_figures(args, _wait(args.url, _call(args.url, "GET")))


def _bundle(given: str) -> str:
    """An existing local path as its absolute path; anything else as given (the agent's root)."""
    path = Path(given)
    return str(path.resolve()) if path.exists() else given


def _wait(url: str, figures: dict[str, Any]) -> dict[str, Any]:
    started = figures.get("id")
    try:
        while figures.get("state") != "done":
            time.sleep(POLL_S)
            figures = _call(url, "GET")
            if figures.get("id") != started:
                raise ConflictError(f"shadow run {started} was replaced by {figures.get('id')} while waiting")
    except KeyboardInterrupt:
        raise EdgecError(
            f"stopped waiting; shadow run {started} goes on (edgec agent shadow --stop --url {url} ends it)"
        ) from None
    return figures


def _call(url: str, method: str, body: Any = None) -> dict[str, Any]:
    """One request to ``URL/v2/shadow``; the decoded answer. The agent's refusals as errors."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url.rstrip("/") + "/v2/shadow", data=data, method=method)
    if data is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
            document: dict[str, Any] = json.loads(response.read())
            return document
    except urllib.error.HTTPError as e:
        try:
            message = str(json.loads(e.read()).get("error", e.reason))
        except (ValueError, AttributeError):
            message = str(e.reason)
        if e.code == 409:
            raise ConflictError(f"the agent is busy: {message}") from None
        if e.code == 404:
            raise NotFoundError(f"{method} {url}/v2/shadow: {message}") from None
        if 400 <= e.code < 500:
            raise UserInputError(f"the agent refused the shadow run: {e.code} {message}") from None
        raise ServerError(f"{method} {url}/v2/shadow: {e.code} {message}") from None
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        raise ServerError(
            f"cannot reach the agent at {url}: {reason} (is the agent running, and --url its [http] port?)"
        ) from None


def _print_figures(args: argparse.Namespace, figures: dict[str, Any]) -> int:
    if args.json:
        print(json.dumps(figures, indent=2))
    else:
        print(_figures_text(figures))
    if figures.get("reason") == "failed":
        raise EdgecError(f"shadow run {figures.get('id')} failed; the agent's log says why")
    return 0


def _figures_text(f: dict[str, Any]) -> str:
    """A run's figures as the tables a person reads."""

    def share(value: float | None) -> str:
        return "-" if value is None else f"{value:.4f}"

    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value:.3f}"

    state = f"{f['state']} ({f['reason']})" if f.get("reason") else f["state"]
    span = f"{f['started_at']} - {f['ended_at']}"
    head = f"shadow run {f['id']}: {f['release']} beside {f['serving']}, {state}, {span}"
    counts = [
        ("served requests", f["offered"]),
        ("sampled", f["sampled"]),
        ("compared", f["compared"]),
        ("dropped (queue full)", f["dropped"]),
        ("skipped (over CPU budget)", f["over_budget"]),
        ("candidate errors", f["errors"]),
    ]
    agreement = [("all outputs", share(f["agreement"]))]
    agreement += [(f"output {name}", share(value)) for name, value in sorted(f["outputs"].items())]
    latency = [(f"p{p}", ms(f[f"p{p}_ms"]), ms(f[f"serving_p{p}_ms"])) for p in (50, 95, 99)]
    parts = [
        head,
        render_table(("requests", "count"), counts, right=(1,)),
        render_table(("agreement", "share"), agreement, right=(1,)),
        render_table(("inference ms", "candidate", "serving"), latency, right=(1, 2)),
    ]
    if f.get("last_error"):
        parts.append(f"the candidate's last error: {f['last_error']}")
    return "\n\n".join(parts)
