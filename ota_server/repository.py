"""The TUF image repository (python-tuf's Metadata API): keys, publishing, re-signing.

Three folders, kept apart as TUF intends::

    REPO/        the served folder; nothing secret (``ota_server.served`` is what is served)
      metadata/<v>.root.json, <v>.targets.json, <v>.snapshot.json, timestamp.json
      targets/<name>/<version>/<profile>/<sha256>.<file>     (consistent snapshots)
      director.pub.json          the director's public key, for provisioning (not served)
    KEYS/        offline, the operator's (``--keys``, default ~/.config/edgec/keys)
      root-<n>.key, targets-<n>.key, retired/
    ONLINE/      the server's (``--online-keys``, ``online_keys``; default REPO-online-keys)
      snapshot-<n>.key, timestamp-<n>.key, director-1.key, retired/

A server holding REPO and ONLINE can re-sign snapshot and timestamp and sign director
documents, but not targets: a device installs only what the offline targets key signed.

Each bundle file is a target whose custom fields carry the release (name, version, profile,
format, precision) and per-chunk sha256 hashes, so a download can be checked and resumed
chunk by chunk (``ota_server._targets`` describes them; ``Release``, ``chunk_hashes`` and
``CHUNK_BYTES`` are re-exported here).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import shutil
from collections.abc import Mapping
from pathlib import Path

from securesystemslib.signer import Signer, SSlibKey
from tuf.api.metadata import (
    Metadata,
    MetaFile,
    Root,
    Snapshot,
    Targets,
    Timestamp,
)
from tuf.api.serialization.json import JSONSerializer

from edgec._atomic import atomic_write
from edgec.errors import BundleError, ConflictError, UserInputError
from edgec.manifest import check_files, read_manifest
from ota_server._targets import CHUNK_BYTES, Release, bundle_targets, chunk_hashes, releases
from ota_server.keys import KEY_SUFFIX, generate, load_private, load_signer, read_public, write_sealed

__all__ = [
    "CHUNK_BYTES",
    "DIRECTOR_PUBLIC",
    "EXPIRY",
    "OFFLINE_ROLES",
    "ONLINE_ROLES",
    "ROLES",
    "ImageRepository",
    "KeyFolderError",
    "OldLayoutError",
    "Release",
    "RepositoryExistsError",
    "chunk_hashes",
    "default_online_folder",
]

logger = logging.getLogger(__name__)

ROLES = ("root", "targets", "snapshot", "timestamp")
OFFLINE_ROLES = ("root", "targets")  # the operator's; never where the server reads
ONLINE_ROLES = ("snapshot", "timestamp", "director")  # the server's
EXPIRY = {
    "root": dt.timedelta(days=365),
    "targets": dt.timedelta(days=90),
    "snapshot": dt.timedelta(days=7),
    "timestamp": dt.timedelta(days=1),
}
DIRECTOR_PUBLIC = "director.pub.json"
_SERIALIZER = JSONSerializer(compact=False)


class RepositoryExistsError(ConflictError):
    """``keys init`` on a folder that already holds a repository."""


class KeyFolderError(UserInputError):
    """A key folder is missing the keys an operation needs, already holds another
    repository's keys, or sits where the server reads or serves."""


class OldLayoutError(UserInputError):
    """Private keys inside the served folder (REPO/keys, the layout before offline keys)."""


def default_online_folder(repo: Path) -> Path:
    """The server's online keys unless told otherwise: a sibling of the repository folder."""
    resolved = repo.resolve()
    return resolved.parent / f"{resolved.name}-online-keys"


def _inside(path: Path, folder: Path) -> bool:
    return path.resolve().is_relative_to(folder.resolve())


def _holds_keys(folder: Path) -> bool:
    return folder.is_dir() and any(p.suffix in (KEY_SUFFIX, ".pem") for p in folder.iterdir() if p.is_file())


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(microsecond=0)


class ImageRepository:
    """The repository in ``folder``; ``keys`` is the operator's offline key folder (needed only
    to sign root or targets), ``online_keys`` the server's (default ``default_online_folder``)."""

    def __init__(self, folder: Path, *, keys: Path | None = None, online_keys: Path | None = None) -> None:
        self.folder = folder
        self.metadata_dir = folder / "metadata"
        self.targets_dir = folder / "targets"
        self.offline_keys = keys
        self.online_keys = online_keys if online_keys is not None else default_online_folder(folder)

    # -- metadata files -------------------------------------------------------------------
    def _path(self, role: str, version: int) -> Path:
        name = "timestamp.json" if role == "timestamp" else f"{version}.{role}.json"
        return self.metadata_dir / name

    def _write(self, md: Metadata) -> None:
        atomic_write(self._path(md.signed.type, md.signed.version), md.to_bytes(_SERIALIZER), mode=0o644)

    def load(self, role: str) -> Metadata:
        if role == "timestamp":
            return Metadata.from_file(str(self.metadata_dir / "timestamp.json"))
        versions = sorted(int(p.name.split(".")[0]) for p in self.metadata_dir.glob(f"*.{role}.json"))
        if not versions:
            raise BundleError(
                f"{self.folder} is not an edgec repository (no {role} metadata); run edgec keys init"
            )
        return Metadata.from_file(str(self._path(role, versions[-1])))

    # -- keys -----------------------------------------------------------------------------
    def _key_folder(self, role: str) -> Path:
        if role in ONLINE_ROLES:
            return self.online_keys
        if self.offline_keys is None:
            raise KeyFolderError(
                f"signing {role} metadata needs the offline {role} key(s): pass --keys DIR, "
                "the operator's key folder that keys init wrote"
            )
        return self.offline_keys

    def _key_files(self, role: str) -> list[Path]:
        return sorted(self._key_folder(role).glob(f"{role}-*{KEY_SUFFIX}"))

    def _signers(self, role: str, passphrase: bytes) -> list[Signer]:
        self._refuse_old_layout()
        files = self._key_files(role)
        if not files:
            flag = "--online-keys (online_keys in server.toml)" if role in ONLINE_ROLES else "--keys"
            raise KeyFolderError(f"no {role} keys in {self._key_folder(role)}; pass the right {flag}")
        return [load_signer(f, passphrase) for f in files]

    def _sign_and_write(self, md: Metadata, signers: list[Signer]) -> None:
        md.signatures.clear()
        for signer in signers:
            md.sign(signer, append=True)
        self._write(md)

    def _refuse_old_layout(self) -> None:
        old = self.folder / "keys"
        if old.is_dir() and any(old.rglob("*.pem")):
            raise OldLayoutError(
                f"{old} holds private keys inside the served folder (the old layout): run "
                f"edgec keys migrate --repo {self.folder} --keys DIR to move root and targets keys "
                f"offline and the online keys to {self.online_keys}"
            )

    def _check_placement(self) -> None:
        """No key folder inside the served folder (or around it), offline apart from online."""
        folders = {"online": self.online_keys}
        if self.offline_keys is not None:
            folders["offline"] = self.offline_keys
        for kind, folder in folders.items():
            if _inside(folder, self.folder) or _inside(self.folder, folder):
                raise KeyFolderError(
                    f"the {kind} key folder {folder} and the repository {self.folder} overlap; "
                    "keep keys outside the folder the server serves"
                )
        if self.offline_keys is not None and (
            _inside(self.offline_keys, self.online_keys) or _inside(self.online_keys, self.offline_keys)
        ):
            raise KeyFolderError(
                f"the offline keys ({self.offline_keys}) and the online keys ({self.online_keys}) "
                "must be separate folders: only the online ones go to the server"
            )

    def check_server_side(self) -> None:
        """What the server checks at start: no private key in the served folder, and no
        offline key among its online ones."""
        self._refuse_old_layout()
        self._check_placement()
        offline = [p.name for role in OFFLINE_ROLES for p in self.online_keys.glob(f"{role}-*")]
        if offline:
            raise KeyFolderError(
                f"{self.online_keys} holds offline keys ({', '.join(sorted(offline))}); the server "
                "holds only snapshot, timestamp and director keys: move them to the operator's --keys folder"
            )

    # -- operations -----------------------------------------------------------------------
    @classmethod
    def init(
        cls,
        folder: Path,
        passphrase: bytes,
        thresholds: Mapping[str, int],
        now: dt.datetime | None = None,
        *,
        keys: Path,
        online_keys: Path | None = None,
        online_passphrase: bytes | None = None,
    ) -> ImageRepository:
        """New keys for every role (``thresholds[role]`` of them) and version-1 metadata: root
        and targets keys in ``keys`` under ``passphrase``, snapshot, timestamp and director
        keys in ``online_keys`` under ``online_passphrase`` (default: the same passphrase)."""
        repo = cls(folder, keys=keys, online_keys=online_keys)
        if repo.metadata_dir.exists() and any(repo.metadata_dir.iterdir()):
            raise RepositoryExistsError(f"{folder} already holds a repository; choose another --repo")
        repo._check_placement()
        for kind, path in (("offline", keys), ("online", repo.online_keys)):
            if _holds_keys(path):
                flag = "--keys" if kind == "offline" else "--online-keys"
                raise KeyFolderError(
                    f"{path} already holds keys (of another repository?); pass a new {flag} DIR"
                )
        online_passphrase = online_passphrase or passphrase
        now = now or _now()
        repo.metadata_dir.mkdir(parents=True, exist_ok=True)
        repo.targets_dir.mkdir(parents=True, exist_ok=True)
        root = Root(expires=now + EXPIRY["root"], consistent_snapshot=True)
        signers: dict[str, list[Signer]] = {}
        for role in ROLES:
            threshold = thresholds.get(role, 1)
            secret = passphrase if role in OFFLINE_ROLES else online_passphrase
            signers[role] = [
                generate(repo._key_folder(role) / f"{role}-{n}{KEY_SUFFIX}", secret)
                for n in range(1, threshold + 1)
            ]
            for signer in signers[role]:
                root.add_key(signer.public_key, role)
            root.roles[role].threshold = threshold
        director = generate(repo.online_keys / f"director-1{KEY_SUFFIX}", online_passphrase)
        public = json.dumps({"keyid": director.public_key.keyid, **director.public_key.to_dict()}, indent=2)
        atomic_write(repo.folder / DIRECTOR_PUBLIC, (public + "\n").encode(), mode=0o644)
        repo._sign_and_write(Metadata(root), signers["root"])
        repo._sign_and_write(Metadata(Targets(expires=now + EXPIRY["targets"])), signers["targets"])
        repo._new_snapshot_and_timestamp(signers["snapshot"], signers["timestamp"], now)
        logger.info("initialised %s (offline keys %s, online keys %s)", folder, keys, repo.online_keys)
        return repo

    def _new_snapshot_and_timestamp(
        self, snapshot_signers: list[Signer], timestamp_signers: list[Signer], now: dt.datetime
    ) -> None:
        targets = self.load("targets")
        try:
            snapshot = self.load("snapshot")
            snapshot.signed.version += 1
        except BundleError:
            snapshot = Metadata(Snapshot(expires=now))
        snapshot.signed.meta["targets.json"] = MetaFile(version=targets.signed.version)
        snapshot.signed.expires = now + EXPIRY["snapshot"]
        self._sign_and_write(snapshot, snapshot_signers)
        if (self.metadata_dir / "timestamp.json").exists():
            timestamp = self.load("timestamp")
            timestamp.signed.version += 1
        else:
            timestamp = Metadata(Timestamp(expires=now))
        timestamp.signed.snapshot_meta = MetaFile(version=snapshot.signed.version)
        timestamp.signed.expires = now + EXPIRY["timestamp"]
        self._sign_and_write(timestamp, timestamp_signers)

    def publish(
        self,
        bundles: list[Path],
        passphrase: bytes,
        now: dt.datetime | None = None,
        *,
        online_passphrase: bytes | None = None,
    ) -> list[str]:
        """Add every file of every bundle as a target, sign targets with the offline targets
        key(s) (``passphrase``), then snapshot and timestamp with the online ones."""
        now = now or _now()
        online_passphrase = online_passphrase or passphrase
        # every key opens before anything changes: a missing key or a wrong passphrase leaves
        # the repository as it was
        targets_signers = self._signers("targets", passphrase)
        snapshot_signers = self._signers("snapshot", online_passphrase)
        timestamp_signers = self._signers("timestamp", online_passphrase)
        targets = self.load("targets")
        # every bundle is checked before any file is copied: a bad one leaves the repository as it was
        manifests = []
        for bundle in bundles:
            manifest = read_manifest(bundle)
            broken = {path: problem for path, problem in check_files(bundle, manifest).items() if problem}
            if broken:
                raise BundleError(f"bundle {bundle} is damaged ({broken}); rebuild it before publishing")
            manifests.append(manifest)
        added = []
        for bundle, manifest in zip(bundles, manifests, strict=True):
            for target in bundle_targets(bundle, manifest):
                stored = self.targets_dir / target.stored
                stored.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(target.source, stored)
                targets.signed.targets[target.path] = target.info
                added.append(target.path)
        targets.signed.version += 1
        targets.signed.expires = now + EXPIRY["targets"]
        self._sign_and_write(targets, targets_signers)
        self._new_snapshot_and_timestamp(snapshot_signers, timestamp_signers, now)
        return added

    def _retire(self, role: str, files: list[Path], root_version: int) -> None:
        retired = self._key_folder(role) / "retired" / f"{role}-v{root_version}"
        retired.mkdir(mode=0o700, parents=True, exist_ok=True)
        for path in files:
            os.replace(path, retired / path.name)

    def rotate(
        self,
        role: str,
        passphrase: bytes,
        now: dt.datetime | None = None,
        *,
        online_passphrase: bytes | None = None,
    ) -> int:
        """Replace every key of ``role`` with new ones; returns the new root version.

        The new root is signed by the old root keys (offline, ``passphrase``) and, when root
        itself rotates, by the new ones too, as TUF requires, so devices can follow the chain.
        The role's metadata is re-signed with its new keys; devices then drop what the old
        keys vouched for, which is also how a fast-forward attack with a stolen timestamp or
        snapshot key is undone. New online keys are sealed under ``online_passphrase``.
        """
        if role not in ROLES:
            raise UserInputError(f"unknown role {role!r}; roles: {', '.join(ROLES)}")
        now = now or _now()
        online_passphrase = online_passphrase or passphrase
        secret = passphrase if role in OFFLINE_ROLES else online_passphrase
        old_root_signers = self._signers("root", passphrase)
        online: dict[str, list[Signer]] = {}
        if role != "root":  # snapshot and timestamp are signed again after the change
            online = {r: self._signers(r, online_passphrase) for r in ("snapshot", "timestamp") if r != role}
        root = self.load("root")
        old_files = self._key_files(role)
        for keyid in list(root.signed.roles[role].keyids):
            root.signed.revoke_key(keyid, role)
        self._retire(role, old_files, root.signed.version)
        new_signers: list[Signer] = [
            generate(self._key_folder(role) / f"{role}-{n}{KEY_SUFFIX}", secret)
            for n in range(1, len(old_files) + 1)
        ]
        for signer in new_signers:
            root.signed.add_key(signer.public_key, role)
        root.signed.version += 1
        root.signed.expires = now + EXPIRY["root"]
        self._sign_and_write(root, old_root_signers + (new_signers if role == "root" else []))
        if role == "targets":
            targets = self.load("targets")
            targets.signed.version += 1
            targets.signed.expires = now + EXPIRY["targets"]
            self._sign_and_write(targets, new_signers)
        if role != "root":
            online.setdefault(role, new_signers)  # a rotated snapshot or timestamp key signs its own
            self._new_snapshot_and_timestamp(online["snapshot"], online["timestamp"], now)
        logger.info("rotated %s keys; root is now version %d", role, root.signed.version)
        return root.signed.version

    def revoke(self, role: str, keyid: str, passphrase: bytes, now: dt.datetime | None = None) -> int:
        """Remove one key from a role (a lost or leaked key); returns the new root version.

        Signed with the offline root keys (``passphrase``). Refused if the role would be left
        with fewer keys than its threshold: rotate instead.
        """
        now = now or _now()
        signers = self._signers("root", passphrase)
        root = self.load("root")
        if role not in ROLES or keyid not in root.signed.roles[role].keyids:
            raise UserInputError(f"{role} has no key {keyid[:12]}...; see the role's keys in root.json")
        remaining = len(root.signed.roles[role].keyids) - 1
        if remaining < root.signed.roles[role].threshold:
            raise UserInputError(
                f"revoking would leave {role} with {remaining} key(s) for a threshold of "
                f"{root.signed.roles[role].threshold}; use keys rotate {role}"
            )
        root.signed.revoke_key(keyid, role)
        revoked = [path for path in self._key_files(role) if read_public(path).keyid == keyid]
        self._retire(role, revoked, root.signed.version)
        root.signed.version += 1
        root.signed.expires = now + EXPIRY["root"]
        # the old root keys (the revoked one included) vouch for the change
        self._sign_and_write(root, signers)
        return root.signed.version

    def migrate(self, passphrase: bytes, online_passphrase: bytes | None = None) -> list[tuple[Path, Path]]:
        """Move the keys of the old layout (REPO/keys/*.pem, PKCS#8, one passphrase) out of the
        served folder: root and targets keys to the offline folder, the others to the online
        one, each sealed anew (online ones under ``online_passphrase``, default the same).
        Every old key is opened before anything is written. Returns ``(old, new)`` paths."""
        old = self.folder / "keys"
        pems = sorted(old.rglob("*.pem")) if old.is_dir() else []
        if not pems:
            raise UserInputError(f"{old} holds no old-layout keys: nothing to migrate")
        if self.offline_keys is None:
            raise KeyFolderError("migrating needs the offline key folder: pass --keys DIR")
        self._check_placement()
        for kind, folder in (("--keys", self.offline_keys), ("--online-keys", self.online_keys)):
            if _holds_keys(folder):
                raise KeyFolderError(f"{folder} already holds keys; pass a new {kind} DIR")
        online_passphrase = online_passphrase or passphrase
        opened = [(pem, load_private(pem, passphrase)) for pem in pems]
        moved = []
        for pem, private in opened:
            role = pem.name.split("-")[0]
            folder = self.online_keys if role in ONLINE_ROLES else self.offline_keys
            dest = folder / pem.relative_to(old).with_suffix(KEY_SUFFIX)
            secret = online_passphrase if role in ONLINE_ROLES else passphrase
            write_sealed(dest, private, secret)
            moved.append((pem, dest))
        if (old / DIRECTOR_PUBLIC).is_file():
            os.replace(old / DIRECTOR_PUBLIC, self.folder / DIRECTOR_PUBLIC)
        for pem, _ in moved:
            pem.unlink()
        for folder in [*sorted((p for p in old.rglob("*") if p.is_dir()), reverse=True), old]:
            if not any(folder.iterdir()):
                folder.rmdir()
        logger.info("moved %d keys out of %s", len(moved), old)
        return moved

    def director_signer(self, passphrase: bytes) -> Signer:
        """The online key that signs director documents."""
        return self._signers("director", passphrase)[0]

    def _director_public(self) -> str:
        try:
            return (self.folder / DIRECTOR_PUBLIC).read_text(encoding="utf-8")
        except OSError as e:
            raise BundleError(
                f"{self.folder / DIRECTOR_PUBLIC} is missing ({e.strerror}); is {self.folder} an "
                "edgec repository (edgec keys init, or edgec keys migrate for the old layout)?"
            ) from e

    def provisioning(self) -> tuple[str, str]:
        """What a device is provisioned with: the current root.json and the director's public key."""
        root = self.load("root")
        root_text = self._path("root", root.signed.version).read_text(encoding="utf-8")
        return root_text, self._director_public()

    def director_key(self) -> SSlibKey:
        """The director's public key, as devices are provisioned with it."""
        data = json.loads(self._director_public())
        keyid = data.pop("keyid")
        return SSlibKey.from_dict(keyid, data)

    def refresh(self, passphrase: bytes, now: dt.datetime | None = None) -> None:
        """Re-sign snapshot and timestamp with fresh expiry dates (run before they expire);
        needs only the online keys (``passphrase`` is theirs)."""
        snapshot, timestamp = self._signers("snapshot", passphrase), self._signers("timestamp", passphrase)
        self._new_snapshot_and_timestamp(snapshot, timestamp, now or _now())

    def releases(self) -> list[Release]:
        return releases(self.load("targets").signed.targets.values())
