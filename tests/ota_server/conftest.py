"""Registry fixtures: a SQLite file, and a PostgreSQL database of the test's own."""

from __future__ import annotations

import os
import uuid

import pytest

PG_ADMIN = os.environ.get("EDGEC_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")


def _postgres_url():
    """Create a fresh database on the machine's PostgreSQL; yield its URL; drop it."""
    sqlalchemy = pytest.importorskip("sqlalchemy")
    pytest.importorskip("psycopg")
    admin = sqlalchemy.create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
    name = f"edgec_test_{uuid.uuid4().hex[:12]}"
    try:
        with admin.connect() as conn:
            conn.execute(sqlalchemy.text(f'CREATE DATABASE "{name}"'))
    except sqlalchemy.exc.OperationalError as e:
        admin.dispose()
        pytest.skip(f"no PostgreSQL at {PG_ADMIN}: {str(e.orig).strip().splitlines()[0]}")
    try:
        yield PG_ADMIN.rsplit("/", 1)[0] + f"/{name}"
    finally:
        with admin.connect() as conn:
            conn.execute(sqlalchemy.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path):
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'fleet.db'}"
    else:
        yield from _postgres_url()
