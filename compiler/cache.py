"""A content-addressed cache of compiled and verified artifacts.

One entry per trial: the key hashes everything the artifact and its figures depend on (the
prepared graph, the calibration and verification data, the format, precision and int8
configuration, the profile fields the backend reads, and the tool versions), so a repeated
build, or a second profile whose backend settings are the same, reuses the artifact and its
figures instead of converting and verifying again. Gates are applied afresh on every build.

Entries are written to a temporary folder and renamed into place; a corrupt or partial entry
is ignored (and rebuilt), never trusted. ``EDGEC_CACHE_DIR`` moves the cache;
``--no-cache`` bypasses it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from compiler.backends import Artifact
from edgec._atomic import atomic_write, fsync_path
from edgec.manifest import Metrics, Precision, TargetFormat, TensorSpec

__all__ = ["BuildCache", "CachedTrial", "default_cache_dir", "fingerprint"]

logger = logging.getLogger(__name__)
RECORD = "record.json"


def default_cache_dir() -> Path:
    if "EDGEC_CACHE_DIR" in os.environ:
        return Path(os.environ["EDGEC_CACHE_DIR"])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "edgec" / "builds"


def fingerprint(parts: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


class CachedTrial(BaseModel):
    """A trial's outcome, minus the gate verdict (which each build re-applies)."""

    model_config = ConfigDict(extra="forbid")

    artifact_name: str
    format: TargetFormat
    precision: Precision
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    source_inputs: list[TensorSpec]
    source_outputs: list[TensorSpec]
    tool_versions: dict[str, str]
    runtime_config: dict[str, str]
    notes: list[str]
    unverified_reason: str | None
    qdq_graph: str | None  # relative to the artifact
    size_bytes: int
    metrics: Metrics | None
    unverified: str | None
    layer_errors: list[dict[str, Any]] | None = None

    def artifact(self, folder: Path) -> Artifact:
        path = folder / self.artifact_name
        return Artifact(
            format=self.format,
            precision=self.precision,
            path=path,
            inputs=self.inputs,
            outputs=self.outputs,
            source_inputs=self.source_inputs,
            source_outputs=self.source_outputs,
            tool_versions=self.tool_versions,
            runtime_config=self.runtime_config,
            notes=list(self.notes),
            unverified_reason=self.unverified_reason,
            qdq_graph=None if self.qdq_graph is None else folder / self.qdq_graph,
        )

    @classmethod
    def of(
        cls, artifact: Artifact, size: int, metrics: Metrics | None, unverified: str | None
    ) -> CachedTrial:
        base = artifact.path.parent
        qdq = artifact.qdq_graph.relative_to(base).as_posix() if artifact.qdq_graph else None
        return cls(
            artifact_name=artifact.path.name,
            format=artifact.format,
            precision=artifact.precision,
            inputs=artifact.inputs,
            outputs=artifact.outputs,
            source_inputs=artifact.source_inputs,
            source_outputs=artifact.source_outputs,
            tool_versions=artifact.tool_versions,
            runtime_config=artifact.runtime_config,
            notes=artifact.notes,
            unverified_reason=artifact.unverified_reason,
            qdq_graph=qdq,
            size_bytes=size,
            metrics=metrics,
            unverified=unverified,
        )


class BuildCache:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.hits = 0

    def get(self, key: str, workdir: Path) -> tuple[CachedTrial, Artifact] | None:
        entry = self.root / key
        try:
            record = CachedTrial.model_validate_json((entry / RECORD).read_text(encoding="utf-8"))
        except (OSError, ValidationError, ValueError):
            return None
        source = entry / record.artifact_name
        if not source.exists():
            return None
        target = workdir / record.artifact_name
        if source.is_dir():
            shutil.copytree(source, target)
        else:
            shutil.copyfile(source, target)
        self.hits += 1
        logger.info("cache hit %s", key[:12])
        return record, record.artifact(workdir)

    def put(self, key: str, record: CachedTrial, artifact: Artifact) -> None:
        entry = self.root / key
        tmp: Path | None = None
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=self.root))
            if artifact.path.is_dir():
                shutil.copytree(artifact.path, tmp / artifact.path.name)
            else:
                shutil.copyfile(artifact.path, tmp / artifact.path.name)
            (tmp / RECORD).write_text(record.model_dump_json(), encoding="utf-8")
            for path in [*tmp.rglob("*"), tmp]:  # durable before the entry exists: none left torn
                if not path.is_symlink():
                    fsync_path(path)
            if entry.exists():
                shutil.rmtree(entry, ignore_errors=True)
            os.replace(tmp, entry)
            fsync_path(self.root)
        except OSError as e:  # a cache that cannot be written is only slower
            logger.warning("build cache not written (%s): %s", self.root, e)
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)

    def update_layers(self, key: str, layers: list[dict[str, Any]]) -> None:
        path = self.root / key / RECORD
        try:
            record = CachedTrial.model_validate_json(path.read_text(encoding="utf-8"))
            record.layer_errors = layers
            atomic_write(path, record.model_dump_json().encode())
        except (OSError, ValidationError, ValueError) as e:
            logger.debug("layer errors not cached: %s", e)
