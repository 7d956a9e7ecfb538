"""``edgec agent run|self-test|serve|shadow``: the on-device daemon and its local checks."""

from __future__ import annotations

import argparse
import threading
from pathlib import Path
from typing import Any

from cli._shadow import add_shadow
from edgec._table import render_table
from edgec.errors import GateError, OptionError

__all__ = ["register"]


def register(commands: Any) -> None:
    agent = commands.add_parser("agent", help="the on-device agent: run the daemon, test or serve a bundle")
    sub = agent.add_subparsers(dest="agent_command", metavar="ACTION", required=True)
    run = sub.add_parser("run", help="the daemon: install what the director assigns, serve it, report")
    run.add_argument("--config", type=Path, required=True, help="agent.toml (written by edgec devices add)")
    run.set_defaults(run=run_daemon)
    test = sub.add_parser("self-test", help="load a bundle and check it against its golden outputs")
    test.add_argument("bundle", type=Path)
    test.add_argument("--threads", type=int, default=1, help="runtime threads (default 1)")
    test.set_defaults(run=run_self_test)
    serve = sub.add_parser("serve", help="serve one bundle over the KServe v2 HTTP API (no MQTT)")
    serve.add_argument("bundle", type=Path)
    serve.add_argument("--host", default="127.0.0.1", help="address (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    serve.add_argument("--threads", type=int, default=1, help="runtime threads (default 1)")
    serve.add_argument(
        "--limit",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a bound of the HTTP API, e.g. max_connections=64 or idle_timeout_s=5 (repeatable; "
        "the names and defaults are agent.config.ServingLimits')",
    )
    serve.set_defaults(run=run_serve)
    add_shadow(sub)


def run_daemon(args: argparse.Namespace) -> int:
    from agent.config import load_config
    from agent.daemon import Agent

    config = load_config(args.config)
    agent = Agent(config)
    print(
        f"edgec agent: device {config.device} ({config.profile}), broker "
        f"{config.mqtt.host}:{config.mqtt.port}, state {config.state_dir}, "
        f"inference API http://{config.http.host}:{config.http.port}/v2",
        flush=True,
    )
    agent.run_forever()
    return 0


def run_self_test(args: argparse.Namespace) -> int:
    from agent.runtime import load_bundle, self_test

    model = load_bundle(args.bundle, threads=args.threads)
    result = self_test(model, args.bundle / "golden.npz")
    model.close()
    manifest = model.manifest

    def shown(value: float | None) -> str:
        return "-" if value is None else f"{value:.6g}"

    rows = [
        ("max abs err", shown(result.max_abs_err), shown(result.limits.get("max_abs_err"))),
        ("cosine", shown(result.cosine), shown(result.limits.get("min_cosine"))),
        ("top-1 agreement", shown(result.top1_agreement), shown(result.limits.get("min_top1_agreement"))),
    ]
    print(
        f"{manifest.name}:{manifest.version} ({manifest.format.value} {manifest.precision.value}), "
        f"{result.samples} golden samples"
    )
    print(render_table(("figure", "measured", "limit"), rows))
    if not result.passed:
        raise GateError(f"self-test failed: {result.reason}", [str(result.reason)])
    print("self-test passed")
    return 0


def serving_limits(pairs: list[str]) -> Any:
    """``--limit NAME=VALUE`` options as ``ServingLimits``; ``OptionError`` names a bad one."""
    from pydantic import ValidationError

    from agent.config import ServingLimits

    values: dict[str, str] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise OptionError(f"--limit {pair!r}: write NAME=VALUE, e.g. max_connections=64")
        values[name.strip()] = value.strip()
    try:
        return ServingLimits.model_validate(values)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        known = ", ".join(ServingLimits.model_fields)
        raise OptionError(f"--limit {where}: {first['msg']} (limits: {known})") from e


def run_serve(args: argparse.Namespace) -> int:
    from agent.runtime import load_bundle
    from agent.serving import InferenceServer
    from agent.slot import ModelSlot

    limits = serving_limits(args.limit)
    slot = ModelSlot()
    slot.swap(load_bundle(args.bundle, threads=args.threads))
    from agent.metrics import AgentMetrics

    server = InferenceServer(slot, args.host, args.port, limits=limits, metrics=AgentMetrics())
    port = server.start()
    name = slot.model.manifest.name if slot.model else "?"
    print(f"serving {name} on http://{args.host}:{port}/v2/models/{name} (Ctrl-C stops)", flush=True)
    try:
        threading.Event().wait()
    finally:
        server.stop()
    return 0
