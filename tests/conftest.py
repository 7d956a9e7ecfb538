"""Shared fixtures: the bundled samples, a CLI runner, and small ONNX models built in code."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Nothing may reach the network during a build: point every proxy at a closed port, so a
# converter that tries to download something fails instead of fetching it. Local servers
# that later tests start stay reachable.
for _var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
    os.environ[_var] = "http://127.0.0.1:9"
os.environ["NO_PROXY"] = os.environ["no_proxy"] = "127.0.0.1,localhost,::1"
# Signing keys made by the tests (and the CLI processes they start) use a cheap scrypt cost
# (ota_server.keys.TEST_KDF): tests make hundreds of keys. Never set where real keys are made.
os.environ["EDGEC_TEST_WEAK_KDF"] = "1"

from tests._cli import DIGITS, ROOT, UNSHARE, CliResult, run_edgec  # noqa: E402, F401


@pytest.fixture
def edgec_cli():
    return run_edgec


@pytest.fixture(scope="session")
def digits() -> Path:
    return DIGITS


@pytest.fixture(autouse=True)
def _own_build_cache(tmp_path_factory, monkeypatch):
    """Every test starts with an empty build cache of its own (and never touches the user's)."""
    monkeypatch.setenv("EDGEC_CACHE_DIR", str(tmp_path_factory.mktemp("edgec-cache")))


@pytest.fixture(autouse=True)
def _own_config_dir(tmp_path_factory, monkeypatch):
    """A config dir of its own (the default offline key folder lives there), never the user's."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path_factory.mktemp("edgec-config")))


# the digits sample as several releases (built once per session, only by the tests that ask)
from tests._releases import releases  # noqa: E402, F401
