"""The read side: `open_cache(path)` -> FeatureCache, which maps sample keys to rows through the
done blocks' stored keys and reads features batched and grouped by Zarr shard.

A batch's rows are grouped by shard; for each shard the reader decodes exactly the rows asked for,
straight from the shard file as FORMAT.md lays it out (the shard index at the end, then one read
per run of adjacent chunks, crc32c checked, zstd). Each row costs one decode whatever the order,
so reading in block order or fully shuffled runs at the same speed (benchmarks/RESULTS.md, "cache").
Zarr-python's own partial shard reads cost ~10x more per row, and its whole-shard reads decode a
shard's other rows too, which only pays off when they are read before being evicted.

Arrays whose zarr.json holds another codec chain, and `direct=False`, are read through zarr-python
instead: a whole shard per slice, its rows kept in the LRU (a prefetch for block-order reads).
Decoded rows stay in a small LRU (by bytes), so repeated keys cost nothing.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import zarr

from featurecache.codecs import (
    ChunkError,
    chunk_present,
    decode_chunk,
    decode_shard_index,
    dequantize_int8,
    direct_layout,
)
from featurecache.completion import BlockTable, CacheState, load_state
from featurecache.errors import (
    BlockNotDoneError,
    CorruptShardError,
    DigestMismatchError,
    InvalidKeyError,
    StorageError,
    UnknownKeyError,
)
from featurecache.format import (
    CHANNEL_SCALED_CODECS,
    DIGEST_BYTES,
    DIGESTS_ARRAY,
    DIGESTS_SINCE_VERSION,
    FEATURE_DTYPE,
    KEYS_ARRAY,
    SCALED_CODECS,
    channel_scales_path,
    features_path,
    scales_path,
    shard_file,
)
from featurecache.integrity import check_cache
from featurecache.manifest import Block, Manifest
from featurecache.spec import CacheSpec
from featurecache.store import Store, open_store

if TYPE_CHECKING:
    import torch

DEFAULT_CACHE_BYTES = 128 << 20  # 128 MiB of decoded rows per FeatureCache (per worker)


def decode_keys(raw: np.ndarray) -> list[str]:
    """uint8 (n, key_bytes) NUL-padded UTF-8 rows -> n keys ("" for an all-NUL row)."""
    return [bytes(r).rstrip(b"\x00").decode("utf-8") for r in np.asarray(raw, dtype=np.uint8)]


def open_cache(
    path: str | Path, *, cache_bytes: int = DEFAULT_CACHE_BYTES, direct: bool = True
) -> FeatureCache:
    """Open the cache at `path` for reading. NotACacheError when it is not one,
    FormatVersionError when a newer featurecache wrote it. `cache_bytes` bounds the LRU of decoded
    rows; `direct=False` reads everything through zarr-python (slower; for cross-checks)."""
    return FeatureCache(path, cache_bytes=cache_bytes, direct=direct)


class FeatureCache:
    """A cache opened for reading: `.spec`, `.manifest`, `.keys`, `.row_of(key)`, `key in cache`,
    `.read(keys, layer)`, `.read_raw(keys, layer)`. Picklable: a copy in a DataLoader worker
    reopens the files itself on first use (it carries only the path)."""

    def __init__(
        self, path: str | Path, *, cache_bytes: int = DEFAULT_CACHE_BYTES, direct: bool = True
    ) -> None:
        self.location = str(path)  # a local path or a URL (s3://, gs://, memory://)
        self.path = Path(path)
        self.cache_bytes = int(cache_bytes)
        self.store: Store = open_store(path)
        self.state: CacheState = load_state(self.store)
        self.table: BlockTable = self.state.table  # the block table as numpy columns
        # the manifest is not trusted over the arrays: shapes, dtypes, chunking must agree
        check_cache(self.store.read, self.location, self.state)
        self._zarr_store: Any = None
        self._arrays: dict[str, zarr.Array] = {}
        self._keys: list[str] | None = None
        self._row_of: dict[str, int] | None = None
        self.direct = direct
        self._layouts: dict[str, str | None] = {}
        self._shard_index: dict[tuple[str, int], np.ndarray] = {}
        self._scale_chunks: OrderedDict[tuple[str, int], np.ndarray] = OrderedDict()
        self._digest_chunks: OrderedDict[int, np.ndarray] = OrderedDict()  # shard -> (sr, 16)
        # decoded rows: (layer, row) -> (values (T, D), scales (T,) | None), bounded by bytes
        self._lru: OrderedDict[tuple[str, int], tuple[np.ndarray, np.ndarray | None]] = (
            OrderedDict()
        )
        self._lru_bytes = 0
        self._channel_scales: dict[str, np.ndarray] = {}
        self.shard_reads = 0  # statistics, for tests and benchmarks
        self.rows_decoded = 0

    # ---- pickling: carry the path only ------------------------------------------------------
    def __reduce__(self) -> tuple[Any, ...]:
        return (_reopen, (self.location, self.cache_bytes, self.direct))

    def __repr__(self) -> str:
        return (
            f"FeatureCache({self.location!r}, codec={self.spec.codec}, layers="
            f"{list(self.spec.layer_names)}, blocks done {self.table.n_done}/{len(self.table)})"
        )

    @property
    def spec(self) -> CacheSpec:
        return self.state.spec

    @property
    def manifest(self) -> Manifest:
        """Every block as a manifest.Block (built on each access: for small caches and tools; the
        reader itself works on `.table`)."""
        return self.state.manifest()

    # ---- key index --------------------------------------------------------------------------
    def _array(self, name: str) -> zarr.Array:
        arr = self._arrays.get(name)
        if arr is None:
            if self._zarr_store is None:
                self._zarr_store = self.store.zarr_store(read_only=True)
            arr = zarr.open_array(self._zarr_store, path=name, mode="r")
            self._arrays[name] = arr
        return arr

    def _read_block_rows(self, name: str, block: Block, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of array `name`, inside `block`; CorruptShardError naming the shard
        file, block and row range when a file is missing or fails its crc32c."""
        sr = self.spec.shard_rows
        ndim = 3 if name.startswith("features/") else 2
        for s in range(start // sr, (stop - 1) // sr + 1):
            file = shard_file(name, ndim, s)
            if not self.store.exists(file):
                raise CorruptShardError(
                    f"Expected shard file {self.store.url(file)!r} of block {block.index} "
                    f"({block.source}) rows [{start}, {stop}), found none"
                )
        try:
            return np.asarray(self._array(name)[start:stop])
        except Exception as exc:  # zarr raises ValueError (crc32c) or decoder errors
            files = [
                self.store.url(shard_file(name, ndim, s))
                for s in range(start // sr, (stop - 1) // sr + 1)
            ]
            raise CorruptShardError(
                f"Expected readable shard file(s) {files} of block {block.index} "
                f"({block.source}) rows [{start}, {stop}), got {type(exc).__name__}: {exc}"
            ) from exc

    def _block_keys_raw(self, block: Block) -> np.ndarray:
        """uint8 (count, key_bytes) key rows of a done block (direct chunk decode when possible)."""
        stop = block.row_start + block.count
        if self._layout(KEYS_ARRAY) != "chunked":
            return self._read_block_rows(KEYS_ARRAY, block, block.row_start, stop)
        sr, width = self.spec.shard_rows, self.spec.key_bytes
        parts = []
        for s in range(block.row_start // sr, (stop - 1) // sr + 1):
            rows = range(s * sr, min((s + 1) * sr, stop))
            try:
                chunk = decode_chunk(self._read_file(KEYS_ARRAY, s, rows), "|u1", (sr, width))
            except ChunkError as exc:
                raise self._corrupt(KEYS_ARRAY, s, rows, str(exc)) from exc
            parts.append(chunk[: len(rows)])
        return np.concatenate(parts)

    def _ensure_index(self) -> None:
        if self._row_of is not None:
            return
        keys: list[str] = []
        row_of: dict[str, int] = {}
        for i in self.table.done_indices().tolist():
            block = self.table.block(i)
            if not block.count:
                continue
            block_keys = decode_keys(self._block_keys_raw(block))
            for i, key in enumerate(block_keys):
                row = block.row_start + i
                if key in row_of:
                    other = self.block_of_row(row_of[key])
                    raise InvalidKeyError(
                        f"Expected unique keys in {self.location!r}, got {key!r} at rows "
                        f"{row_of[key]} (block {other.index}) and {row} (block {block.index})"
                    )
                row_of[key] = row
            keys.extend(block_keys)
        self._keys, self._row_of = keys, row_of

    @property
    def keys(self) -> list[str]:
        """Keys of the done blocks, in row order."""
        self._ensure_index()
        assert self._keys is not None
        return self._keys

    def __len__(self) -> int:
        return len(self.keys)

    def __contains__(self, key: object) -> bool:
        self._ensure_index()
        assert self._row_of is not None
        return key in self._row_of

    def block_of_row(self, row: int) -> Block:
        """The block owning `row`."""
        return self.table.block(self.table.block_of_row(row))

    def row_of(self, key: str) -> int:
        """The row of `key`; UnknownKeyError, or BlockNotDoneError when it is in a pending block."""
        self._ensure_index()
        assert self._row_of is not None
        row = self._row_of.get(key)
        if row is None:
            self._raise_missing(key)
        return row  # type: ignore[return-value]

    def _raise_missing(self, key: str) -> None:
        table = self.table
        for i in np.flatnonzero(~table.done & (table.row_stop > table.row_start)).tolist():
            block = table.block(i)
            try:  # what a pending block's writer has written so far
                raw = np.asarray(self._array(KEYS_ARRAY)[block.row_start : block.row_stop])
            except Exception:
                continue
            if key in decode_keys(raw):
                raise BlockNotDoneError(
                    f"Expected key {key!r} in a done block of {self.location!r}, got it in "
                    f"block {block.index} ({block.source}) which is {block.status}"
                )
        raise UnknownKeyError(
            f"Expected a key of {self.location!r}, got {key!r} (no done block holds it)"
        )

    # ---- reading ----------------------------------------------------------------------------
    def _layout(self, name: str) -> str | None:
        """'sharded'/'chunked' when the direct decoder applies to array `name`, else None."""
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

    def _corrupt(self, name: str, shard: int, rows: Sequence[int], why: str) -> CorruptShardError:
        block = self.block_of_row(shard * self.spec.shard_rows)
        ndim = 3 if name.startswith("features/") else 2
        file = self.store.url(shard_file(name, ndim, shard))
        span = f"rows [{min(rows)}, {max(rows) + 1})" if len(rows) else "no rows"
        if self._keys is not None and len(rows):
            keys = [self._keys_by_row(r) for r in (min(rows), max(rows))]
            span += f" keys {keys[0]!r}..{keys[1]!r}"
        return CorruptShardError(
            f"Expected a readable shard file {file!r} of block {block.index} "
            f"({block.source}) {span}, got {why}"
        )

    def _keys_by_row(self, row: int) -> str:
        block = self.block_of_row(row)
        table = self.table
        offset = int(table.count[table.done & (table.row_start < block.row_start)].sum())
        keys = self._keys or []
        i = offset + row - block.row_start
        return keys[i] if 0 <= i < len(keys) else "?"

    def _read_file(self, name: str, shard: int, rows: Sequence[int]) -> bytes:
        ndim = 3 if name.startswith("features/") else 2
        try:
            return self.store.read(shard_file(name, ndim, shard))
        except FileNotFoundError as exc:
            raise self._corrupt(name, shard, rows, "no such file") from exc

    def _direct_feature_rows(
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
                if len(self._shard_index) >= 4096:
                    self._shard_index.clear()
                self._shard_index[(name, shard)] = index
            entries = index[local]
            if not all(chunk_present(e) for e in entries):
                raise ChunkError("a written row's chunk marked absent in the shard index")
            ranges = [(int(off), int(off) + int(nbytes)) for off, nbytes in entries]
            for k, buf in enumerate(self.store.read_ranges(key, ranges)):
                out[k] = decode_chunk(buf, dtype.str, shape)
        except FileNotFoundError as exc:
            raise self._corrupt(name, shard, rows, "no such file") from exc
        except (ChunkError, StorageError) as exc:
            raise self._corrupt(name, shard, rows, str(exc)) from exc
        return out

    def _scale_chunk(self, layer: str, shard: int, rows: Sequence[int]) -> np.ndarray:
        """The decoded scales chunk (shard_rows, tokens) float32 of a shard, cached."""
        hit = self._scale_chunks.get((layer, shard))
        if hit is not None:
            self._scale_chunks.move_to_end((layer, shard))
            return hit
        name, sr = scales_path(layer), self.spec.shard_rows
        tokens = self.spec.layer(layer).tokens
        if self._layout(name) == "chunked":
            try:
                chunk = decode_chunk(self._read_file(name, shard, rows), "<f4", (sr, tokens))
            except ChunkError as exc:
                raise self._corrupt(name, shard, rows, str(exc)) from exc
        else:
            block = self.block_of_row(shard * sr)
            chunk = self._read_block_rows(name, block, shard * sr, (shard + 1) * sr)
        self._scale_chunks[(layer, shard)] = chunk
        while len(self._scale_chunks) > 256:
            self._scale_chunks.popitem(last=False)
        return chunk

    # ---- digests of the source samples (format version >= 2) ---------------------------------
    @property
    def has_digests(self) -> bool:
        """Whether the cache stores each row's source digest (format version >= 2)."""
        return self.state.version >= DIGESTS_SINCE_VERSION

    def digests(self, keys: Sequence[str]) -> np.ndarray:
        """uint8 (len(keys), DIGEST_BYTES): the stored `format.sample_digest` of each key's
        source images; all zero where none was recorded, and for caches without digests."""
        out = np.zeros((len(keys), DIGEST_BYTES), np.uint8)
        if not self.has_digests or not len(keys):
            return out
        rows = self._rows(keys)
        self._check_rows(rows)
        sr = self.spec.shard_rows
        for i, row in enumerate(rows.tolist()):
            out[i] = self._digest_chunk(row // sr, [row])[row % sr]
        return out

    def _digest_chunk(self, shard: int, rows: Sequence[int]) -> np.ndarray:
        """The decoded digests chunk (shard_rows, DIGEST_BYTES) uint8 of a shard, cached."""
        hit = self._digest_chunks.get(shard)
        if hit is not None:
            self._digest_chunks.move_to_end(shard)
            return hit
        sr = self.spec.shard_rows
        if self._layout(DIGESTS_ARRAY) == "chunked":
            try:
                raw = self._read_file(DIGESTS_ARRAY, shard, rows)
                chunk = decode_chunk(raw, "|u1", (sr, DIGEST_BYTES))
            except ChunkError as exc:
                raise self._corrupt(DIGESTS_ARRAY, shard, rows, str(exc)) from exc
        else:
            block = self.block_of_row(shard * sr)
            chunk = self._read_block_rows(DIGESTS_ARRAY, block, shard * sr, (shard + 1) * sr)
        self._digest_chunks[shard] = chunk
        while len(self._digest_chunks) > 256:
            self._digest_chunks.popitem(last=False)
        return chunk

    def digest_mismatches(self, keys: Sequence[str], digests: Sequence[bytes]) -> list[int]:
        """Positions i where `digests[i]` (the frames' sample_digest) differs from the digest
        stored for `keys[i]`; rows without a recorded digest never mismatch."""
        stored = self.digests(keys)
        got = np.frombuffer(b"".join(digests), np.uint8).reshape(len(keys), DIGEST_BYTES)
        recorded = stored.any(axis=1)
        return np.flatnonzero(recorded & (stored != got).any(axis=1)).tolist()

    def digest_mismatch_error(self, key: str, got: bytes, frames: str) -> DigestMismatchError:
        """The error for a frame whose image bytes are not those the cache was built from:
        names the key, the frames' source and the cache's block source, with both digests."""
        block = self.block_of_row(self.row_of(key))
        stored = self.digests([key])[0].tobytes()
        return DigestMismatchError(
            f"Expected sample {key!r} of {frames} to hold the image cache {self.location!r} was "
            f"built from (block {block.index}, source {block.source}), got other image bytes "
            f"(digest {got.hex()}, stored {stored.hex()}): the frames and the cache come from "
            f"different data; rebuild the cache from these frames, or pass --on-mismatch skip "
            f"(on_mismatch='skip') to leave such samples out"
        )

    def _check_rows(self, rows: np.ndarray) -> None:
        rows = np.unique(rows)
        if not len(rows):
            return
        for edge in (rows[0], rows[-1]):
            self.table.block_of_row(int(edge))  # UnknownBlockError outside the table
        table = self.table
        at = np.searchsorted(table.row_start, rows, side="right") - 1
        bad = ~table.done[at] | (rows >= table.row_start[at] + table.count[at])
        if bad.any():
            row = int(rows[np.argmax(bad)])
            block = self.block_of_row(row)
            raise BlockNotDoneError(
                f"Expected row {row} in the written rows of a done block, got block "
                f"{block.index} ({block.source}, {block.status}, {block.count} rows)"
            )

    def _decode(
        self, layer: str, shard: int, local: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Decode rows `local` of `shard` for `layer` -> (rows, values, scales | None) and keep
        them in the row LRU. Direct path: exactly those rows. Zarr path: the whole shard's
        written rows in one slice (a prefetch of its other rows)."""
        spec, sr = self.spec.layer(layer), self.spec.shard_rows
        name = features_path(layer)
        if self._layout(name) == "sharded":
            values = self._direct_feature_rows(name, shard, local, (spec.tokens, spec.dim))
            rows = shard * sr + local
        else:
            block = self.block_of_row(shard * sr)
            stop = min((shard + 1) * sr, block.row_start + block.count)
            values = self._read_block_rows(name, block, shard * sr, stop)
            rows = np.arange(shard * sr, stop)
        self.shard_reads += 1
        self.rows_decoded += len(rows)
        scales = None
        if self.spec.codec in SCALED_CODECS:
            scales = self._scale_chunk(layer, shard, list(rows))[rows - shard * sr]
        for k, row in enumerate(rows.tolist()):
            self._lru[(layer, row)] = (values[k], None if scales is None else scales[k])
            self._lru_bytes += values[k].nbytes
        while self._lru_bytes > self.cache_bytes and self._lru:
            _, (v, _s) = self._lru.popitem(last=False)
            self._lru_bytes -= v.nbytes
        return rows, values, scales

    def _rows(self, keys: Iterable[str]) -> np.ndarray:
        return np.fromiter((self.row_of(k) for k in keys), dtype=np.int64)

    def read_rows_raw(
        self, rows: Sequence[int] | np.ndarray, layer: str
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Stored values of rows of done blocks: (n, T, D) int8|float16 and, for int8/int8c, scales
        (n, T) float32. Rows not in the LRU are grouped by shard and decoded together."""
        spec = self.spec.layer(layer)
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        self._check_rows(rows)
        sr = self.spec.shard_rows
        int8 = self.spec.codec in SCALED_CODECS
        uniq, inverse = np.unique(rows, return_inverse=True)
        values = np.empty((len(uniq), spec.tokens, spec.dim), np.int8 if int8 else np.float16)
        scales = np.empty((len(uniq), spec.tokens), np.float32) if int8 else None
        missing = []
        for i, row in enumerate(uniq.tolist()):
            entry = self._lru.get((spec.name, row))
            if entry is None:
                missing.append(i)
                continue
            self._lru.move_to_end((spec.name, row))
            values[i] = entry[0]
            if scales is not None:
                scales[i] = entry[1]
        if missing:
            want = uniq[missing]
            shards = want // sr
            for group in np.split(want, np.flatnonzero(np.diff(shards)) + 1):
                shard = int(group[0] // sr)
                got_rows, got, got_scales = self._decode(spec.name, shard, group - shard * sr)
                at = np.searchsorted(got_rows, group)  # got_rows is sorted and holds group
                dest = np.searchsorted(uniq, group)
                values[dest] = got[at]
                if scales is not None and got_scales is not None:
                    scales[dest] = got_scales[at]
        out = values[inverse] if len(uniq) != len(rows) or not np.all(np.diff(rows) > 0) else values
        out_scales = None if scales is None else scales[inverse]
        return out, out_scales

    def read_raw(self, keys: Sequence[str], layer: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Stored values without dequantizing: (int8 (n, T, D), float32 scales (n, T)) for int8
        and int8c (times `channel_scale(layer)` too for int8c),
        caches, (float16 (n, T, D), None) for fp16. x ~= values * scales[..., None]."""
        import torch

        values, scales = self.read_rows_raw(self._rows(keys), layer)
        return torch.from_numpy(values), None if scales is None else torch.from_numpy(scales)

    def read(self, keys: Sequence[str], layer: str) -> torch.Tensor:
        """Features of `keys` for `layer`: (len(keys), tokens, dim), float16 for fp16 caches,
        float32 (dequantized) for int8 and int8c caches."""
        import torch

        values, scales = self.read_rows_raw(self._rows(keys), layer)
        if scales is None:
            return torch.from_numpy(values)
        return torch.from_numpy(dequantize_int8(values, scales, self.channel_scale(layer)))

    def channel_scale(self, layer: str) -> np.ndarray | None:
        """The int8c channel scale of `layer`, float32 (dim,) (x ~= q * scale * channel_scale;
        pass it to `cosine_alignment_loss(..., channel_scale=)` with `read_raw` targets), or
        None for fp16 and int8 caches. Read once (crc32c checked), then kept."""
        spec = self.spec.layer(layer)
        if self.spec.codec not in CHANNEL_SCALED_CODECS:
            return None
        if spec.name not in self._channel_scales:
            name = channel_scales_path(spec.name)
            try:
                c = np.asarray(self._array(name)[:], dtype=np.float32)
            except Exception as exc:  # zarr raises ValueError (crc32c) or FileNotFoundError
                raise CorruptShardError(
                    f"Expected a readable channel scale array {str(self.path / name)!r} of the "
                    f"int8c cache, got {type(exc).__name__}: {exc}"
                ) from exc
            if c.shape != (spec.dim,) or not (np.isfinite(c).all() and (c > 0).all()):
                raise CorruptShardError(
                    f"Expected {spec.dim} finite positive values in {str(self.path / name)!r}, "
                    f"got shape {c.shape} (min {float(c.min()) if c.size else 'none'})"
                )
            self._channel_scales[spec.name] = c
        return self._channel_scales[spec.name]


def _reopen(path: str, cache_bytes: int, direct: bool) -> FeatureCache:
    return FeatureCache(path, cache_bytes=cache_bytes, direct=direct)
