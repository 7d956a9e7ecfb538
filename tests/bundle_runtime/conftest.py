"""The digits bundles the agent's tests build (``tests/agent/conftest.py``), shared here."""

from tests.agent.conftest import _digits_builds, digits_bundles, digits_int8_io_bundle  # noqa: F401
