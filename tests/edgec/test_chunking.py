"""Content-defined chunk tables: cut by the server (``ota_server._targets.cdc_table``), read
by the agent (``edgec.chunking.CdcTable.from_custom``), and the fetch request's ``length``."""

from __future__ import annotations

import hashlib
import random

import pytest

from edgec.chunking import MAX_CHUNK_BYTES, CdcTable, params_for_size
from edgec.errors import ProtocolError, TrustError
from edgec.fetch_protocol import decode_request, encode_request
from ota_server._targets import CHUNK_BYTES, cdc_table, chunk_hashes


def _hashes(table: CdcTable) -> set[str]:
    return {digest for _, digest in table.chunks}


def test_chunk_boundaries_after_an_edit_in_front_stay_where_the_content_says(tmp_path):
    data = random.Random(1).randbytes(3 * 1024 * 1024)
    old, new = tmp_path / "old.bin", tmp_path / "new.bin"
    old.write_bytes(data)
    new.write_bytes(data[:1000] + b"seventeen new bytes" + data[1000:])  # everything after shifts
    before, after = cdc_table(old), cdc_table(new)
    assert before.params == after.params == params_for_size(len(data))
    kept = _hashes(before) & _hashes(after)
    assert len(kept) >= len(after.chunks) - 3  # only the chunks around the edit are new
    assert sum(length for length, _ in after.chunks) == new.stat().st_size
    # fixed 256 KiB chunks: every one after the edit changed
    assert set(chunk_hashes(old)) & set(chunk_hashes(new)) == set()
    assert cdc_table(old) == before  # deterministic


def test_parameters_come_in_coarse_buckets_under_the_fetch_cap():
    assert params_for_size(150_000).avg == params_for_size(900_000).avg == 4096
    assert params_for_size(4_000_000).avg == 16384
    assert params_for_size(14_000_000).avg == 65536
    large = params_for_size(3_000_000_000)
    assert (large.min, large.avg, large.max) == (16384, 65536, MAX_CHUNK_BYTES)
    for size in (0, 1 << 20, 16 << 20, 1 << 34):
        p = params_for_size(size)
        assert p.min * 4 == p.avg
        assert p.max <= MAX_CHUNK_BYTES == CHUNK_BYTES


def test_a_table_read_back_is_the_table_signed(tmp_path):
    path = tmp_path / "model.bin"
    path.write_bytes(random.Random(2).randbytes(200_000))
    table = cdc_table(path)
    assert CdcTable.from_custom(table.to_custom(), 200_000, "model.bin") == table
    offset, length, digest = table.offsets()[1]
    assert digest == hashlib.sha256(path.read_bytes()[offset : offset + length]).hexdigest()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda t: t.update(algorithm="rabin"), "not a fastcdc table"),
        (lambda t: t.update(max=MAX_CHUNK_BYTES + 1), "chunk sizes"),
        (lambda t: t.update(min=True), "not integers"),
        (lambda t: t["chunks"].__setitem__(0, t["chunks"][0].upper()), "chunk 0 is not"),
        (lambda t: t["chunks"].__setitem__(0, [1024, "a" * 64]), "chunk 0 is not"),
        (lambda t: t["chunks"].__setitem__(0, "20000:" + "a" * 64), "chunk 0 is not"),  # over max
        (lambda t: t["chunks"].pop(), "add up to"),
        (lambda t: t.update(chunks=["1024:" + "a" * 64] * 300), "longer than the file allows"),
    ],
)
def test_a_table_that_does_not_fit_its_file_is_refused_in_one_line(tmp_path, change, message):
    path = tmp_path / "model.bin"
    path.write_bytes(random.Random(3).randbytes(100_000))
    custom = cdc_table(path).to_custom()
    change(custom)
    with pytest.raises(TrustError, match=message) as error:
        CdcTable.from_custom(custom, 100_000, "digits/1.0.1/x86-64-cpu/model.onnx")
    assert "\n" not in str(error.value)
    assert "model.onnx" in str(error.value)


def test_the_fetch_request_length_is_optional_and_bounded():
    assert decode_request(encode_request("a", "targets/x", 0)).length is None
    assert decode_request(encode_request("a", "targets/x", 10, 4096)).length == 4096
    assert decode_request(encode_request("a", "targets/x", 0, MAX_CHUNK_BYTES)).length == MAX_CHUNK_BYTES
    for bad in (0, -1, MAX_CHUNK_BYTES + 1, 10**12):
        with pytest.raises(ProtocolError, match="length"):
            decode_request(encode_request("a", "targets/x", 0, bad))
    for bad_raw in (
        b'{"id":"a","path":"targets/x","offset":0,"length":true}',
        b'{"id":"a","path":"t","offset":0,"length":"9"}',
    ):
        with pytest.raises(ProtocolError, match="length"):
            decode_request(bad_raw)
