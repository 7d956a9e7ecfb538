"""The whole loop on one machine (see ``tests/_fleet.py``); the releases it publishes come
from ``tests/_releases.py``."""

from __future__ import annotations

import pytest

from tests._fleet import Fleet, down, new_fleet


@pytest.fixture
def fleet(tmp_path) -> Fleet:
    fleet = new_fleet(tmp_path)
    yield fleet
    down(fleet)
