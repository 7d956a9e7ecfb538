"""Content-defined chunk tables: the signed ``cdc`` field of a bundle file's target.

Fixed 256 KiB chunks shift as soon as one byte in front of them changes, so two releases of
the same model share almost none. FastCDC cuts a file where its content says (a rolling hash
over the last bytes), so an edit moves only the cuts near it and the chunks after it keep
their hashes. The image repository signs each file's table::

    "cdc": {"algorithm": "fastcdc", "min": 4096, "avg": 16384, "max": 65536,
            "chunks": ["LENGTH:SHA256HEX", ...]}

beside the fixed ``chunk_bytes``/``chunks`` that agents before it download whole files
with. One string per chunk: targets metadata is written as indented JSON, where a
``[length, hash]`` pair takes four lines and about 130 bytes, the string about 85. An agent
builds a new file from the chunks it already holds (found by hash in the tables of its
installed releases) and downloads the others.

The parameters come from the file's size, in coarse buckets, so a fine-tuned release of a
model lands in the same bucket as the one before it and is cut the same way. The cutting
itself (``pyfastcdc``) is the server's: the agent only reads tables.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from edgec.errors import TrustError

__all__ = ["ALGORITHM", "MAX_CHUNK_BYTES", "CdcParams", "CdcTable", "params_for_size"]

ALGORITHM = "fastcdc"  # FastCDC 2020 (pyfastcdc), normalized chunking 1, gear seed 0
MAX_CHUNK_BYTES = 256 * 1024  # the fetch cap: one chunk fits one MQTT answer
_CHUNK = re.compile(r"([1-9][0-9]{0,6}):([0-9a-f]{64})")
# (files under this size, average chunk size): a few coarse buckets, measured in
# bench/bench_delta.py; min = avg / 4, max = avg * 4 (never over MAX_CHUNK_BYTES). Each chunk
# costs about 85 bytes of targets.json, which every device downloads: the tables stay near
# 0.5 % of their files under 8 MiB and 0.15 % above, where 64 KiB chunks fetched 81 KB of a
# MobileNetV2 whose head was refitted (16 KiB ones: 72 KB, for four times the table)
_BUCKETS = ((1 << 20, 4 * 1024), (8 << 20, 16 * 1024))
_LARGE_AVG = 64 * 1024


@dataclass(frozen=True)
class CdcParams:
    min: int
    avg: int
    max: int


def params_for_size(size: int) -> CdcParams:
    """The chunking parameters for a file of ``size`` bytes."""
    avg = next((avg for limit, avg in _BUCKETS if size < limit), _LARGE_AVG)
    return CdcParams(avg // 4, avg, min(avg * 4, MAX_CHUNK_BYTES))


@dataclass(frozen=True)
class CdcTable:
    params: CdcParams
    chunks: tuple[tuple[int, str], ...]  # (length, sha256 hex), in file order

    def to_custom(self) -> dict[str, Any]:
        return {
            "algorithm": ALGORITHM,
            "min": self.params.min,
            "avg": self.params.avg,
            "max": self.params.max,
            "chunks": [f"{length}:{digest}" for length, digest in self.chunks],
        }

    def offsets(self) -> list[tuple[int, int, str]]:
        """``(offset, length, sha256)`` of every chunk."""
        out, offset = [], 0
        for length, digest in self.chunks:
            out.append((offset, length, digest))
            offset += length
        return out

    @classmethod
    def from_custom(cls, value: object, file_length: int, what: str) -> CdcTable:
        """The table signed for a file of ``file_length`` bytes; ``TrustError`` (one line,
        naming ``what``) unless it is exactly a table this agent can use: the algorithm it
        knows, sizes within the fetch cap, lengths that add up to the file."""
        if not isinstance(value, dict) or value.get("algorithm") != ALGORITHM:
            raise TrustError(f"{what}: the chunk table is not a {ALGORITHM} table", "targets")
        sizes = [value.get(k) for k in ("min", "avg", "max")]
        numbers = [s for s in sizes if isinstance(s, int) and not isinstance(s, bool)]
        if len(numbers) != len(sizes):
            raise TrustError(f"{what}: the chunk table's min/avg/max are not integers", "targets")
        low, avg, high = numbers
        if not 0 < low <= avg <= high <= MAX_CHUNK_BYTES:
            raise TrustError(
                f"{what}: chunk sizes {low}/{avg}/{high} are not 0 < min <= avg <= max <= {MAX_CHUNK_BYTES}",
                "targets",
            )
        raw = value.get("chunks")
        if not isinstance(raw, list) or len(raw) > file_length // low + 1:
            raise TrustError(f"{what}: the chunk list is missing or longer than the file allows", "targets")
        chunks = []
        for i, entry in enumerate(raw):
            match = _CHUNK.fullmatch(entry) if isinstance(entry, str) else None
            if match is None or not 0 < int(match[1]) <= high:
                raise TrustError(
                    f"{what}: chunk {i} is not LENGTH:SHA256HEX with a length of 1-{high}", "targets"
                )
            chunks.append((int(match[1]), match[2]))
        total = sum(length for length, _ in chunks)
        if total != file_length:
            raise TrustError(
                f"{what}: the chunks add up to {total} bytes, not the file's {file_length}", "targets"
            )
        return cls(CdcParams(low, avg, high), tuple(chunks))
