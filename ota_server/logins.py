"""The server replicas' broker logins: ``edgec-server``, ``edgec-server-2``, ``edgec-server-3``...

Client ids are bound to usernames at the broker, so each replica has a login of its own (its
connection and its persistent session are its own); the replicas share one secret. No device
id may take one of these names."""

from __future__ import annotations

import re

__all__ = ["SERVER_USER", "is_server_login", "server_logins"]

SERVER_USER = "edgec-server"  # the first replica's login (and, bound to it, its client id)
MAX_REPLICAS = 64
_LOGIN = re.compile(rf"{re.escape(SERVER_USER)}(-[0-9]{{1,4}})?")


def server_logins(replicas: int) -> list[str]:
    """The broker logins of ``replicas`` server replicas."""
    if not 1 <= replicas <= MAX_REPLICAS:
        raise ValueError(f"server replicas must be 1 to {MAX_REPLICAS}, not {replicas}")
    return [SERVER_USER] + [f"{SERVER_USER}-{n}" for n in range(2, replicas + 1)]


def is_server_login(name: str) -> bool:
    """Whether ``name`` is, or could be, a server replica's login: never a device's id."""
    return _LOGIN.fullmatch(name) is not None
