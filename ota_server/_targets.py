"""How the image repository describes a bundle's files as TUF targets, and reads releases back.

Each bundle file is a target at ``<name>/<version>/<profile>/<path>`` whose custom fields
carry the release (name, version, profile, format, precision) and per-chunk sha256 hashes
(``chunk_hashes``, ``CHUNK_BYTES`` each), so a device can check and resume a download chunk
by chunk, and a content-defined chunk table (``cdc``: ``edgec.chunking``), so a device can
build a new release from the chunks of the one it holds. ``bundle_targets`` describes a
checked bundle's files; ``releases`` groups the signed targets back into ``Release`` rows.
No signing and no writing here: that is ``ota_server.repository``.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from tuf.api.metadata import TargetFile

from edgec.chunking import CdcTable, params_for_size
from edgec.manifest import Manifest

__all__ = [
    "CHUNK_BYTES",
    "BundleTarget",
    "Release",
    "bundle_targets",
    "cdc_table",
    "chunk_hashes",
    "releases",
]

logger = logging.getLogger(__name__)

CHUNK_BYTES = 256 * 1024


@dataclass(frozen=True)
class Release:
    name: str
    version: str
    profile: str
    format: str
    precision: str
    files: int
    bytes: int


@dataclass(frozen=True)
class BundleTarget:
    """One bundle file as a target: where it comes from, its signed description, and where
    the repository stores it (relative to its targets folder, consistent-snapshot named)."""

    source: Path
    path: str
    info: TargetFile
    stored: Path


def chunk_hashes(path: Path, chunk: int = CHUNK_BYTES) -> list[str]:
    hashes = []
    with path.open("rb") as f:
        while block := f.read(chunk):
            hashes.append(hashlib.sha256(block).hexdigest())
    return hashes


def cdc_table(path: Path) -> CdcTable:
    """``path`` cut by content (FastCDC, the parameters for its size): see ``edgec.chunking``."""
    from pyfastcdc import FastCDC  # the server's: agents only read the tables

    size = path.stat().st_size
    params = params_for_size(size)
    if size == 0:
        return CdcTable(params, ())
    cutter = FastCDC(params.avg, min_size=params.min, max_size=params.max)
    chunks = tuple((c.length, hashlib.sha256(c.data).hexdigest()) for c in cutter.cut_file(path))
    return CdcTable(params, chunks)


def bundle_targets(bundle: Path, manifest: Manifest) -> Iterator[BundleTarget]:
    """The targets of every file of ``bundle`` (already checked against ``manifest``), the
    manifest last."""
    prefix = f"{manifest.name}/{manifest.version}/{manifest.profile.id}"
    release: dict[str, str | int] = {
        "name": manifest.name,
        "version": manifest.version,
        "profile": manifest.profile.id,
        "format": manifest.format.value,
        "precision": manifest.precision.value,
    }
    if manifest.memory is not None:  # signed, so an agent knows before downloading whether it fits
        release["peak_memory_bytes"] = manifest.memory.peak_bytes
    for path in [*(bundle / f.path for f in manifest.files), bundle / "manifest.json"]:
        relative = path.relative_to(bundle).as_posix()
        target_path = f"{prefix}/{relative}"
        info = TargetFile.from_file(target_path, str(path), ["sha256"])
        info.unrecognized_fields["custom"] = {
            "edgec": {
                **release,
                "chunk_bytes": CHUNK_BYTES,
                "chunks": chunk_hashes(path),
                "cdc": cdc_table(path).to_custom(),  # agents that know it download only what changed
            }
        }
        stored = Path(prefix) / Path(relative).parent / f"{info.hashes['sha256']}.{path.name}"
        yield BundleTarget(path, target_path, info, stored)


def releases(targets: Iterable[TargetFile]) -> list[Release]:
    """The releases that signed targets describe, one row per (name, version, profile)."""
    grouped: dict[tuple[str, ...], Release] = {}
    for info in targets:
        custom = info.unrecognized_fields.get("custom", {}).get("edgec")
        if not custom:
            continue
        key = (custom["name"], custom["version"], custom["profile"])
        old = grouped.get(key)
        grouped[key] = Release(
            custom["name"],
            custom["version"],
            custom["profile"],
            custom["format"],
            custom["precision"],
            (old.files if old else 0) + 1,
            (old.bytes if old else 0) + info.length,
        )
    return sorted(grouped.values(), key=lambda r: (r.name, r.version, r.profile))
