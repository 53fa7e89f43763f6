"""The read side: `open_cache(path)` -> FeatureCache, which maps sample keys to rows through the
done blocks' stored keys and reads features batched and grouped by Zarr shard.

Reading a shard's rows costs one decode of the whole shard (one Zarr slice over its written rows);
decoded shards stay in a small LRU (by bytes), so reading keys in block order, or shuffled within
a window of a few shards (what a WebDataset shuffle buffer produces), decodes each shard once.
"""

from __future__ import annotations

import bisect
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr
from zarr.storage import LocalStore

from featurecache.codecs import dequantize_int8
from featurecache.errors import (
    BlockNotDoneError,
    CorruptShardError,
    InvalidKeyError,
    NotACacheError,
    UnknownKeyError,
)
from featurecache.format import (
    KEYS_ARRAY,
    Block,
    CacheSpec,
    Manifest,
    features_path,
    read_manifest,
    scales_path,
    shard_file,
)

DEFAULT_CACHE_BYTES = 512 << 20  # 512 MiB of decoded shards per FeatureCache (per worker)


def decode_keys(raw: np.ndarray) -> list[str]:
    """uint8 (n, key_bytes) NUL-padded UTF-8 rows -> n keys ("" for an all-NUL row)."""
    return [bytes(r).rstrip(b"\x00").decode("utf-8") for r in np.asarray(raw, dtype=np.uint8)]


def open_cache(path: str | Path, *, cache_bytes: int = DEFAULT_CACHE_BYTES) -> FeatureCache:
    """Open the cache at `path` for reading. NotACacheError when it is not one,
    FormatVersionError when a newer featurecache wrote it."""
    return FeatureCache(path, cache_bytes=cache_bytes)


class FeatureCache:
    """A cache opened for reading: `.spec`, `.manifest`, `.keys`, `.row_of(key)`, `key in cache`,
    `.read(keys, layer)`, `.read_raw(keys, layer)`. Picklable: a copy in a DataLoader worker
    reopens the files itself on first use (it carries only the path)."""

    def __init__(self, path: str | Path, *, cache_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        self.path = Path(path)
        self.cache_bytes = int(cache_bytes)
        self.manifest: Manifest = read_manifest(self.path)
        for layer in self.spec.layer_names:
            if not (self.path / features_path(layer) / "zarr.json").exists():
                raise NotACacheError(
                    f"Expected array {features_path(layer)!r} in {str(self.path)!r}, found none"
                )
        self._store: LocalStore | None = None
        self._arrays: dict[str, zarr.Array] = {}
        self._keys: list[str] | None = None
        self._row_of: dict[str, int] | None = None
        self._block_starts = [b.row_start for b in self.manifest.blocks]
        self._lru: OrderedDict[tuple[str, int], tuple[np.ndarray, np.ndarray | None]] = (
            OrderedDict()
        )
        self._lru_bytes = 0
        self.decoded_shards = 0  # how many shard decodes happened (for tests and benchmarks)

    # ---- pickling: carry the path only ------------------------------------------------------
    def __reduce__(self) -> tuple[Any, ...]:
        return (_reopen, (str(self.path), self.cache_bytes))

    def __repr__(self) -> str:
        done = len(self.manifest.done_blocks)
        return (
            f"FeatureCache({str(self.path)!r}, codec={self.spec.codec}, layers="
            f"{list(self.spec.layer_names)}, blocks done {done}/{len(self.manifest.blocks)})"
        )

    @property
    def spec(self) -> CacheSpec:
        return self.manifest.spec

    # ---- key index --------------------------------------------------------------------------
    def _array(self, name: str) -> zarr.Array:
        arr = self._arrays.get(name)
        if arr is None:
            if self._store is None:
                self._store = LocalStore(self.path, read_only=True)
            arr = zarr.open_array(self._store, path=name, mode="r")
            self._arrays[name] = arr
        return arr

    def _read_block_rows(self, name: str, block: Block, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of array `name`, inside `block`; CorruptShardError naming the shard
        file, block and row range when a file is missing or fails its crc32c."""
        sr = self.spec.shard_rows
        ndim = 3 if name.startswith("features/") else 2
        for s in range(start // sr, (stop - 1) // sr + 1):
            file = self.path / shard_file(name, ndim, s)
            if not file.exists():
                raise CorruptShardError(
                    f"Expected shard file {str(file)!r} of block {block.index} ({block.source}) "
                    f"rows [{start}, {stop}), found none"
                )
        try:
            return np.asarray(self._array(name)[start:stop])
        except Exception as exc:  # zarr raises ValueError (crc32c) or decoder errors
            files = [
                str(self.path / shard_file(name, ndim, s))
                for s in range(start // sr, (stop - 1) // sr + 1)
            ]
            raise CorruptShardError(
                f"Expected readable shard file(s) {files} of block {block.index} "
                f"({block.source}) rows [{start}, {stop}), got {type(exc).__name__}: {exc}"
            ) from exc

    def _ensure_index(self) -> None:
        if self._row_of is not None:
            return
        keys: list[str] = []
        row_of: dict[str, int] = {}
        for block in self.manifest.done_blocks:
            if not block.count:
                continue
            stop = block.row_start + block.count
            block_keys = decode_keys(
                self._read_block_rows(KEYS_ARRAY, block, block.row_start, stop)
            )
            for i, key in enumerate(block_keys):
                row = block.row_start + i
                if key in row_of:
                    other = self.block_of_row(row_of[key])
                    raise InvalidKeyError(
                        f"Expected unique keys in {str(self.path)!r}, got {key!r} at rows "
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
        i = bisect.bisect_right(self._block_starts, row) - 1
        if i < 0 or row >= self.manifest.blocks[i].row_stop:
            raise IndexError(f"Expected a row in [0, {self.manifest.rows}), got {row}")
        return self.manifest.blocks[i]

    def row_of(self, key: str) -> int:
        """The row of `key`; UnknownKeyError, or BlockNotDoneError when it is in a pending block."""
        self._ensure_index()
        assert self._row_of is not None
        row = self._row_of.get(key)
        if row is None:
            self._raise_missing(key)
        return row  # type: ignore[return-value]

    def _raise_missing(self, key: str) -> None:
        for block in self.manifest.blocks:
            if block.done or not block.capacity:
                continue
            try:  # what a pending block's writer has written so far
                raw = np.asarray(self._array(KEYS_ARRAY)[block.row_start : block.row_stop])
            except Exception:
                continue
            if key in decode_keys(raw):
                raise BlockNotDoneError(
                    f"Expected key {key!r} in a done block of {str(self.path)!r}, got it in "
                    f"block {block.index} ({block.source}) which is {block.status}"
                )
        raise UnknownKeyError(
            f"Expected a key of {str(self.path)!r}, got {key!r} (no done block holds it)"
        )

    # ---- reading ----------------------------------------------------------------------------
    def _shard(self, layer: str, shard: int) -> tuple[np.ndarray, np.ndarray | None]:
        """A shard's decoded written rows: values (m, T, D) int8/float16, scales (m, T) or None."""
        hit = self._lru.get((layer, shard))
        if hit is not None:
            self._lru.move_to_end((layer, shard))
            return hit
        sr = self.spec.shard_rows
        block = self.block_of_row(shard * sr)
        start, stop = shard * sr, min((shard + 1) * sr, block.row_start + block.count)
        values = self._read_block_rows(features_path(layer), block, start, stop)
        scales = None
        if self.spec.codec == "int8":
            scales = self._read_block_rows(scales_path(layer), block, start, stop)
        self.decoded_shards += 1
        entry = (values, scales)
        size = values.nbytes + (scales.nbytes if scales is not None else 0)
        self._lru[(layer, shard)] = entry
        self._lru_bytes += size
        while self._lru_bytes > self.cache_bytes and len(self._lru) > 1:
            _, (v, s) = self._lru.popitem(last=False)
            self._lru_bytes -= v.nbytes + (s.nbytes if s is not None else 0)
        return entry

    def _rows(self, keys: Iterable[str]) -> np.ndarray:
        return np.fromiter((self.row_of(k) for k in keys), dtype=np.int64)

    def read_rows_raw(
        self, rows: Sequence[int] | np.ndarray, layer: str
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Stored values of rows (which must lie in done blocks): (n, T, D) int8|float16 and, for
        int8, scales (n, T) float32; grouped by shard, each needed shard decoded once."""
        spec = self.spec.layer(layer)
        rows = np.asarray(rows, dtype=np.int64)
        n, sr = len(rows), self.spec.shard_rows
        dtype = np.int8 if self.spec.codec == "int8" else np.float16
        out = np.empty((n, spec.tokens, spec.dim), dtype=dtype)
        out_scales = np.empty((n, spec.tokens), np.float32) if self.spec.codec == "int8" else None
        shards = rows // sr
        order = np.argsort(shards, kind="stable")
        bounds = np.flatnonzero(np.diff(shards[order])) + 1
        for group in np.split(order, bounds) if n else []:
            shard = int(shards[group[0]])
            values, scales = self._shard(spec.name, shard)
            local = rows[group] - shard * sr
            out[group] = values[local]
            if out_scales is not None and scales is not None:
                out_scales[group] = scales[local]
        return out, out_scales

    def read_raw(self, keys: Sequence[str], layer: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Stored values without dequantizing: (int8 (n, T, D), float32 scales (n, T)) for int8
        caches, (float16 (n, T, D), None) for fp16. x ~= values * scales[..., None]."""
        values, scales = self.read_rows_raw(self._rows(keys), layer)
        return torch.from_numpy(values), None if scales is None else torch.from_numpy(scales)

    def read(self, keys: Sequence[str], layer: str) -> torch.Tensor:
        """Features of `keys` for `layer`: (len(keys), tokens, dim), float16 for fp16 caches,
        float32 (dequantized) for int8 caches."""
        values, scales = self.read_rows_raw(self._rows(keys), layer)
        if scales is None:
            return torch.from_numpy(values)
        return torch.from_numpy(dequantize_int8(values, scales))


def _reopen(path: str, cache_bytes: int) -> FeatureCache:
    return FeatureCache(path, cache_bytes=cache_bytes)
