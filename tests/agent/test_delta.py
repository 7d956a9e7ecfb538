"""Delta downloads: a release assembled from the chunks of the installed one plus the chunks
downloaded, every one checked against the new signed table; refused when a reused chunk on
disk is not what its hash says. Real repositories, real files, the real install pipeline."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from agent.delta import DeltaDownload, InstalledChunks, download_for
from agent.mqtt_fetch import ResumableDownload
from agent.slot import ModelSlot
from agent.store import ActivePointer, StateStore
from edgec.errors import FetchError
from edgec.manifest import sha256_file
from ota_server._targets import CHUNK_BYTES, cdc_table, chunk_hashes
from tests.agent.test_install import PROFILE, FolderChunks, Recorder, _installer, world  # noqa: F401


class CountingChunks(FolderChunks):
    """The repository folder's chunks, counting what was asked for; ``fail_after`` requests
    the link drops."""

    def __init__(self, folder: Path, fail_after: int | None = None) -> None:
        super().__init__(folder)
        self.served = 0
        self.requests = 0
        self.fail_after = fail_after

    def chunk(self, path: str, offset: int, length: int | None = None) -> tuple[int, bytes]:
        if self.fail_after is not None and self.requests >= self.fail_after:
            raise FetchError(f"the link dropped while fetching {path}")
        self.requests += 1
        total, data = super().chunk(path, offset, length)
        self.served += len(data)
        return total, data


def _fetched(reporter: Recorder, release: str) -> list[dict]:
    return [e for e in reporter.events if e["event"] == "fetched" and e["release"] == release]


def _custom(world, release: str, name: str) -> dict:  # noqa: F811
    version = release.split(":")[1]
    targets = world["repo"].load("targets").signed.targets
    return targets[f"digits/{version}/{PROFILE}/{name}"].unrecognized_fields["custom"]["edgec"]


def test_a_release_is_assembled_from_installed_chunks_and_only_the_rest_downloaded(world):  # noqa: F811
    slot = ModelSlot()
    _installer(world, slot).handle(world["document"]("digits:1.0.0"))
    reporter = Recorder()
    installer = _installer(world, slot, reporter)
    installer.chunks = chunks = CountingChunks(world["repo"].folder)
    installer.handle(world["document"]("digits:2.0.0"))  # the same network, its logits doubled
    assert reporter.kinds()[-1] == "committed"
    fetched = _fetched(reporter, "digits:2.0.0")
    model = next(e for e in fetched if e["detail"] == "model.onnx")
    assert model["reused_bytes"] > 0.8 * model["bytes"]
    assert model["fetched_bytes"] + model["reused_bytes"] == model["bytes"]
    assert chunks.served == sum(e["fetched_bytes"] for e in fetched)
    folder = StateStore(world["state"]).model_folder("digits:2.0.0")
    signed = world["repo"].load("targets").signed.targets[f"digits/2.0.0/{PROFILE}/model.onnx"]
    assert sha256_file(folder / "model.onnx") == signed.hashes["sha256"]
    tables = json.loads((world["state"] / "chunks" / "digits-2.0.0.json").read_text())
    assert tables["model.onnx"] == _custom(world, "digits:2.0.0", "model.onnx")["cdc"]


def test_delta_install_refused_when_a_reused_chunk_is_tampered(world):  # noqa: F811
    slot = ModelSlot()
    _installer(world, slot).handle(world["document"]("digits:1.0.0"))
    installed = StateStore(world["state"]).model_folder("digits:1.0.0") / "model.onnx"
    old = {digest: offset for offset, _, digest in cdc_table(installed).offsets()}
    wanted = [entry.split(":")[1] for entry in _custom(world, "digits:2.0.0", "model.onnx")["cdc"]["chunks"]]
    index, digest = next((i, d) for i, d in enumerate(wanted) if d in old and i > 2)
    data = bytearray(installed.read_bytes())
    data[old[digest] + 5] ^= 0xFF  # one byte of a chunk 2.0.0 reuses, flipped on disk
    installed.write_bytes(bytes(data))
    reporter = Recorder()
    _installer(world, slot, reporter).handle(world["document"]("digits:2.0.0"))
    (refused,) = [e for e in reporter.events if e["event"] == "refused"]
    assert refused["step"] == "fetch"
    assert f"chunk {index} reused from {installed}" in refused["detail"]
    assert "tampered" in refused["detail"]
    assert "\n" not in refused["detail"]
    assert slot.model is not None
    assert slot.model.manifest.version == "1.0.0"  # the serving model is untouched
    assert not StateStore(world["state"]).model_folder("digits:2.0.0").exists()


def _installed(tmp_path: Path, data: bytes) -> tuple[StateStore, Path]:
    """A state folder whose active release x:1.0.0 holds ``data`` as model.bin, its table kept."""
    store = StateStore(tmp_path / "state")
    folder = store.models / "x-1.0.0"
    folder.mkdir()
    (folder / "model.bin").write_bytes(data)
    store.set_active(ActivePointer("x:1.0.0", "x-1.0.0"))
    InstalledChunks(store).record("x:1.0.0", {"model.bin": cdc_table(folder / "model.bin").to_custom()})
    return store, folder / "model.bin"


def _published(tmp_path: Path, data: bytes) -> tuple[Path, dict, str]:
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "new.bin").write_bytes(data)
    custom = {
        "chunk_bytes": CHUNK_BYTES,
        "chunks": chunk_hashes(repo / "new.bin"),
        "cdc": cdc_table(repo / "new.bin").to_custom(),
    }
    return repo, custom, sha256_file(repo / "new.bin")


def test_a_delta_download_cut_off_resumes_after_its_last_good_chunk(tmp_path):
    rng = random.Random(4)
    old = rng.randbytes(900_000)
    new = old[:300_000] + rng.randbytes(40_000) + old[300_000:] + rng.randbytes(60_000)
    store, _ = _installed(tmp_path, old)
    repo, custom, digest = _published(tmp_path, new)
    dest = tmp_path / "staging" / "new.bin"
    dest.parent.mkdir()

    def download(chunks: CountingChunks) -> ResumableDownload:
        return download_for(
            chunks,
            "new.bin",
            dest,
            custom=custom,
            length=len(new),
            sha256=digest,
            installed=InstalledChunks(store),
        )

    first = download(CountingChunks(repo, fail_after=1))
    assert isinstance(first, DeltaDownload)
    with pytest.raises(FetchError):
        first.run()
    kept = first.good_bytes()
    assert 300_000 - 20_000 < kept < len(new)  # the reused chunks before the edit and one request
    second = download(CountingChunks(repo))
    assert second.run().read_bytes() == new
    assert second.good_bytes() == 0  # the .partial became the file
    assert kept + second.fetched_bytes + second.reused_bytes == len(new)
    total_fetched = first.fetched_bytes + second.fetched_bytes
    assert total_fetched < 40_000 + 60_000 + 4 * 16 * 1024  # the new bytes and the chunks around them


def test_a_target_without_a_chunk_table_downloads_whole_as_before(tmp_path):
    data = random.Random(5).randbytes(700_000)
    store, _ = _installed(tmp_path, data)  # every chunk is on disk already
    repo, custom, digest = _published(tmp_path, data)
    del custom["cdc"]  # a server before chunk tables
    chunks = CountingChunks(repo)
    dest = tmp_path / "new.bin"
    download = download_for(
        chunks,
        "new.bin",
        dest,
        custom=custom,
        length=len(data),
        sha256=digest,
        installed=InstalledChunks(store),
    )
    assert type(download) is ResumableDownload
    assert download.run().read_bytes() == data
    assert download.fetched_bytes == chunks.served == len(data)
    assert download.reused_bytes == 0
    assert chunks.requests == -(-len(data) // CHUNK_BYTES)


class OldServer(CountingChunks):
    """A server before the ``length`` field: it answers a whole chunk of its own size."""

    def chunk(self, path: str, offset: int, length: int | None = None) -> tuple[int, bytes]:
        return super().chunk(path, offset)


@pytest.mark.parametrize("kind", ["old server", "smaller chunks"])
def test_answers_longer_or_shorter_than_asked_still_assemble_the_file(tmp_path, kind):
    rng = random.Random(6)
    old = rng.randbytes(500_000)
    new = rng.randbytes(30_000) + old + rng.randbytes(30_000)
    store, _ = _installed(tmp_path, old)
    repo, custom, digest = _published(tmp_path, new)
    chunks = OldServer(repo) if kind == "old server" else CountingChunks(repo)
    if kind == "smaller chunks":
        chunks.chunk_bytes = 4096  # a source that caps its answers below what was asked
    download = download_for(
        chunks, "new.bin", tmp_path / "new.bin", custom=custom, length=len(new), sha256=digest,
        installed=InstalledChunks(store),
    )  # fmt: skip
    assert download.run().read_bytes() == new
    assert download.reused_bytes > 400_000
    assert download.fetched_bytes == chunks.served
