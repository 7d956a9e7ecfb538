"""Commands run on the server host record what they did in the fleet's audit log.

``recorded`` runs a command's action and appends one entry to ``ota_server.audit``'s log in
the fleet database: the OS user as the actor (``local:<user>``, via ``cli``, role admin: who
holds the keys and the database on that host can do everything), the parameters, and how it
ended (ok, refused with the reason, or the error's type). Commands that need no database
(``publish``, ``keys``, ``server token``) record when one is named (``--db`` or ``$EDGEC_DB``).
"""

from __future__ import annotations

import argparse
import contextlib
import os
from collections.abc import Iterator
from typing import Any

from edgec.errors import EdgecError

__all__ = ["audit_db_arg", "recorded"]

DB_ENV = "EDGEC_DB"


def audit_db_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--db",
        default=os.environ.get(DB_ENV),
        help=f"the fleet database whose audit log records this (default ${DB_ENV}; unset: not recorded)",
    )


@contextlib.contextmanager
def recorded(db: str | None, action: str, params: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Run the block, then record ``action`` with ``params`` (the block may add to them) and its
    outcome in ``db``'s audit log; nothing is recorded without a database."""
    from ota_server.audit import failed, refused

    outcome = "ok"
    try:
        yield params
    except EdgecError as e:
        outcome = refused(str(e))
        raise
    except BaseException as e:
        outcome = failed(type(e).__name__)
        raise
    finally:
        if db:
            from ota_server.audit import AuditLog, Via, local_actor
            from ota_server.registry import Registry

            registry = Registry.open(db)
            try:
                AuditLog(registry).record(
                    local_actor(), "admin", Via.CLI, action, params=params, outcome=outcome
                )
            finally:
                registry.engine.dispose()
