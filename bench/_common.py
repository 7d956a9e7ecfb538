"""Helpers the benchmark scripts share."""

from __future__ import annotations

from collections.abc import Iterable
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as dist_version

__all__ = ["library_versions"]


def library_versions(names: Iterable[str]) -> dict[str, str | None]:
    """Each distribution's installed version, None where it is not installed."""
    found: dict[str, str | None] = {}
    for name in names:
        try:
            found[name] = dist_version(name)
        except PackageNotFoundError:
            found[name] = None
    return found
