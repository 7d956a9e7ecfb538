"""The operator API client the ``edgec`` operator commands use (``--server``, ``--token``)."""

from __future__ import annotations

import argparse
import json
import os
import urllib.error
import urllib.request
from typing import Any

from edgec.errors import OptionError, ServerError

__all__ = ["add_server_args", "call"]

SERVER_ENV = "EDGEC_SERVER"
TOKEN_ENV = "EDGEC_TOKEN"


def add_server_args(parser: argparse.ArgumentParser, required: bool = False) -> None:
    default = os.environ.get(SERVER_ENV)
    parser.add_argument(
        "--server",
        default=default,
        required=required and not default,
        help=f"the OTA server's HTTP address, e.g. http://ota:8080 (default ${SERVER_ENV})",
    )
    parser.add_argument(
        "--token", default=os.environ.get(TOKEN_ENV), help=f"operator API token (default ${TOKEN_ENV})"
    )


def call(args: argparse.Namespace, method: str, path: str, body: Any = None, timeout_s: float = 30) -> Any:
    """One API request; the decoded JSON answer. Raises ``ServerError`` with the server's message."""
    if not args.token:
        raise OptionError(f"no API token: pass --token or set ${TOKEN_ENV} (edgec server token makes one)")
    url = args.server.rstrip("/") + path
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method)
    request.add_header("Authorization", f"Bearer {args.token}")
    if data is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as e:
        try:
            message = json.loads(e.read()).get("error", e.reason)
        except (ValueError, AttributeError):
            message = e.reason
        raise ServerError(f"{method} {path}: {e.code} {message}") from e
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise ServerError(f"cannot reach the OTA server at {args.server}: {reason}") from e
