"""Writing one block: `BlockWriter` streams a block's rows (validated, quantized, hashed) into
whole Zarr shards, each encoded in memory (`featurecache.chunk_codec`, byte for byte what
zarr-python would write) and written as one object; `finish` returns the
`BlockResult` (rows written, checksum, skipped keys) that `CacheWriter.mark_done` commits.

    bw = writer.open_block(0)            # a BlockWriter (featurecache.writer.CacheWriter)
    bw.append(keys, {"4": feats}, digests)   # (n, tokens, dim) float, numpy or torch
    result = bw.finish()

Padding rows are never written; a retried writer of the block replaces its shard objects whole
and `finish` deletes those past the rows written. A shard's objects (one per array) are encoded
and written by a small thread pool (zstd, crc32c and object-store PUTs run outside the GIL), at
most WRITE_WINDOW at once; `finish` waits for every one, so a block is only ever committed
whole. The checksum covers the written rows' stored bytes in FORMAT.md's order ("Block
checksum").
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from featurecache.chunk_codec import ArrayLayout, direct_layout
from featurecache.codecs import EncodedFeatures, quantize_int8, to_numpy_float
from featurecache.errors import (
    BlockCapacityError,
    FeatureCacheError,
    InvalidFeaturesError,
    InvalidKeyError,
    ShapeMismatchError,
    SpecMismatchError,
    StorageError,
    UnknownLayerError,
)
from featurecache.format import (
    CHECKSUM_PREFIX,
    DIGEST_BYTES,
    DIGESTS_ARRAY,
    GROUP_METADATA,
    KEYS_ARRAY,
    SCALED_CODECS,
    VIEW_PARAM_DTYPE,
    VIEW_PARAM_FIELDS,
    checksum_arrays,
    features_path,
    scales_path,
    shard_file,
    view_params_path,
)
from featurecache.layout import read_channel_scales
from featurecache.manifest import Block
from featurecache.spec import CacheSpec
from featurecache.store import open_store

_FP16_MAX = float(np.finfo(np.float16).max)
# Shard objects encoded and written at once: a shard of a DINOv2-B layer is ~12 MB and 4+ small
# objects ride along per shard; one after another, a bucket's 10-50 ms per PUT would cap a build
# at a few hundred frames/s.
WRITE_WINDOW = 8


@dataclass(frozen=True)
class BlockResult:
    """What a finished block reports to the driver: rows written, checksum, skipped keys."""

    index: int
    count: int
    checksum: str
    skipped: tuple[str, ...] = ()


def encode_key(key: str, key_bytes: int, where: str = "") -> bytes:
    """A sample key as its UTF-8 bytes; InvalidKeyError when empty, holding NUL or too long."""
    if not isinstance(key, str) or not key:
        raise InvalidKeyError(f"Expected a non-empty str key{where}, got {key!r}")
    raw = key.encode("utf-8")
    if b"\x00" in raw:
        raise InvalidKeyError(f"Expected a key without NUL characters{where}, got {key!r}")
    if len(raw) > key_bytes:
        raise InvalidKeyError(
            f"Expected a key of at most key_bytes={key_bytes} UTF-8 bytes{where}, got "
            f"{len(raw)} bytes: {key!r}"
        )
    return raw


def _digest_rows(digests: Any | None, n: int, where: str) -> np.ndarray:
    """Digests as given to append -> uint8 (n, DIGEST_BYTES) (zeros for None)."""
    if digests is None:
        return np.zeros((n, DIGEST_BYTES), dtype=np.uint8)
    if not isinstance(digests, np.ndarray):
        digests = list(digests)
        if not all(isinstance(d, bytes) and len(d) == DIGEST_BYTES for d in digests):
            raise ShapeMismatchError(
                f"Expected {n} digests of {DIGEST_BYTES} bytes (sample_digest){where}, got "
                f"{[type(d).__name__ for d in digests[:3]]}..."
            )
        digests = np.frombuffer(b"".join(digests), dtype=np.uint8).reshape(-1, DIGEST_BYTES)
    if digests.shape != (n, DIGEST_BYTES) or digests.dtype != np.uint8:
        raise ShapeMismatchError(
            f"Expected digests uint8 of shape {(n, DIGEST_BYTES)}{where}, got "
            f"{digests.dtype} {tuple(digests.shape)}"
        )
    return digests


class BlockWriter:
    """Streams one block: `append` batches, whole shards are encoded and written as they fill,
    `finish` writes the last (partial) shard and returns the BlockResult. Padding rows are never
    written. The checksum covers the written rows' stored bytes
    (FORMAT.md "Block checksum")."""

    def __init__(self, path: str | Path, spec: CacheSpec, block: Block) -> None:
        self.path, self.spec, self.block = Path(path), spec, block
        self.store = open_store(path)
        # Each shard is encoded in memory as its array's zarr.json lays it out, then written as
        # one whole object. Every written row's chunk is stored, all-zero ones too, so every
        # shard holding written rows has an object and a missing one means a loss.
        self._layouts = {name: self._layout(name) for name in checksum_arrays(spec)}
        self._hash = hashlib.sha256()
        self._channel_scales = read_channel_scales(path, spec)  # int8c: {layer: (dim,)}
        for layer in spec.layer_names:  # FORMAT.md: an int8c checksum starts with them
            if layer in self._channel_scales:
                self._hash.update(self._channel_scales[layer].astype("<f4").tobytes())
        self._buffers: dict[str, list[np.ndarray]] = {name: [] for name in self._layouts}
        self._buffered = 0
        self._written = 0
        self._seen: set[str] = set()
        self._skipped: list[str] = []
        self._finished = False
        self._pool: ThreadPoolExecutor | None = None  # encode + write, started with the first shard
        self._writes: list[Future] = []

    def _layout(self, name: str) -> ArrayLayout:
        """The layout of array `name` from its zarr.json; SpecMismatchError when it is not one
        featurecache writes (a chain of its own or another tool's)."""
        key = f"{name}/{GROUP_METADATA}"
        meta = json.loads(self.store.read(key))
        layout = direct_layout(meta)
        if layout is None:
            raise SpecMismatchError(
                f"Expected {self.store.url(key)!r} to lay out its chunks as featurecache writes "
                f"them (bytes -> [zstd] -> crc32c, FORMAT.md), got codecs {meta.get('codecs')!r}"
            )
        return layout

    @property
    def count(self) -> int:
        """Rows appended so far (written or buffered)."""
        return self._written + self._buffered

    def __enter__(self) -> BlockWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self._close()

    def _close(self) -> None:
        """Stop the write pool (what was submitted still runs to its end)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def _check_open(self) -> None:
        if self._finished:
            raise FeatureCacheError(
                f"Expected an open block writer, got block {self.block.index} finished"
            )

    def skip(self, key: str) -> None:
        """Record a bad frame's key as skipped (it gets no row)."""
        self._check_open()
        self._skipped.append(str(key))

    def append(
        self,
        keys: Sequence[str],
        features: dict[str, Any],
        digests: Any | None = None,
        *,
        view_features: Sequence[dict[str, Any]] = (),
        view_params: Any | None = None,
    ) -> None:
        """Append rows: keys (n,) unique str; features {layer: (n, tokens, dim) float array or
        tensor} for every layer of the spec (view 0: the frame); digests: each row's
        `sample_digest` of its source images, n bytes objects or uint8 (n, DIGEST_BYTES), None
        when the sources have no encoded bytes (stored as zeros: "not recorded"). A cache with
        views also takes view_features (views - 1 dicts like `features`, views 1..) and
        view_params float64 (n, views - 1, cameras, fields) (FORMAT.md "Views"). Validates
        everything before buffering anything."""
        self._check_open()
        keys = list(keys)
        n = len(keys)
        where = f" in block {self.block.index} ({self.block.source})"
        encoded = [encode_key(k, self.spec.key_bytes, where) for k in keys]
        digest_rows = _digest_rows(digests, n, where)
        batch_seen: set[str] = set()
        for k in keys:
            if k in self._seen or k in batch_seen:
                raise InvalidKeyError(f"Expected unique keys{where}, got {k!r} twice")
            batch_seen.add(k)
        if self.count + n > self.block.capacity:
            raise BlockCapacityError(
                f"Expected at most {self.block.capacity} rows in block {self.block.index} "
                f"({self.block.source}), got {self.count + n}"
            )
        views = self.spec.views
        if len(view_features) != views - 1 or (view_params is None) != (views == 1):
            raise ShapeMismatchError(
                f"Expected features and params of {views - 1} augmented view(s) (the cache has "
                f"{views} views per row), got {len(view_features)} view feature sets and "
                f"{'no' if view_params is None else 'some'} params{where}"
            )
        staged: dict[str, np.ndarray] = {}
        for view, feats in enumerate([features, *view_features]):
            staged |= self._stage_features(feats, keys, view, where)
        if views > 1:
            params = np.asarray(view_params)
            want = (n, views - 1, len(self.spec.view_cameras), len(VIEW_PARAM_FIELDS))
            if params.shape != want or params.dtype != np.dtype(VIEW_PARAM_DTYPE):
                raise ShapeMismatchError(
                    f"Expected view_params {VIEW_PARAM_DTYPE} of shape {want}, got "
                    f"{params.dtype} {tuple(params.shape)}{where}"
                )
            if not np.isfinite(params).all():
                raise InvalidFeaturesError(f"Expected finite view_params, got NaN/Inf{where}")
            for view in range(1, views):
                staged[view_params_path(view)] = np.ascontiguousarray(params[:, view - 1])
        key_rows = np.zeros((n, self.spec.key_bytes), dtype=np.uint8)
        for i, raw in enumerate(encoded):
            key_rows[i, : len(raw)] = np.frombuffer(raw, dtype=np.uint8)
        staged[KEYS_ARRAY] = key_rows
        staged[DIGESTS_ARRAY] = digest_rows
        for name, value in staged.items():
            self._buffers[name].append(value)
        self._seen |= batch_seen
        self._buffered += n
        while self._buffered >= self.spec.shard_rows:
            self._flush_shard()

    def _stage_features(
        self, features: dict[str, Any], keys: list[str], view: int, where: str
    ) -> dict[str, np.ndarray]:
        """One view's features {layer: (n, tokens, dim)} -> the stored arrays {path: values}
        (quantized for int8/int8c), after checking layers, shapes and finiteness."""
        n = len(keys)
        if view:
            where = f" of view {view}{where}"
        if set(features) != set(self.spec.layer_names):
            extra = sorted(set(map(str, features)) - set(self.spec.layer_names))
            if extra:
                raise UnknownLayerError(
                    f"Expected layers {list(self.spec.layer_names)}, got unknown {extra}{where}"
                )
            raise ShapeMismatchError(
                f"Expected features for every layer {list(self.spec.layer_names)}, got "
                f"{sorted(features)}{where}"
            )
        staged: dict[str, np.ndarray] = {}
        for layer in self.spec.layers:
            expected = (n, layer.tokens, layer.dim)
            if isinstance(features[layer.name], EncodedFeatures):
                staged |= self._stage_encoded(
                    features[layer.name], layer.name, expected, keys, view, where
                )
                continue
            x = to_numpy_float(features[layer.name])
            if tuple(x.shape) != expected:
                raise ShapeMismatchError(
                    f"Expected layer {layer.name!r} features of shape {expected}, got "
                    f"{tuple(x.shape)}{where}"
                )
            if x.dtype.kind != "f":
                raise ShapeMismatchError(
                    f"Expected float features for layer {layer.name!r}, got {x.dtype}{where}"
                )
            finite = np.isfinite(x).reshape(n, -1).all(axis=1)
            if self.spec.codec == "fp16":
                finite &= (np.abs(x).reshape(n, -1) <= _FP16_MAX).all(axis=1)
            if not finite.all():
                bad = keys[int(np.argmin(finite))]
                raise InvalidFeaturesError(
                    f"Expected finite{' fp16-range' if self.spec.codec == 'fp16' else ''} "
                    f"features for layer {layer.name!r}, got NaN/Inf/overflow at key {bad!r}{where}"
                )
            if self.spec.codec == "fp16":
                staged[features_path(layer.name, view)] = x.astype(np.float16)
            else:
                q, scale = quantize_int8(x, self._channel_scales.get(layer.name))
                staged[features_path(layer.name, view)] = q
                staged[scales_path(layer.name, view)] = scale
        return staged

    def _stage_encoded(
        self,
        encoded: EncodedFeatures,
        layer: str,
        expected: tuple[int, int, int],
        keys: list[str],
        view: int,
        where: str,
    ) -> dict[str, np.ndarray]:
        """A layer's features encoded on the teacher's device (`codecs.encode_torch`) -> the
        stored arrays, after checking dtypes, shapes and finiteness: a NaN/Inf input leaves a
        NaN/Inf scale (int8, int8c) or value (fp16), so no float copy is needed to refuse it."""
        int8 = self.spec.codec in SCALED_CODECS
        values, scales = encoded.values, encoded.scales
        want = np.dtype(np.int8 if int8 else np.float16)
        if values.dtype != want or tuple(values.shape) != expected:
            raise ShapeMismatchError(
                f"Expected layer {layer!r} encoded as {want} {expected} ({self.spec.codec}), got "
                f"{values.dtype} {tuple(values.shape)}{where}"
            )
        if int8 != (scales is not None) or (
            scales is not None and (scales.dtype != np.float32 or scales.shape != expected[:2])
        ):
            raise ShapeMismatchError(
                f"Expected layer {layer!r} scales float32 {expected[:2]} for {self.spec.codec}, "
                f"got {None if scales is None else (scales.dtype, tuple(scales.shape))}{where}"
            )
        checked = scales if scales is not None else values
        finite = np.isfinite(checked).reshape(len(keys), -1).all(axis=1)
        if not finite.all():
            raise InvalidFeaturesError(
                f"Expected finite{'' if int8 else ' fp16-range'} features for layer {layer!r}, "
                f"got NaN/Inf/overflow at key {keys[int(np.argmin(finite))]!r}{where}"
            )
        staged = {features_path(layer, view): values}
        if scales is not None:
            staged[scales_path(layer, view)] = scales
        return staged

    @property
    def channel_scales(self) -> dict[str, np.ndarray]:
        """The int8c channel scale of each layer, float32 (dim,) ({} for fp16 and int8): what
        `codecs.encode_torch` needs to encode on the teacher's device."""
        return dict(self._channel_scales)

    def _flush_shard(self) -> None:
        """Write the next shard from the buffers: all of it, or for the block's last shard only the
        written rows (the shard is new, so Zarr's partial write leaves padding chunks absent)."""
        sr = self.spec.shard_rows
        take = min(self._buffered, sr)
        start = self.block.row_start + self._written
        assert start % sr == 0, "blocks start on shard boundaries and shards flush whole"
        for name in checksum_arrays(self.spec):  # hashing order of FORMAT.md
            parts = self._buffers[name]
            data = np.concatenate(parts) if len(parts) > 1 else parts[0]
            head, rest = data[:take], data[take:]
            self._buffers[name] = [rest] if len(rest) else []
            self._hash.update(np.ascontiguousarray(head))  # its bytes, without a copy
            layout = self._layouts[name]
            key = shard_file(name, 1 + len(layout.row_shape), start // sr)
            if self._pool is None:
                self._pool = ThreadPoolExecutor(WRITE_WINDOW, thread_name_prefix="fc-write")
            self._writes.append(self._pool.submit(self._write_object, key, layout, head))
        while len(self._writes) > 2 * WRITE_WINDOW:  # bounded: encoded shards waiting to go
            self._writes.pop(0).result()
        self._buffered -= take
        self._written += take

    def _write_object(self, key: str, layout: ArrayLayout, rows: np.ndarray) -> None:
        """Encode one shard object of `rows` and write it whole (a pool thread)."""
        try:
            self.store.put(key, layout.encode(rows))
        except OSError as exc:  # disk full, read-only: the block stays pending
            raise StorageError(
                f"Expected to write {self.store.url(key)!r} (block {self.block.index}, "
                f"{self.block.source}), got {exc.strerror or exc}; done blocks are kept and "
                f"this one stays pending: free space or fix permissions, then rerun to resume"
            ) from exc

    def finish(self) -> BlockResult:
        """Write what is buffered, wait for every shard object to be written, delete the block's
        shard objects past the rows written (an earlier attempt's), and return the result for
        CacheWriter.mark_done."""
        self._check_open()
        if self._buffered:
            self._flush_shard()
        try:
            for write in self._writes:
                write.result()  # the first failed write raises here: the block stays pending
        finally:
            self._writes.clear()
            self._close()
        sr = self.spec.shard_rows
        for s in range(-(-(self.block.row_start + self._written) // sr), self.block.row_stop // sr):
            for name, layout in self._layouts.items():
                self.store.delete(shard_file(name, 1 + len(layout.row_shape), s))
        self._finished = True
        return BlockResult(
            index=self.block.index,
            count=self._written,
            checksum=CHECKSUM_PREFIX + self._hash.hexdigest(),
            skipped=tuple(self._skipped),
        )
