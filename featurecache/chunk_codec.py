"""The bytes of every chunk and shard object of a cache: one rule, used by the writer to encode and
by the reader's fast path to decode, with zarr-python as the independent oracle (the tests compare
the objects byte for byte with what zarr writes for the same data and metadata).

    chunk    the values in C order, little endian (`bytes`)
             -> zstd at level L, no content checksum (only with a zstd compressor)
             -> + crc32c of what precedes, 4 bytes little endian
    shard    (features/<layer>: shape (rows, tokens, dim), shard (shard_rows, tokens, dim), inner
             chunk (1, tokens, dim)): the written rows' chunks back to back in row order, then
             the index: (offset, nbytes) uint64 little endian per inner chunk, 2**64 - 1 in both
             for an absent (never written) chunk, + crc32c of the index
    per-row  (keys, digests, scales/<layer>, views/<i>/params: chunk (shard_rows, ...)): one
             chunk per object, the unwritten rows of a partly written chunk filled with 0 (zarr
             writes a chunk whole, its absent part read as the fill value)

Why not zarr-python itself: it encodes a 64-row shard of (256, 768) int8 at ~0.75 CPU-ms per
row with zstd:3 (0.34 without a compressor), this module at ~0.34 (0.12) (`featurecache bench
writer`, CPU Intel Xeon, 2 shared cores), and its sharding codec reads one chunk in ~6-10 ms
where `ChunkChain.decode` takes ~0.5 ms. Arrays whose zarr.json holds another chain are read
through zarr-python (`direct_layout` gives None) and refused by the writer.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from typing import Any

import google_crc32c
import numpy as np
from numcodecs import Zstd
from zarr.codecs import BytesCodec, Crc32cCodec, ZstdCodec

from featurecache.errors import ChunkError
from featurecache.format import compressor_level

ABSENT = np.uint64(2**64 - 1)  # a shard index entry of a chunk never written
INDEX_ENTRY_BYTES = 16  # (offset, nbytes), uint64 little endian each
CRC_BYTES = 4


@cache
def _zstd(level: int) -> Zstd:
    return Zstd(level=level, checksum=False)


def _crc(data: Any) -> bytes:
    """crc32c of a bytes-like object (bytes or a contiguous uint8 array), 4 bytes little endian."""
    return google_crc32c.value(data).to_bytes(CRC_BYTES, "little")


@dataclass(frozen=True, slots=True)
class ChunkChain:
    """The codec chain of every chunk: bytes (little endian) -> zstd at `level` (None: no
    compressor) -> crc32c. `named("zstd:3")` is the format's default chain."""

    level: int | None

    @classmethod
    def named(cls, compressor: str) -> ChunkChain:
        """The chain of a compressor name: "none" or "zstd:L" (SpecError otherwise)."""
        return cls(compressor_level(compressor))

    @classmethod
    def from_codecs(cls, codecs: Any) -> ChunkChain | None:
        """The chain a zarr.json codec list describes, or None when it is not one of ours."""
        codecs = list(codecs or [])
        names = [c.get("name") if isinstance(c, dict) else None for c in codecs]
        if names not in (["bytes", "crc32c"], ["bytes", "zstd", "crc32c"]):
            return None
        if (codecs[0].get("configuration") or {}).get("endian", "little") != "little":
            return None
        if len(codecs) == 2:
            return cls(None)
        conf = codecs[1].get("configuration") or {}
        level = conf.get("level")
        if conf.get("checksum", False) or not isinstance(level, int) or isinstance(level, bool):
            return None
        return cls(level)

    @property
    def compressor(self) -> str:
        """The compressor's name ("none", "zstd:L")."""
        return "none" if self.level is None else f"zstd:{self.level}"

    def zarr_kwargs(self) -> dict[str, Any]:
        """zarr.create_array kwargs of this chain (for sharded arrays: the chain inside each
        shard; the shard index keeps zarr's default, bytes -> crc32c)."""
        compressors: list[Any] = [Crc32cCodec()]
        if self.level is not None:
            compressors.insert(0, ZstdCodec(level=self.level, checksum=False))
        return {
            "serializer": BytesCodec(endian="little"),
            "compressors": compressors,
            "filters": None,
        }

    def encode(self, data: np.ndarray) -> bytes:
        """One chunk: data (contiguous, little endian) -> its stored bytes."""
        body = data.tobytes() if self.level is None else _zstd(self.level).encode(data)
        return body + _crc(body)

    def encode_rows(self, rows: np.ndarray) -> tuple[bytes, np.ndarray]:
        """Each row of rows (n, ...) (contiguous, little endian) as one chunk, back to back ->
        (the bytes, uint64 (n,) the size of each chunk)."""
        flat = rows.reshape(len(rows), -1).view(np.uint8)  # (n, bytes per row)
        n, width = flat.shape
        if self.level is None:  # one copy: each row's bytes, then its crc32c
            out = np.empty((n, width + CRC_BYTES), dtype=np.uint8)
            out[:, :width] = flat
            crcs = np.fromiter((google_crc32c.value(r) for r in flat), dtype="<u4", count=n)
            out[:, width:] = crcs.view(np.uint8).reshape(n, CRC_BYTES)
            return out.tobytes(), np.full(n, width + CRC_BYTES, dtype=np.uint64)
        zstd = _zstd(self.level)
        parts: list[bytes] = []
        for r in flat:
            body = zstd.encode(r)
            parts += (body, _crc(body))
        sizes = np.fromiter((len(b) + CRC_BYTES for b in parts[::2]), dtype=np.uint64, count=n)
        return b"".join(parts), sizes

    def decode(self, raw: bytes, dtype: Any, shape: tuple[int, ...]) -> np.ndarray:
        """One stored chunk -> little-endian `dtype` values of `shape`, after checking its
        crc32c (ChunkError when it fails or the size is wrong)."""
        if len(raw) < CRC_BYTES:
            raise ChunkError(f"Expected a chunk of at least {CRC_BYTES} bytes, got {len(raw)}")
        body = raw[:-CRC_BYTES]
        if _crc(body) != raw[-CRC_BYTES:]:
            raise ChunkError("Expected the chunk's stored crc32c, got a different checksum")
        data = body if self.level is None else _zstd(self.level).decode(body)
        out = np.frombuffer(data, dtype=np.dtype(dtype).newbyteorder("<"))
        if out.size != int(np.prod(shape)):
            raise ChunkError(f"Expected {int(np.prod(shape))} values in the chunk, got {out.size}")
        return out.reshape(shape)


def encode_shard_index(sizes: np.ndarray, chunks: int) -> bytes:
    """The index of a shard whose first len(sizes) chunks are present, back to back from offset
    0, and whose other chunks (up to `chunks`) are absent -> its stored bytes (with crc32c)."""
    index = np.full((chunks, 2), ABSENT, dtype="<u8")
    sizes = np.asarray(sizes, dtype=np.uint64)
    index[: len(sizes), 0] = np.cumsum(sizes) - sizes
    index[: len(sizes), 1] = sizes
    raw = index.tobytes()
    return raw + _crc(raw)


def decode_shard_index(tail: bytes, chunks: int) -> np.ndarray:
    """The shard index (the last chunks * 16 + 4 bytes of a shard object) -> uint64 (chunks, 2)
    (offset, nbytes); absent chunks are 2**64 - 1 in both."""
    if len(tail) != chunks * INDEX_ENTRY_BYTES + CRC_BYTES:
        raise ChunkError(
            f"Expected a shard index of {chunks * INDEX_ENTRY_BYTES + CRC_BYTES} bytes, got "
            f"{len(tail)}"
        )
    if _crc(tail[:-CRC_BYTES]) != tail[-CRC_BYTES:]:
        raise ChunkError("Expected the shard index's stored crc32c, got a different checksum")
    return np.frombuffer(tail[:-CRC_BYTES], dtype="<u8").reshape(chunks, 2)


def chunk_present(entry: np.ndarray) -> bool:
    """Whether a shard index entry (offset, nbytes) is a written chunk."""
    return not (entry[0] == ABSENT and entry[1] == ABSENT)


@dataclass(frozen=True, slots=True)
class ArrayLayout:
    """How one per-row array's objects hold its rows: `sharded` (one chunk per row inside a
    shard object with an index at its end) or chunked (one chunk of `rows` rows per object),
    with `chain`, stored as `dtype`, each row of `row_shape`, `rows` rows per object."""

    sharded: bool
    chain: ChunkChain
    dtype: np.dtype
    row_shape: tuple[int, ...]
    rows: int

    def encode(self, values: np.ndarray) -> bytes:
        """The object (shard or chunk) whose first n rows are values (n, *row_shape), 1 <= n <=
        rows, and whose other rows were never written: absent chunks of a shard, zeros (the fill
        value) in a chunk. Byte for byte what zarr-python writes for them."""
        n = len(values)
        assert 0 < n <= self.rows and values.shape[1:] == self.row_shape, (values.shape, self)
        values = np.ascontiguousarray(values, dtype=self.dtype.newbyteorder("<"))
        if self.sharded:
            body, sizes = self.chain.encode_rows(values)
            return body + encode_shard_index(sizes, self.rows)
        if n < self.rows:
            whole = np.zeros((self.rows, *self.row_shape), dtype=values.dtype)
            whole[:n] = values
            values = whole
        return self.chain.encode(values)


def _regular_chunk_shape(meta: dict[str, Any]) -> tuple[int, ...] | None:
    grid = meta.get("chunk_grid") or {}
    shape = (grid.get("configuration") or {}).get("chunk_shape")
    if grid.get("name") != "regular" or not isinstance(shape, list):
        return None
    return tuple(int(s) for s in shape)


def direct_layout(meta: dict[str, Any]) -> ArrayLayout | None:
    """The ArrayLayout of an array's zarr.json when it is laid out as this module encodes it
    (default chunk keys with "/", fill value 0, our chain; sharded: one-row inner chunks, index
    bytes -> crc32c at the end), so the direct encoder and decoder apply; None otherwise (read
    and write through zarr-python)."""
    key_enc = meta.get("chunk_key_encoding") or {}
    if (
        key_enc.get("name") != "default"
        or (key_enc.get("configuration") or {}).get("separator", "/") != "/"
        or meta.get("fill_value") != 0
        or not isinstance(meta.get("data_type"), str)
    ):
        return None
    outer = _regular_chunk_shape(meta)
    codecs = meta.get("codecs") or []
    if outer is None or not codecs:
        return None
    try:
        dtype = np.dtype(meta["data_type"])
    except TypeError:  # a Zarr data type numpy does not name
        return None
    if len(codecs) == 1 and codecs[0].get("name") == "sharding_indexed":
        conf = codecs[0].get("configuration") or {}
        index = [c.get("name") for c in conf.get("index_codecs") or []]
        chain = ChunkChain.from_codecs(conf.get("codecs"))
        inner = tuple(conf.get("chunk_shape") or ())
        if (
            chain is None
            or index != ["bytes", "crc32c"]
            or conf.get("index_location", "end") != "end"
            or inner != (1, *outer[1:])
        ):
            return None
        return ArrayLayout(True, chain, dtype, outer[1:], outer[0])
    chain = ChunkChain.from_codecs(codecs)
    return None if chain is None else ArrayLayout(False, chain, dtype, outer[1:], outer[0])
