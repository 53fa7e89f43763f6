"""Direct shard decoding: the rows of a cache's arrays read straight from their shard files, as
FORMAT.md lays them out, with zarr-python as the fallback. `FeatureCache` (featurecache.reader)
owns the key index and the row LRU and asks a `ShardReader` for what it lacks.

A sharded features array: the shard index at the end of the object (read once, then kept), then
one ranged read per run of adjacent chunks (one request for all of them on S3/GCS), each chunk
crc32c checked and decompressed (`featurecache.chunk_codec`). Per-row arrays chunked by shard (keys,
digests, scales) decode a whole chunk of shard_rows rows, kept in a small LRU. Arrays whose
zarr.json holds another codec chain, and `direct=False`, are read through zarr-python: a whole
shard per slice. Every unreadable file is a CorruptShardError naming the file, block and rows.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import zarr

from featurecache.block_table import BlockTable
from featurecache.chunk_codec import ArrayLayout, chunk_present, decode_shard_index, direct_layout
from featurecache.errors import ChunkError, CorruptShardError, StorageError
from featurecache.format import (
    CHANNEL_SCALED_CODECS,
    DIGEST_BYTES,
    DIGESTS_ARRAY,
    FEATURE_DTYPE,
    KEYS_ARRAY,
    SCALED_CODECS,
    VIEW_PARAM_DTYPE,
    VIEW_PARAM_FIELDS,
    array_ndim,
    channel_scales_path,
    features_path,
    scales_path,
    shard_file,
    view_params_path,
)
from featurecache.manifest import Block
from featurecache.spec import CacheSpec
from featurecache.store import Store

CHUNK_LRU = 256  # decoded per-row chunks (scales, digests) kept per reader
SHARD_INDEX_LIMIT = 4096  # shard indexes kept before the table is cleared


class ShardReader:
    """Reads rows of one cache's arrays from its store.

    store, location: the cache's store and its path or URL (for messages).
    spec, table: the cache's spec and block table (numpy columns).
    direct: decode straight from the shard files where the layout allows (else zarr-python).
    row_key: row -> its key, or None before the key index exists (named in corruption errors).
    """

    def __init__(
        self,
        store: Store,
        location: str,
        spec: CacheSpec,
        table: BlockTable,
        *,
        direct: bool = True,
        row_key: Callable[[int], str | None] = lambda row: None,
    ) -> None:
        self.store, self.location, self.spec, self.table = store, location, spec, table
        self.direct, self.row_key = direct, row_key
        self._zarr_store: Any = None
        self._arrays: dict[str, zarr.Array] = {}
        self._layouts: dict[str, ArrayLayout | None] = {}
        self._shard_index: dict[tuple[str, int], np.ndarray] = {}
        # decoded per-row chunks of scales and view params: (array path, shard) -> chunk
        self._scale_chunks: OrderedDict[tuple[str, int], np.ndarray] = OrderedDict()
        self._digest_chunks: OrderedDict[int, np.ndarray] = OrderedDict()  # shard -> (sr, 16)
        self._channel_scales: dict[str, np.ndarray] = {}

    def block_of_row(self, row: int) -> Block:
        """The block owning `row`."""
        return self.table.block(self.table.block_of_row(row))

    def array(self, name: str) -> zarr.Array:
        """The zarr-python array `name`, opened read-only once."""
        arr = self._arrays.get(name)
        if arr is None:
            if self._zarr_store is None:
                self._zarr_store = self.store.zarr_store(read_only=True)
            arr = zarr.open_array(self._zarr_store, path=name, mode="r")
            self._arrays[name] = arr
        return arr

    def block_rows(self, name: str, block: Block, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of array `name`, inside `block`, through zarr-python;
        CorruptShardError naming the shard file, block and row range when a file is missing or
        fails its crc32c."""
        sr = self.spec.shard_rows
        ndim = array_ndim(name)
        for s in range(start // sr, (stop - 1) // sr + 1):
            file = shard_file(name, ndim, s)
            if not self.store.exists(file):
                raise CorruptShardError(
                    f"Expected shard file {self.store.url(file)!r} of block {block.index} "
                    f"({block.source}) rows [{start}, {stop}), found none"
                )
        try:
            return np.asarray(self.array(name)[start:stop])
        except Exception as exc:  # zarr raises ValueError (crc32c) or decoder errors
            files = [
                self.store.url(shard_file(name, ndim, s))
                for s in range(start // sr, (stop - 1) // sr + 1)
            ]
            raise CorruptShardError(
                f"Expected readable shard file(s) {files} of block {block.index} "
                f"({block.source}) rows [{start}, {stop}), got {type(exc).__name__}: {exc}"
            ) from exc

    def block_keys_raw(self, block: Block) -> np.ndarray:
        """uint8 (count, key_bytes) key rows of a done block (direct chunk decode when possible)."""
        stop = block.row_start + block.count
        layout = self.layout(KEYS_ARRAY)
        if layout is None or layout.sharded:
            return self.block_rows(KEYS_ARRAY, block, block.row_start, stop)
        sr, width = self.spec.shard_rows, self.spec.key_bytes
        parts = []
        for s in range(block.row_start // sr, (stop - 1) // sr + 1):
            rows = range(s * sr, min((s + 1) * sr, stop))
            try:
                raw = self.read_file(KEYS_ARRAY, s, rows)
                chunk = layout.chain.decode(raw, "|u1", (sr, width))
            except ChunkError as exc:
                raise self.corrupt(KEYS_ARRAY, s, rows, str(exc)) from exc
            parts.append(chunk[: len(rows)])
        return np.concatenate(parts)

    def layout(self, name: str) -> ArrayLayout | None:
        """The layout of array `name` when the direct decoder applies to it, else None."""
        if name not in self._layouts:
            layout = None
            if self.direct:
                try:
                    meta = json.loads(self.store.read(f"{name}/zarr.json"))
                    layout = direct_layout(meta)
                except (OSError, ValueError):
                    layout = None
            self._layouts[name] = layout
        return self._layouts[name]

    def corrupt(self, name: str, shard: int, rows: Sequence[int], why: str) -> CorruptShardError:
        """The error for an unreadable shard file of array `name`: file, block, rows (and their
        keys once the key index exists) and why."""
        block = self.block_of_row(shard * self.spec.shard_rows)
        file = self.store.url(shard_file(name, array_ndim(name), shard))
        span = f"rows [{min(rows)}, {max(rows) + 1})" if len(rows) else "no rows"
        keys = [self.row_key(r) for r in (min(rows), max(rows))] if len(rows) else [None]
        if keys[0] is not None:
            span += f" keys {keys[0]!r}..{keys[1]!r}"
        return CorruptShardError(
            f"Expected a readable shard file {file!r} of block {block.index} "
            f"({block.source}) {span}, got {why}"
        )

    def read_file(self, name: str, shard: int, rows: Sequence[int]) -> bytes:
        """The whole shard (or chunk) file of array `name` for `shard`."""
        try:
            return self.store.read(shard_file(name, array_ndim(name), shard))
        except FileNotFoundError as exc:
            raise self.corrupt(name, shard, rows, "no such file") from exc

    def direct_feature_rows(
        self, name: str, shard: int, local: np.ndarray, shape: tuple[int, int]
    ) -> np.ndarray:
        """Decode rows `local` (sorted, unique, within the shard) of a sharded features array
        straight from its object: the index at its end (read once, then kept), then one ranged
        read per run of chunks adjacent in the object (one request for all of them on S3/GCS)."""
        sr = self.spec.shard_rows
        rows = [shard * sr + int(i) for i in local]
        key = shard_file(name, 3, shard)
        dtype = np.dtype(FEATURE_DTYPE[self.spec.codec])
        out = np.empty((len(local), *shape), dtype=dtype)
        layout = self.layout(name)
        assert layout is not None and layout.sharded, "called for direct sharded arrays only"
        try:
            index = self._shard_index.get((name, shard))
            if index is None:
                n = sr * 16 + 4
                tail = self.store.read_tail(key, n)
                if len(tail) < n:
                    raise ChunkError(
                        f"an object of {len(tail)} bytes, shorter than its index ({n})"
                    )
                index = decode_shard_index(tail, sr)
                if len(self._shard_index) >= SHARD_INDEX_LIMIT:
                    self._shard_index.clear()
                self._shard_index[(name, shard)] = index
            entries = index[local]
            if not all(chunk_present(e) for e in entries):
                raise ChunkError("a written row's chunk marked absent in the shard index")
            ranges = [(int(off), int(off) + int(nbytes)) for off, nbytes in entries]
            for k, buf in enumerate(self.store.read_ranges(key, ranges)):
                out[k] = layout.chain.decode(buf, dtype.str, shape)
        except FileNotFoundError as exc:
            raise self.corrupt(name, shard, rows, "no such file") from exc
        except (ChunkError, StorageError) as exc:
            raise self.corrupt(name, shard, rows, str(exc)) from exc
        return out

    def feature_rows(
        self, layer: str, shard: int, local: np.ndarray, view: int = 0
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Rows `local` of `shard` for `layer` (of view `view`) -> (rows, values, scales | None).
        Direct path: exactly those rows. Zarr path: the whole shard's written rows in one slice."""
        spec, sr = self.spec.layer(layer), self.spec.shard_rows
        name = features_path(layer, view)
        layout = self.layout(name)
        if layout is not None and layout.sharded:
            values = self.direct_feature_rows(name, shard, local, (spec.tokens, spec.dim))
            rows = shard * sr + local
        else:
            block = self.block_of_row(shard * sr)
            stop = min((shard + 1) * sr, block.row_start + block.count)
            values = self.block_rows(name, block, shard * sr, stop)
            rows = np.arange(shard * sr, stop)
        scales = None
        if self.spec.codec in SCALED_CODECS:
            scales = self.scale_chunk(layer, shard, list(rows), view)[rows - shard * sr]
        return rows, values, scales

    def scale_chunk(self, layer: str, shard: int, rows: Sequence[int], view: int = 0) -> np.ndarray:
        """The decoded scales chunk (shard_rows, tokens) float32 of a shard (of view `view`),
        cached."""
        name, sr = scales_path(layer, view), self.spec.shard_rows
        hit = self._scale_chunks.get((name, shard))
        if hit is not None:
            self._scale_chunks.move_to_end((name, shard))
            return hit
        tokens = self.spec.layer(layer).tokens
        chunk = self.row_chunk(name, shard, rows, "<f4", (sr, tokens))
        self._scale_chunks[(name, shard)] = chunk
        while len(self._scale_chunks) > CHUNK_LRU:
            self._scale_chunks.popitem(last=False)
        return chunk

    def row_chunk(
        self, name: str, shard: int, rows: Sequence[int], dtype: str, shape: tuple[int, ...]
    ) -> np.ndarray:
        """The decoded chunk of `shape` (shard_rows, ...) of a per-row array chunked by shard
        (scales, view params): direct decode where the layout allows, else zarr-python."""
        layout = self.layout(name)
        if layout is not None and not layout.sharded:
            try:
                return layout.chain.decode(self.read_file(name, shard, rows), dtype, shape)
            except ChunkError as exc:
                raise self.corrupt(name, shard, rows, str(exc)) from exc
        sr = self.spec.shard_rows
        block = self.block_of_row(shard * sr)
        return self.block_rows(name, block, shard * sr, (shard + 1) * sr)

    def view_params_rows(self, view: int, rows: np.ndarray) -> np.ndarray:
        """float64 (len(rows), cameras, fields): view `view`'s (>= 1) stored params of `rows`."""
        name, sr = view_params_path(view), self.spec.shard_rows
        shape = (sr, len(self.spec.view_cameras), len(VIEW_PARAM_FIELDS))
        out = np.empty((len(rows), *shape[1:]), dtype=VIEW_PARAM_DTYPE)
        for shard in np.unique(rows // sr).tolist():
            at = np.flatnonzero(rows // sr == shard)
            chunk = self._scale_chunks.get((name, shard))  # the per-row chunk LRU
            if chunk is None:
                chunk = self.row_chunk(name, shard, rows[at].tolist(), "<f8", shape)
                self._scale_chunks[(name, shard)] = chunk
                while len(self._scale_chunks) > CHUNK_LRU:
                    self._scale_chunks.popitem(last=False)
            out[at] = chunk[rows[at] % sr]
        return out

    def digest_chunk(self, shard: int, rows: Sequence[int]) -> np.ndarray:
        """The decoded digests chunk (shard_rows, DIGEST_BYTES) uint8 of a shard, cached."""
        hit = self._digest_chunks.get(shard)
        if hit is not None:
            self._digest_chunks.move_to_end(shard)
            return hit
        sr = self.spec.shard_rows
        layout = self.layout(DIGESTS_ARRAY)
        if layout is not None and not layout.sharded:
            try:
                raw = self.read_file(DIGESTS_ARRAY, shard, rows)
                chunk = layout.chain.decode(raw, "|u1", (sr, DIGEST_BYTES))
            except ChunkError as exc:
                raise self.corrupt(DIGESTS_ARRAY, shard, rows, str(exc)) from exc
        else:
            block = self.block_of_row(shard * sr)
            chunk = self.block_rows(DIGESTS_ARRAY, block, shard * sr, (shard + 1) * sr)
        self._digest_chunks[shard] = chunk
        while len(self._digest_chunks) > CHUNK_LRU:
            self._digest_chunks.popitem(last=False)
        return chunk

    def channel_scale(self, layer: str) -> np.ndarray | None:
        """The int8c channel scale of `layer`, float32 (dim,), or None for fp16 and int8 caches.
        Read once (crc32c checked), then kept; CorruptShardError for an unreadable or impossible
        vector."""
        spec = self.spec.layer(layer)
        if self.spec.codec not in CHANNEL_SCALED_CODECS:
            return None
        if spec.name not in self._channel_scales:
            name = channel_scales_path(spec.name)
            where = self.store.url(name)
            try:
                c = np.asarray(self.array(name)[:], dtype=np.float32)
            except Exception as exc:  # zarr raises ValueError (crc32c) or FileNotFoundError
                raise CorruptShardError(
                    f"Expected a readable channel scale array {where!r} of the int8c cache, got "
                    f"{type(exc).__name__}: {exc}"
                ) from exc
            if c.shape != (spec.dim,) or not (np.isfinite(c).all() and (c > 0).all()):
                raise CorruptShardError(
                    f"Expected {spec.dim} finite positive values in {where!r}, got shape "
                    f"{c.shape} (min {float(c.min()) if c.size else 'none'})"
                )
            self._channel_scales[spec.name] = c
        return self._channel_scales[spec.name]
