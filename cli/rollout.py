"""``edgec rollout start|ls|status|pause|resume|abort|rollback``: rollouts through the server's API."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from cli._api import add_server_args, call
from edgec._table import render_table

__all__ = ["register"]

TERMINAL = ("completed", "aborted", "rolled-back")
MAX_DEVICE_ROWS = 40


def register(commands: Any) -> None:
    rollout = commands.add_parser(
        "rollout", help="roll a release out to a group in waves, watch it, steer it"
    )
    sub = rollout.add_subparsers(dest="rollout_command", metavar="ACTION", required=True)
    start = sub.add_parser("start", help="start a rollout")
    start.add_argument("release", metavar="NAME:VERSION")
    start.add_argument("--group", required=True, help="the devices' group")
    start.add_argument("--fleet", help="only this fleet's devices of the group")
    start.add_argument(
        "--waves", default="5%,25%,100%", help="cumulative waves, percent or counts (default 5%%,25%%,100%%)"
    )
    start.add_argument("--bake", default="10m", help="time each wave runs before it is judged (default 10m)")
    start.add_argument(
        "--abort-if",
        action="append",
        metavar="RULE",
        help='abort rule, repeatable: "install_failure_rate>0.05", "p95_ms>1.5*control", '
        '"error_rate>0.01", "drift=drift", and on a shadow run "shadow_agreement<0.98", '
        '"shadow_p95_ms>1.2*serving", "shadow_error_rate>0" (default: install_failure_rate>0.05)',
    )
    start.add_argument(
        "--shadow",
        metavar="DURATION",
        help="run each wave in shadow first for this long (10m): its devices run the release beside "
        "the serving model on a share of live requests, and serve it only if the shadow rules pass",
    )
    start.add_argument(
        "--shadow-requests",
        type=int,
        metavar="N",
        help="... or until N requests were compared (with --shadow: whichever comes first)",
    )
    start.add_argument(
        "--shadow-sample",
        type=float,
        default=0.1,
        metavar="SHARE",
        help="share of live requests also run on the candidate in shadow (default 0.1)",
    )
    start.add_argument(
        "--min-devices", type=int, default=1, help="at least this many devices per wave (default 1)"
    )
    start.add_argument(
        "--device-timeout", default="30m", help="a device silent this long counts as failed (default 30m)"
    )
    start.add_argument("--json", action="store_true", help="print the new rollout's status as JSON")
    add_server_args(start, required=True)
    start.set_defaults(run=run_start)

    ls = sub.add_parser("ls", help="every rollout, a line each")
    ls.add_argument("--json", action="store_true", help="print JSON")
    add_server_args(ls, required=True)
    ls.set_defaults(run=run_ls)

    status = sub.add_parser(
        "status", help="waves, abort rules (canary vs control) and devices of one rollout"
    )
    status.add_argument("id")
    status.add_argument("--json", action="store_true", help="print JSON")
    status.add_argument("--watch", action="store_true", help="redraw until the rollout ends (Ctrl-C stops)")
    status.add_argument("--interval", type=float, default=2.0, help="seconds between redraws (default 2)")
    add_server_args(status, required=True)
    status.set_defaults(run=run_status)

    for action, text in (
        ("pause", "start no new wave"),
        ("resume", "carry on after a pause"),
        ("abort", "stop and send the devices it reached back to their old release"),
        ("rollback", "send every device it reached back to its old release"),
    ):
        steer = sub.add_parser(action, help=text)
        steer.add_argument("id")
        add_server_args(steer, required=True)
        steer.set_defaults(run=run_steer, action=action)


def run_start(args: argparse.Namespace) -> int:
    from edgec.rollout_spec import parse_duration

    spec = {
        "release": args.release,
        "group": args.group,
        "waves": [w.strip() for w in args.waves.split(",") if w.strip()],
        "bake_s": parse_duration(args.bake),
        "min_devices": args.min_devices,
        "device_timeout_s": parse_duration(args.device_timeout),
    }
    if args.fleet:
        spec["fleet"] = args.fleet
    if args.abort_if:
        spec["abort_if"] = args.abort_if
    if args.shadow:
        spec["shadow_s"] = parse_duration(args.shadow)
    if args.shadow_requests is not None:
        spec["shadow_requests"] = args.shadow_requests
    if args.shadow or args.shadow_requests is not None:
        spec["shadow_sample"] = args.shadow_sample
    status = call(args, "POST", "/v1/rollouts", spec)
    if args.json:
        print(json.dumps(status, indent=2))
        return 0
    waves = ", ".join(f"{w['size']} ({w['devices']})" for w in status["waves"])
    print(f"rollout {status['id']}: {status['release']} to group {status['group']}, waves {waves}")
    skipped = [d for d in status["devices"] if d["state"] == "no-bundle"]
    if skipped:
        names = ", ".join(d["device"] for d in skipped)
        print(f"{len(skipped)} device(s) left out, no bundle for their profile: {names}")
    return 0


def run_ls(args: argparse.Namespace) -> int:
    rollouts = call(args, "GET", "/v1/rollouts")
    if args.json:
        print(json.dumps(rollouts, indent=2))
        return 0
    rows = [
        (r["id"], r["release"], r["group"], r["state"], r["wave"], r["created_at"], r["reason"] or "")
        for r in rollouts
    ]
    print(render_table(("id", "release", "group", "state", "wave", "created", "reason"), rows))
    return 0


def _shown(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def render_status(status: dict[str, Any]) -> str:
    lines = [
        f"rollout {status['id']}: {status['release']} to {status['group']} — {status['state']}"
        + (f", wave {status['wave']}/{len(status['waves'])}" if status["state"] not in ("pending",) else "")
        + (
            f", baking until {status['bake_until']}"
            if status["state"] == "running" and status["bake_until"]
            else ""
        ),
    ]
    if status["reason"]:
        lines.append(f"reason: {status['reason']}")
    spec = status.get("spec") or {}
    shadowed = bool(spec.get("shadow_s") or spec.get("shadow_requests"))
    states = [
        *(("waiting", "shadowing", "shadowed") if shadowed else ("waiting",)),
        *("assigned", "installed", "failed", "timed-out", "rolled-back"),
    ]
    waves = [(w["wave"], w["size"], w["devices"], *(w.get(s, 0) for s in states)) for w in status["waves"]]
    lines += ["", render_table(("wave", "size", "devices", *states), waves)]
    if status["rules"]:
        rules = [
            (r["rule"], _shown(r["canary"]), _shown(r["control"]), _shown(r["threshold"]), r["verdict"])
            for r in status["rules"]
        ]
        lines += ["", render_table(("abort rule", "canary", "control", "threshold", "verdict"), rules)]
    cohorts = [
        (
            name,
            figures["devices"],
            *(_shown(figures[k]) for k in ("p50_ms", "p95_ms", "p99_ms", "error_rate", "drift")),
        )
        for name, figures in (("canary", status["canary"]), ("control", status["control"]))
    ]
    lines += [
        "",
        render_table(("cohort", "reporting", "p50 ms", "p95 ms", "p99 ms", "error rate", "drift"), cohorts),
    ]
    shadow = status.get("shadow")
    if shadow and shadow.get("devices"):
        lines += [
            "",
            f"shadow run of wave {status['wave']}: {shadow['devices']} device(s), "
            f"{shadow['compared']} requests compared, agreement {_shown(shadow['agreement'])}, "
            f"candidate error rate {_shown(shadow['error_rate'])}",
            render_table(
                ("latency", "p50 ms", "p95 ms", "p99 ms"),
                [
                    ("candidate", *(_shown(shadow[k]) for k in ("p50_ms", "p95_ms", "p99_ms"))),
                    (
                        "serving",
                        *(_shown(shadow[k]) for k in ("serving_p50_ms", "serving_p95_ms", "serving_p99_ms")),
                    ),
                ],
            ),
        ]
    devices = status["devices"]
    if len(devices) > MAX_DEVICE_ROWS:  # the ones worth a look first
        notable = [d for d in devices if d["state"] not in ("installed", "waiting")]
        devices = notable[:MAX_DEVICE_ROWS]
        lines += ["", f"{len(status['devices'])} devices; showing {len(devices)} not installed or waiting"]
    rows = [
        (d["device"], _shown(d["wave"]), d["state"], d["from"] or "-", d["detail"] or "") for d in devices
    ]
    if rows:
        lines += ["", render_table(("device", "wave", "state", "from", "detail"), rows)]
    return "\n".join(lines)


def run_status(args: argparse.Namespace) -> int:
    while True:
        status = call(args, "GET", f"/v1/rollouts/{args.id}")
        if args.json and not args.watch:
            print(json.dumps(status, indent=2))
            return 0
        text = render_status(status)
        if args.watch and sys.stdout.isatty():
            print("\033[2J\033[H" + text, flush=True)
        else:
            print(text, flush=True)
        if not args.watch or status["state"] in TERMINAL:
            return 0
        time.sleep(args.interval)
        if not sys.stdout.isatty():
            print()


def run_steer(args: argparse.Namespace) -> int:
    status = call(args, "POST", f"/v1/rollouts/{args.id}/{args.action}")
    print(
        f"rollout {status['id']}: {status['state']}" + (f" ({status['reason']})" if status["reason"] else "")
    )
    return 0
