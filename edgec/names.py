"""Names that reach the filesystem, MQTT topics and the broker's files: one checked type each.

Release names, versions, profile ids, and device, group and fleet ids become folder names
(``models/<name>-<version>/``, ``targets/<name>/<version>/<profile>/``), MQTT topic levels
(``edgec/v1/<fleet>/devices/<device>/…``) and lines of the broker's password and ACL files.
A conservative pattern keeps each one a single harmless path component and topic level:

- a name or id: 1-64 ASCII letters, digits, ``.``, ``_``, ``-``, starting with a letter or a
  digit — so never ``.`` or ``..``, no ``/`` or ``\\``, no ``+``/``#`` (MQTT wildcards), no
  ``:`` (the release separator), no whitespace, no NUL;
- a version: the same, and ``+`` (semver build metadata: ``1.2.0+cuda12``);
- a release: ``NAME:VERSION``;
- a file path inside a bundle or a repository: relative, ``/``-separated, 1-16 components of
  ASCII letters, digits, ``.``, ``_``, ``+``, ``-``, each starting with a letter, a digit or
  ``_`` (never ``..``, never absolute, never empty), at most 1,024 characters.

The ``check_*`` functions raise ``InvalidNameError`` (one line: the field, the value, the
pattern); the ``Annotated`` types run them inside pydantic models (a validation error there).

Where a path is built from remote or user input, ``resolve_inside`` resolves it (symlinks
followed) and refuses it unless it lies strictly under its root, before anything is written
or renamed; ``remove_inside`` deletes only under its root and never follows a symlink.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Annotated, NamedTuple

from pydantic import AfterValidator, ValidationInfo

from edgec.errors import InvalidNameError, PathOutsideRootError

__all__ = [
    "NAME_PATTERN",
    "PATH_COMPONENT_PATTERN",
    "VERSION_PATTERN",
    "InvalidNameError",
    "Name",
    "PathOutsideRootError",
    "RelativePath",
    "Release",
    "ReleaseRef",
    "Version",
    "check_name",
    "check_relative_path",
    "check_version",
    "parse_release",
    "remove_inside",
    "resolve_inside",
]

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
VERSION_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,63}$"
PATH_COMPONENT_PATTERN = r"^[A-Za-z0-9_][A-Za-z0-9._+-]{0,254}$"
MAX_PATH_CHARS = 1024
MAX_PATH_DEPTH = 16

# matched up to \Z: "$" would also accept a value that ends in a newline
_NAME = re.compile(NAME_PATTERN.removesuffix("$") + r"\Z")
_VERSION = re.compile(VERSION_PATTERN.removesuffix("$") + r"\Z")
_COMPONENT = re.compile(PATH_COMPONENT_PATTERN.removesuffix("$") + r"\Z")
_SHOWN_CHARS = 60


def _shown(value: object) -> str:
    """``repr`` of ``value``, truncated: an error message stays one short line."""
    if isinstance(value, str) and len(value) > _SHOWN_CHARS:
        return repr(value[:_SHOWN_CHARS]) + f"… ({len(value)} characters)"
    text = repr(value)
    return text if len(text) <= _SHOWN_CHARS + 2 else text[:_SHOWN_CHARS] + "…"


def _refuse(field: str, value: object, allowed: str) -> InvalidNameError:
    return InvalidNameError(f"{field} {_shown(value)} is not allowed: {allowed}", field, value)


def check_name(value: object, field: str = "name") -> str:
    """``value`` if it is a safe name or id (``NAME_PATTERN``); else ``InvalidNameError``."""
    if not isinstance(value, str) or not _NAME.match(value):
        allowed = f"use 1-64 of A-Z a-z 0-9 . _ -, starting with a letter or digit ({NAME_PATTERN})"
        raise _refuse(field, value, allowed)
    return value


def check_version(value: object, field: str = "version") -> str:
    """``value`` if it is a safe version (``VERSION_PATTERN``); else ``InvalidNameError``."""
    if not isinstance(value, str) or not _VERSION.match(value):
        allowed = f"use 1-64 of A-Z a-z 0-9 . _ + -, starting with a letter or digit ({VERSION_PATTERN})"
        raise _refuse(field, value, allowed)
    return value


def check_relative_path(value: object, field: str = "path") -> str:
    """``value`` if it is a safe relative ``/``-separated path; else ``InvalidNameError``."""
    allowed = (
        f"a relative path of at most {MAX_PATH_DEPTH} '/'-separated parts, each matching "
        f"{PATH_COMPONENT_PATTERN} (no '..', no leading '/')"
    )
    if not isinstance(value, str) or not value or len(value) > MAX_PATH_CHARS:
        raise _refuse(field, value, allowed)
    parts = value.split("/")
    if len(parts) > MAX_PATH_DEPTH or not all(_COMPONENT.match(part) for part in parts):
        raise _refuse(field, value, allowed)
    return value


class ReleaseRef(NamedTuple):
    """A release, ``NAME:VERSION``, split and checked."""

    name: str
    version: str

    def __str__(self) -> str:
        return f"{self.name}:{self.version}"


def parse_release(value: object, field: str = "release") -> ReleaseRef:
    """``"NAME:VERSION"`` as a ``ReleaseRef``, both parts checked; else ``InvalidNameError``."""
    if not isinstance(value, str) or value.count(":") != 1:
        raise _refuse(field, value, "NAME:VERSION, e.g. digits:1.0.0")
    name, _, version = value.partition(":")
    return ReleaseRef(check_name(name, f"{field} name"), check_version(version, f"{field} version"))


# -- pydantic field types -----------------------------------------------------------------------
def _field(info: ValidationInfo) -> str:
    return info.field_name or "value"


def _name(value: str, info: ValidationInfo) -> str:
    return check_name(value, _field(info))


def _version(value: str, info: ValidationInfo) -> str:
    return check_version(value, _field(info))


def _path(value: str, info: ValidationInfo) -> str:
    return check_relative_path(value, _field(info))


def _release(value: str, info: ValidationInfo) -> str:
    parse_release(value, _field(info))
    return value


Name = Annotated[str, AfterValidator(_name)]
"""A release name, profile id, or device, group or fleet id (``NAME_PATTERN``)."""
Version = Annotated[str, AfterValidator(_version)]
"""A release version (``VERSION_PATTERN``)."""
RelativePath = Annotated[str, AfterValidator(_path)]
"""A file path inside a bundle or a repository (``check_relative_path``)."""
Release = Annotated[str, AfterValidator(_release)]
"""``NAME:VERSION`` (``parse_release``)."""


# -- paths built from such input ------------------------------------------------------------
def _outside(root: Path, parts: tuple[str, ...], resolved: Path) -> PathOutsideRootError:
    given = "/".join(parts)
    return PathOutsideRootError(
        f"path {_shown(given)} resolves to {resolved}, outside {root}: refused (nothing written or deleted)"
    )


def resolve_inside(root: Path, *parts: str) -> Path:
    """``root/parts`` resolved (symlinks followed); ``PathOutsideRootError`` unless it lies
    strictly under ``root`` (resolved too). Call it before any write, rename or delete."""
    base = root.resolve()
    try:
        resolved = root.joinpath(*parts).resolve()
    except (OSError, RuntimeError) as e:  # a symlink loop
        raise PathOutsideRootError(
            f"path {_shown('/'.join(parts))} under {base} does not resolve: {e}"
        ) from e
    if resolved == base or not resolved.is_relative_to(base):
        raise _outside(base, parts, resolved)
    return resolved


def remove_inside(root: Path, *parts: str) -> bool:
    """Delete ``root/parts`` (a folder tree or a file) if it lies strictly under ``root``.

    The parent is resolved and must stay under ``root``; the last part is never followed:
    a symlink there is removed itself, not what it points at (``shutil.rmtree`` does not follow
    links inside the tree either). ``PathOutsideRootError`` otherwise; returns whether
    something was removed."""
    if not parts:
        raise _outside(root.resolve(), parts, root.resolve())
    base = root.resolve()
    lexical = root.joinpath(*parts)
    try:
        parent = lexical.parent.resolve()
    except (OSError, RuntimeError) as e:  # a symlink loop
        raise PathOutsideRootError(
            f"path {_shown('/'.join(parts))} under {base} does not resolve: {e}"
        ) from e
    if lexical.name in ("", ".", "..") or not (parent == base or parent.is_relative_to(base)):
        raise _outside(base, parts, parent / lexical.name)
    target = parent / lexical.name
    if target.is_symlink() or target.is_file():
        target.unlink(missing_ok=True)
        return True
    if target.is_dir():
        shutil.rmtree(target)
        return True
    return False
