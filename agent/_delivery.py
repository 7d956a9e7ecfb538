"""The install pipeline's checks around the download (``agent.install``): the image repository
signs what the director names (``verify``), a release already on the device is not fetched
again (``already_installed``), and the staged files form the bundle named (``stage``).
"""

from __future__ import annotations

from typing import Any

from agent.director import RepositoryFile, check_against_repository
from agent.store import StateStore
from agent.trust import TrustedRepository
from edgec.director import DirectorDocument
from edgec.errors import BundleError, TrustError
from edgec.manifest import check_files, read_manifest, sha256_file
from edgec.names import check_relative_path

__all__ = ["already_installed", "bundle_path", "stage", "verify"]


def verify(repository: TrustedRepository, doc: DirectorDocument, max_target_bytes: int) -> dict[str, Any]:
    """The image repository must sign every file the director names, identically; the signed
    target of each (``TargetFile``), by path. ``TrustError`` otherwise."""
    repository.refresh()
    infos = {f.path: repository.target(f.path) for f in doc.files}
    signed = {
        path: RepositoryFile(
            sha256=info.hashes.get("sha256", ""),
            length=info.length,
            profile=str(info.unrecognized_fields.get("custom", {}).get("edgec", {}).get("profile", "")),
        )
        for path, info in infos.items()
    }
    check_against_repository(doc, signed)
    for path, info in infos.items():
        if info.length > max_target_bytes:
            raise TrustError(
                f"{path} is {info.length} bytes, over the limit of {max_target_bytes}", "targets"
            )
    return infos


def bundle_path(doc: DirectorDocument, path: str) -> str:
    """A director file's path inside its bundle (``NAME/VERSION/PROFILE/`` taken off), checked."""
    name, _, version = doc.release.partition(":")
    prefix = f"{name}/{version}/{doc.profile}/"
    if not path.startswith(prefix):
        raise TrustError(f"{path} is not a file of bundle {prefix}", "director")
    return check_relative_path(path.removeprefix(prefix), "bundle file path")


def already_installed(store: StateStore, doc: DirectorDocument) -> bool:
    """The release is under models/ with exactly the files the document names, intact (a
    rollback, or the install after a shadow run)."""
    folder = store.model_folder(doc.release)
    if not (folder / "manifest.json").is_file():
        return False
    try:
        manifest = read_manifest(folder)
    except BundleError:
        return False
    wanted = {bundle_path(doc, f.path): f.sha256 for f in doc.files}
    have = {f.path: f.sha256 for f in manifest.files}
    have["manifest.json"] = sha256_file(folder / "manifest.json")
    if set(wanted) != set(have) or any(have[path] != sha for path, sha in wanted.items()):
        return False
    return not any(check_files(folder, manifest).values())


def stage(store: StateStore, doc: DirectorDocument) -> str:
    """The staged files form the bundle the director named: checked, then moved into place;
    its folder under models/."""
    staging = store.staging_folder(doc.release)
    manifest = read_manifest(staging)
    if f"{manifest.name}:{manifest.version}" != doc.release or manifest.profile.id != doc.profile:
        raise BundleError(
            f"the staged bundle is {manifest.name}:{manifest.version} for {manifest.profile.id}, "
            f"not {doc.release} for {doc.profile}"
        )
    broken = {path: problem for path, problem in check_files(staging, manifest).items() if problem}
    if broken:
        raise BundleError(f"the staged bundle does not match its manifest: {broken}")
    return store.move_to_models(doc.release).name
