"""Typed profiles of target devices: TOML files validated by ``DeviceProfile``.

A profile is named by its id (a bundled file under ``data/``) or by the path of a user's
own TOML file; both are accepted wherever a profile is asked for.
"""

from __future__ import annotations

import logging
import tomllib
from pathlib import Path

from pydantic import ValidationError

from device_profiles.model import Accelerator, CpuArch, DeviceProfile, Gate, Runtime
from edgec.errors import ProfileError

__all__ = [
    "Accelerator",
    "CpuArch",
    "DeviceProfile",
    "Gate",
    "Runtime",
    "bundled_profile_ids",
    "load_profile",
    "load_profile_file",
]

logger = logging.getLogger(__name__)
DATA_DIR = Path(__file__).parent / "data"


def bundled_profile_ids() -> list[str]:
    return sorted(p.stem for p in DATA_DIR.glob("*.toml"))


def load_profile_file(path: Path) -> DeviceProfile:
    """Read and validate one profile file. Raises ``ProfileError`` naming the bad field."""
    try:
        with path.open("rb") as f:
            raw = tomllib.load(f)
    except OSError as e:
        raise ProfileError(f"cannot read profile file {path}: {e.strerror}") from e
    except tomllib.TOMLDecodeError as e:
        raise ProfileError(f"profile file {path} is not valid TOML: {e}") from e
    try:
        return DeviceProfile.model_validate(raw)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(part) for part in err["loc"]) or "(top level)"
        more = f" (and {e.error_count() - 1} more)" if e.error_count() > 1 else ""
        raise ProfileError(f"profile file {path}: {where}: {err['msg']}{more}") from e


def load_profile(name_or_path: str | Path) -> DeviceProfile:
    """A bundled profile by id, or a user's profile file by path."""
    text = str(name_or_path)
    candidate = Path(text)
    if text.endswith(".toml") or candidate.is_file():
        if not candidate.is_file():
            raise ProfileError(f"profile file {text} does not exist")
        return load_profile_file(candidate)
    bundled = DATA_DIR / f"{text}.toml"
    if not bundled.is_file():
        known = ", ".join(bundled_profile_ids())
        raise ProfileError(f"unknown profile {text!r}; known profiles: {known} (or pass a .toml file)")
    return load_profile_file(bundled)
