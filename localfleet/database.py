"""A PostgreSQL database of a local fleet's own, on a server that is already running (server
replicas share their registry there): created empty, dropped at the end."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

from localfleet.processes import HarnessError

__all__ = ["PG_ADMIN", "postgres_database"]

# a login allowed to create databases; trust auth on this machine's 127.0.0.1
PG_ADMIN = os.environ.get("EDGEC_PG_ADMIN", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")


@contextmanager
def postgres_database(admin_url: str = PG_ADMIN, prefix: str = "edgec_fleet") -> Iterator[str]:
    """Create a fresh database; yield its URL; drop it (its connections too)."""
    import sqlalchemy
    from sqlalchemy.exc import OperationalError

    admin = sqlalchemy.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    try:
        with admin.connect() as conn:
            conn.execute(sqlalchemy.text(f'CREATE DATABASE "{name}"'))
    except OperationalError as e:
        admin.dispose()
        first = str(e.orig).strip().splitlines()[0]
        raise HarnessError(f"cannot create a database at {admin_url}: {first} (set EDGEC_PG_ADMIN)") from e
    try:
        yield admin_url.rsplit("/", 1)[0] + f"/{name}"
    finally:
        with admin.connect() as conn:
            conn.execute(sqlalchemy.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
