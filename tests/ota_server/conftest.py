"""Registry fixtures: a SQLite file, and a PostgreSQL database of the test's own."""

from __future__ import annotations

import pytest

from tests._services import postgres_url as _postgres_url


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path):
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'fleet.db'}"
    else:
        yield from _postgres_url()
