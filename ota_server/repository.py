"""The TUF image repository (python-tuf's Metadata API): keys, publishing, re-signing.

Layout under the repository folder::

    keys/<role>-<n>.pem        encrypted Ed25519 private keys (0600); root and targets keys
                               may be moved offline after ``init``
    metadata/<v>.root.json, <v>.targets.json, <v>.snapshot.json, timestamp.json
    targets/<name>/<version>/<profile>/<sha256>.<file>     (consistent snapshots)

Each bundle file is a target whose custom fields carry the release (name, version, profile,
format, precision) and per-chunk sha256 hashes, so a download can be checked and resumed
chunk by chunk.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from securesystemslib.signer import Signer, SSlibKey
from tuf.api.metadata import (
    Metadata,
    MetaFile,
    Root,
    Snapshot,
    TargetFile,
    Targets,
    Timestamp,
)
from tuf.api.serialization.json import JSONSerializer

from edgec.errors import BundleError, UserInputError
from edgec.manifest import check_files, read_manifest
from ota_server.keys import generate, load_signer

__all__ = [
    "CHUNK_BYTES",
    "EXPIRY",
    "ROLES",
    "ImageRepository",
    "Release",
    "RepositoryExistsError",
    "chunk_hashes",
]

logger = logging.getLogger(__name__)

ROLES = ("root", "targets", "snapshot", "timestamp")
EXPIRY = {
    "root": dt.timedelta(days=365),
    "targets": dt.timedelta(days=90),
    "snapshot": dt.timedelta(days=7),
    "timestamp": dt.timedelta(days=1),
}
CHUNK_BYTES = 256 * 1024
DIRECTOR_PUBLIC = "director.pub.json"
_SERIALIZER = JSONSerializer(compact=False)


class RepositoryExistsError(UserInputError):
    """``keys init`` on a folder that already holds a repository."""


@dataclass(frozen=True)
class Release:
    name: str
    version: str
    profile: str
    format: str
    precision: str
    files: int
    bytes: int


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(microsecond=0)


def chunk_hashes(path: Path, chunk: int = CHUNK_BYTES) -> list[str]:
    hashes = []
    with path.open("rb") as f:
        while block := f.read(chunk):
            hashes.append(hashlib.sha256(block).hexdigest())
    return hashes


class ImageRepository:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.metadata_dir = folder / "metadata"
        self.targets_dir = folder / "targets"
        self.keys_dir = folder / "keys"

    # -- metadata files -------------------------------------------------------------------
    def _path(self, role: str, version: int) -> Path:
        name = "timestamp.json" if role == "timestamp" else f"{version}.{role}.json"
        return self.metadata_dir / name

    def _write(self, md: Metadata) -> None:
        path = self._path(md.signed.type, md.signed.version)
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(md.to_bytes(_SERIALIZER))
        with tmp.open("rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def load(self, role: str) -> Metadata:
        if role == "timestamp":
            return Metadata.from_file(str(self.metadata_dir / "timestamp.json"))
        versions = sorted(int(p.name.split(".")[0]) for p in self.metadata_dir.glob(f"*.{role}.json"))
        if not versions:
            raise BundleError(
                f"{self.folder} is not an edgec repository (no {role} metadata); run edgec keys init"
            )
        return Metadata.from_file(str(self._path(role, versions[-1])))

    def _signers(self, role: str, passphrase: bytes) -> list[Signer]:
        files = sorted(self.keys_dir.glob(f"{role}-*.pem"))
        if not files:
            raise BundleError(f"no {role} keys in {self.keys_dir}")
        return [load_signer(f, passphrase) for f in files]

    def _sign_and_write(self, md: Metadata, role: str, passphrase: bytes) -> None:
        md.signatures.clear()
        for signer in self._signers(role, passphrase):
            md.sign(signer, append=True)
        self._write(md)

    # -- operations -----------------------------------------------------------------------
    @classmethod
    def init(
        cls, folder: Path, passphrase: bytes, thresholds: Mapping[str, int], now: dt.datetime | None = None
    ) -> ImageRepository:
        """New keys for every role (``thresholds[role]`` of them) and version-1 metadata."""
        repo = cls(folder)
        if repo.metadata_dir.exists() and any(repo.metadata_dir.iterdir()):
            raise RepositoryExistsError(f"{folder} already holds a repository; choose another --repo")
        now = now or _now()
        repo.metadata_dir.mkdir(parents=True, exist_ok=True)
        repo.targets_dir.mkdir(parents=True, exist_ok=True)
        root = Root(expires=now + EXPIRY["root"], consistent_snapshot=True)
        for role in ROLES:
            threshold = thresholds.get(role, 1)
            for n in range(1, threshold + 1):
                signer = generate(repo.keys_dir / f"{role}-{n}.pem", passphrase)
                root.add_key(signer.public_key, role)
            root.roles[role].threshold = threshold
        director = generate(repo.keys_dir / "director-1.pem", passphrase)
        public = json.dumps({"keyid": director.public_key.keyid, **director.public_key.to_dict()}, indent=2)
        (repo.keys_dir / DIRECTOR_PUBLIC).write_text(public + "\n", encoding="utf-8")
        repo._sign_and_write(Metadata(root), "root", passphrase)
        targets = Metadata(Targets(expires=now + EXPIRY["targets"]))
        repo._sign_and_write(targets, "targets", passphrase)
        repo._new_snapshot_and_timestamp(passphrase, now)
        logger.info("initialised repository %s", folder)
        return repo

    def _new_snapshot_and_timestamp(self, passphrase: bytes, now: dt.datetime) -> None:
        targets = self.load("targets")
        try:
            snapshot = self.load("snapshot")
            snapshot.signed.version += 1
        except BundleError:
            snapshot = Metadata(Snapshot(expires=now))
        snapshot.signed.meta["targets.json"] = MetaFile(version=targets.signed.version)
        snapshot.signed.expires = now + EXPIRY["snapshot"]
        self._sign_and_write(snapshot, "snapshot", passphrase)
        if (self.metadata_dir / "timestamp.json").exists():
            timestamp = self.load("timestamp")
            timestamp.signed.version += 1
        else:
            timestamp = Metadata(Timestamp(expires=now))
        timestamp.signed.snapshot_meta = MetaFile(version=snapshot.signed.version)
        timestamp.signed.expires = now + EXPIRY["timestamp"]
        self._sign_and_write(timestamp, "timestamp", passphrase)

    def publish(self, bundles: list[Path], passphrase: bytes, now: dt.datetime | None = None) -> list[str]:
        """Add every file of every bundle as a target, then sign targets, snapshot, timestamp."""
        now = now or _now()
        targets = self.load("targets")
        added = []
        for bundle in bundles:
            manifest = read_manifest(bundle)
            broken = {path: problem for path, problem in check_files(bundle, manifest).items() if problem}
            if broken:
                raise BundleError(f"bundle {bundle} is damaged ({broken}); rebuild it before publishing")
            prefix = f"{manifest.name}/{manifest.version}/{manifest.profile.id}"
            release = {
                "name": manifest.name,
                "version": manifest.version,
                "profile": manifest.profile.id,
                "format": manifest.format.value,
                "precision": manifest.precision.value,
            }
            for path in [*(bundle / f.path for f in manifest.files), bundle / "manifest.json"]:
                relative = path.relative_to(bundle).as_posix()
                target_path = f"{prefix}/{relative}"
                info = TargetFile.from_file(target_path, str(path), ["sha256"])
                info.unrecognized_fields["custom"] = {
                    "edgec": {**release, "chunk_bytes": CHUNK_BYTES, "chunks": chunk_hashes(path)}
                }
                stored = (
                    self.targets_dir / prefix / Path(relative).parent / f"{info.hashes['sha256']}.{path.name}"
                )
                stored.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, stored)
                targets.signed.targets[target_path] = info
                added.append(target_path)
        targets.signed.version += 1
        targets.signed.expires = now + EXPIRY["targets"]
        self._sign_and_write(targets, "targets", passphrase)
        self._new_snapshot_and_timestamp(passphrase, now)
        return added

    def rotate(self, role: str, passphrase: bytes, now: dt.datetime | None = None) -> int:
        """Replace every key of ``role`` with new ones; returns the new root version.

        The new root is signed by the old root keys and, when root itself rotates, by the new
        ones too, as TUF requires, so devices can follow the chain. The role's metadata is
        re-signed with its new keys; devices then drop what the old keys vouched for, which
        is also how a fast-forward attack with a stolen timestamp or snapshot key is undone.
        """
        if role not in ROLES:
            raise UserInputError(f"unknown role {role!r}; roles: {', '.join(ROLES)}")
        now = now or _now()
        old_root_signers = self._signers("root", passphrase)
        root = self.load("root")
        old_files = sorted(self.keys_dir.glob(f"{role}-*.pem"))
        for keyid in list(root.signed.roles[role].keyids):
            root.signed.revoke_key(keyid, role)
        retired = self.keys_dir / "retired" / f"{role}-v{root.signed.version}"
        retired.mkdir(parents=True, exist_ok=True)
        for path in old_files:
            os.replace(path, retired / path.name)
        new_signers: list[Signer] = [
            generate(self.keys_dir / f"{role}-{n}.pem", passphrase) for n in range(1, len(old_files) + 1)
        ]
        for signer in new_signers:
            root.signed.add_key(signer.public_key, role)
        root.signed.version += 1
        root.signed.expires = now + EXPIRY["root"]
        root.signatures.clear()
        for signer in old_root_signers + (new_signers if role == "root" else []):
            root.sign(signer, append=True)
        self._write(root)
        if role == "targets":
            targets = self.load("targets")
            targets.signed.version += 1
            targets.signed.expires = now + EXPIRY["targets"]
            self._sign_and_write(targets, "targets", passphrase)
        if role != "root":
            self._new_snapshot_and_timestamp(passphrase, now)
        logger.info("rotated %s keys; root is now version %d", role, root.signed.version)
        return root.signed.version

    def revoke(self, role: str, keyid: str, passphrase: bytes, now: dt.datetime | None = None) -> int:
        """Remove one key from a role (a lost or leaked key); returns the new root version.

        Refused if the role would be left with fewer keys than its threshold: rotate instead.
        """
        now = now or _now()
        root = self.load("root")
        if role not in ROLES or keyid not in root.signed.roles[role].keyids:
            raise UserInputError(f"{role} has no key {keyid[:12]}...; see keys/*.pem and root.json")
        remaining = len(root.signed.roles[role].keyids) - 1
        if remaining < root.signed.roles[role].threshold:
            raise UserInputError(
                f"revoking would leave {role} with {remaining} key(s) for a threshold of "
                f"{root.signed.roles[role].threshold}; use keys rotate {role}"
            )
        signers = self._signers("root", passphrase)
        root.signed.revoke_key(keyid, role)
        retired = self.keys_dir / "retired" / f"{role}-v{root.signed.version}"
        retired.mkdir(parents=True, exist_ok=True)
        for path in self.keys_dir.glob(f"{role}-*.pem"):
            if load_signer(path, passphrase).public_key.keyid == keyid:
                os.replace(path, retired / path.name)
        root.signed.version += 1
        root.signed.expires = now + EXPIRY["root"]
        root.signatures.clear()
        for signer in signers:  # the old root keys (the revoked one included) vouch for the change
            root.sign(signer, append=True)
        self._write(root)
        return root.signed.version

    def director_signer(self, passphrase: bytes) -> Signer:
        """The online key that signs director documents."""
        return self._signers("director", passphrase)[0]

    def provisioning(self) -> tuple[str, str]:
        """What a device is provisioned with: the current root.json and the director's public key."""
        root = self.load("root")
        root_text = self._path("root", root.signed.version).read_text(encoding="utf-8")
        return root_text, (self.keys_dir / DIRECTOR_PUBLIC).read_text(encoding="utf-8")

    def director_key(self) -> SSlibKey:
        """The director's public key, as devices are provisioned with it."""
        data = json.loads((self.keys_dir / DIRECTOR_PUBLIC).read_text(encoding="utf-8"))
        keyid = data.pop("keyid")
        return SSlibKey.from_dict(keyid, data)

    def refresh(self, passphrase: bytes, now: dt.datetime | None = None) -> None:
        """Re-sign snapshot and timestamp with fresh expiry dates (run before they expire)."""
        self._new_snapshot_and_timestamp(passphrase, now or _now())

    def releases(self) -> list[Release]:
        grouped: dict[tuple[str, ...], Release] = {}
        for info in self.load("targets").signed.targets.values():
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
