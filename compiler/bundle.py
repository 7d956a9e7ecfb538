"""Writing a bundle: a temporary folder beside the destination, renamed into place.

A failed write leaves nothing: the temporary folder is removed, and the destination
appears only once every file in it is complete and synced.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from edgec._atomic import fsync_path
from edgec.errors import OutputDirError
from edgec.manifest import MANIFEST_NAME, FileEntry, Manifest, file_entry
from edgec.names import check_name, check_version, resolve_inside

__all__ = ["GOLDEN_NAME", "REPORT_NAME", "bundle_dir_name", "write_bundle"]

logger = logging.getLogger(__name__)

GOLDEN_NAME = "golden.npz"
REPORT_NAME = "report.json"
_TMP_PREFIX = ".edgec-tmp-"


def bundle_dir_name(name: str, version: str, profile_id: str, suffix: str = "") -> str:
    """``NAME-VERSION-PROFILE[-SUFFIX]``: each part a checked name (``InvalidNameError``, exit 2,
    before anything is written), so the folder is one path component under ``--out``."""
    parts = [
        check_name(name, "bundle name (--name, or the model file's name)"),
        check_version(version, "bundle version (--version)"),
        check_name(profile_id, "profile id"),
    ]
    if suffix:
        parts.append(check_name(suffix, "bundle folder suffix"))
    return "-".join(parts)


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def _files_under(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def write_bundle(
    destination: Path,
    *,
    artifact_path: Path,
    model_file: str,
    golden: dict[str, np.ndarray],
    report: dict[str, object],
    make_manifest: Callable[[list[FileEntry]], Manifest],
    replace: bool = False,
) -> Path:
    """Assemble the bundle in a temp folder, then rename it to ``destination``.

    ``make_manifest`` receives the file entries (path, sha256, length) of everything but
    the manifest itself.
    """
    parent = destination.parent
    resolve_inside(parent, destination.name)  # one folder under --out: never '..', never a link out of it
    if destination.exists() and not replace:
        raise OutputDirError(
            f"bundle {destination} already exists; pass --force to replace it or set --version"
        )
    tmp = Path(tempfile.mkdtemp(prefix=_TMP_PREFIX, dir=parent))
    try:
        tmp.chmod(0o777 & ~_umask())  # mkdtemp makes it 0700; a bundle is an ordinary folder
        model_path = tmp / model_file
        if artifact_path.is_dir():
            shutil.copytree(artifact_path, model_path)
        else:
            shutil.copyfile(artifact_path, model_path)
        np.savez_compressed(tmp / GOLDEN_NAME, **golden)  # type: ignore[arg-type]  # numpy's stub
        (tmp / REPORT_NAME).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        entries = [file_entry(tmp, p) for p in _files_under(tmp)]
        manifest = make_manifest(entries)
        # written only when used: agents released before --freeze refuse fields they do not know
        unused = {"frozen_inputs"} if not manifest.frozen_inputs else set()
        if manifest.memory is None:
            unused.add("memory")
        text = manifest.model_dump_json(indent=2, exclude=unused or None)
        (tmp / MANIFEST_NAME).write_text(text + "\n", encoding="utf-8")
        for path in _files_under(tmp):
            fsync_path(path)
        if destination.exists():
            old = Path(tempfile.mkdtemp(prefix=_TMP_PREFIX, dir=parent))
            os.replace(destination, old / "old")
            os.rename(tmp, destination)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, destination)
        fsync_path(parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("wrote bundle %s", destination)
    return destination
