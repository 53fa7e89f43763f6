"""The write side: create a cache from a spec and a block plan, then write blocks, each in one
streaming pass, from any number of processes.

    writer = create_cache(path, spec, plan_blocks([("frames-000000.tar", 1000), ...], 64))
    bw = writer.open_block(0)
    bw.append(keys, {"4": feats})        # (n, tokens, dim) float, numpy or torch
    writer.mark_done(bw.finish())        # finish() writes the last shard; mark_done commits it

A block owns whole Zarr shards, so writers of different blocks never touch one object. Each shard
is encoded in memory and written as one whole object (a local file replaced atomically, or one
PUT), so a retried or concurrent writer of the same block only replaces objects whole; `finish`
deletes the block's shards beyond the rows written (left by an earlier attempt). Completing a
block is one small create-if-absent record (featurecache.completion): no lock, no rewrite, the
same cost at 100 blocks or 100,000. The cache lives in any store (featurecache.store): a local
folder, s3://, gs://, memory://.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.core.buffer import default_buffer_prototype
from zarr.storage import MemoryStore

from featurecache.codecs import check_channel_scale, inner_codecs, quantize_int8, to_numpy_float
from featurecache.completion import (
    PLAN_OBJECT,
    BlockTable,
    CacheState,
    DoneRecord,
    clear_record,
    commit_record,
    header_json,
    is_done,
    load_state,
    plan_bytes,
    write_snapshot,
)
from featurecache.errors import (
    BlockAlreadyDoneError,
    BlockCapacityError,
    CacheBusyError,
    FeatureCacheError,
    FormatVersionError,
    InvalidFeaturesError,
    InvalidKeyError,
    NotACacheError,
    ShapeMismatchError,
    SpecMismatchError,
    StorageError,
    UnknownLayerError,
)
from featurecache.format import (
    ATTRS_KEY,
    CHANNEL_SCALED_CODECS,
    CHECKSUM_PREFIX,
    DIGEST_BYTES,
    DIGEST_DTYPE,
    DIGESTS_ARRAY,
    FEATURE_DTYPE,
    FORMAT_VERSION,
    GROUP_METADATA,
    KEY_DTYPE,
    KEYS_ARRAY,
    SCALE_DTYPE,
    SCALED_CODECS,
    STATUS_PENDING,
    Block,
    CacheSpec,
    acquire_build_lock,
    channel_scale_arrays,
    channel_scales_path,
    checksum_arrays,
    features_path,
    scales_path,
    shard_file,
)
from featurecache.lease import LEASE_PREFIX, Lease, acquire_lease, holds_only_leases
from featurecache.store import Store, open_store

_FP16_MAX = float(np.finfo(np.float16).max)


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


def _validate_plan(spec: CacheSpec, plan: Sequence[Block]) -> tuple[Block, ...]:
    row = 0
    blocks = []
    for i, b in enumerate(plan):
        if b.index != i or b.row_start != row:
            raise SpecMismatchError(
                f"Expected block {i} to start at row {row}, got index {b.index} row_start "
                f"{b.row_start} (use plan_blocks)"
            )
        if b.capacity % spec.shard_rows or b.count > b.capacity or b.count < 0:
            raise SpecMismatchError(
                f"Expected block {i} to own whole shards of {spec.shard_rows} rows holding its "
                f"count, got rows [{b.row_start}, {b.row_stop}) for count {b.count}"
            )
        blocks.append(replace(b, status=STATUS_PENDING, checksum=None, skipped=()))
        row = b.row_stop
    return tuple(blocks)


def _diff(a: dict[str, Any], b: dict[str, Any]) -> str:
    keys = sorted(set(a) | set(b))
    parts = [
        f"{k}: existing {a.get(k)!r} vs requested {b.get(k)!r}"
        for k in keys
        if a.get(k) != b.get(k)
    ]
    return "; ".join(parts)


def _create_arrays(
    store: Any, spec: CacheSpec, rows: int, channel_scales: dict[str, np.ndarray]
) -> None:
    zarr.create_group(store=store, zarr_format=3)
    sr = spec.shard_rows
    zarr.create_array(
        store, name=KEYS_ARRAY, shape=(rows, spec.key_bytes), chunks=(sr, spec.key_bytes),
        dtype=KEY_DTYPE, fill_value=0, dimension_names=("row", "byte"), **inner_codecs(),
        attributes={ATTRS_KEY: {"role": "keys", "encoding": "utf-8, NUL-padded"}},
    )  # fmt: skip
    zarr.create_array(
        store, name=DIGESTS_ARRAY, shape=(rows, DIGEST_BYTES), chunks=(sr, DIGEST_BYTES),
        dtype=DIGEST_DTYPE, fill_value=0, dimension_names=("row", "byte"), **inner_codecs(),
        attributes={ATTRS_KEY: {"role": "digests", "digest": "sample_digest (FORMAT.md)"}},
    )  # fmt: skip
    for layer in spec.layers:
        t, d = layer.tokens, layer.dim
        zarr.create_array(
            store, name=features_path(layer.name), shape=(rows, t, d), chunks=(1, t, d),
            shards=(sr, t, d), dtype=FEATURE_DTYPE[spec.codec], fill_value=0,
            dimension_names=("row", "token", "dim"), **inner_codecs(),
            attributes={ATTRS_KEY: {"role": "features", "layer": layer.name, "codec": spec.codec,
                                    "grid": list(layer.grid) if layer.grid else None}},
        )  # fmt: skip
        if spec.codec in SCALED_CODECS:
            zarr.create_array(
                store, name=scales_path(layer.name), shape=(rows, t), chunks=(sr, t),
                dtype=SCALE_DTYPE, fill_value=0, dimension_names=("row", "token"),
                **inner_codecs(), attributes={ATTRS_KEY: {"role": "scales", "layer": layer.name,
                "dequantize": "features[r, t, :] * scales[r, t]"}},
            )  # fmt: skip
        if spec.codec in CHANNEL_SCALED_CODECS:  # written once, here, before any block
            arr = zarr.create_array(
                store, name=channel_scales_path(layer.name), shape=(d,), chunks=(d,),
                dtype=SCALE_DTYPE, fill_value=0, dimension_names=("dim",), **inner_codecs(),
                attributes={ATTRS_KEY: {"role": "channel_scales", "layer": layer.name,
                "dequantize": "features[r, t, :] * scales[r, t] * channel_scales[:]"}},
            )  # fmt: skip
            arr[:] = channel_scales[layer.name]


def _check_channel_scales(
    spec: CacheSpec, channel_scales: Mapping[str, Any] | None, *, required: bool
) -> dict[str, np.ndarray]:
    """{layer: float32 (dim,)} for an int8c spec (every layer, finite and positive; {} when none
    are given and none are `required`), {} for other codecs; InvalidFeaturesError or
    SpecMismatchError naming the layer otherwise."""
    if spec.codec not in CHANNEL_SCALED_CODECS:
        if channel_scales:
            raise SpecMismatchError(
                f"Expected no channel_scales for codec {spec.codec!r} (only int8c has them), got "
                f"{sorted(channel_scales)}"
            )
        return {}
    given = dict(channel_scales or {})
    if not given and not required:
        return {}
    if set(map(str, given)) != set(spec.layer_names):
        raise InvalidFeaturesError(
            f"Expected channel_scales for every layer {list(spec.layer_names)} of an int8c cache "
            f"(featurecache.calibrate_channel_scale of a sample of each layer), got "
            f"{sorted(map(str, given))}"
        )
    return {
        layer.name: check_channel_scale(given[layer.name], layer.dim, f"layer {layer.name!r}")
        for layer in spec.layers
    }


def read_channel_scales(path: str | Path, spec: CacheSpec) -> dict[str, np.ndarray]:
    """{layer: float32 (dim,)} stored in an int8c cache ({} for other codecs)."""
    if not channel_scale_arrays(spec):
        return {}
    store = open_store(path).zarr_store(read_only=True)
    return {
        name.split("/", 1)[1]: np.asarray(zarr.open_array(store, path=name, mode="r")[:])
        for name in channel_scale_arrays(spec)
    }


def _check_same_channel_scales(
    path: str | Path, spec: CacheSpec, wanted: dict[str, np.ndarray]
) -> None:
    """On resume: channel scales given for an existing int8c cache must equal the stored ones."""
    if not wanted:
        return
    stored = read_channel_scales(path, spec)
    for layer, c in wanted.items():
        if not np.array_equal(stored[layer], c):
            raise SpecMismatchError(
                f"Expected the cache at {str(path)!r} to hold the requested channel scales of "
                f"layer {layer!r}, got different stored values (pass no channel_scales to resume "
                f"with the stored ones, or overwrite=True to start over)"
            )


def create_cache(
    path: str | Path,
    spec: CacheSpec,
    plan: Sequence[Block],
    *,
    overwrite: bool = False,
    exclusive: bool = False,
    channel_scales: Mapping[str, Any] | None = None,
) -> CacheWriter:
    """Create the cache at `path` for `spec` and `plan` (see plan_blocks) and return its writer.

    An existing cache with the same spec and plan is reopened (resume: done blocks stay done);
    a different spec, fingerprint or plan raises SpecMismatchError showing both, unless
    overwrite=True, which deletes the old cache first. A non-empty folder that is not a cache is
    never deleted (NotACacheError). `path`: a local folder or a URL (s3://, gs://, memory://).
    A local cache appears atomically (built beside, then renamed), with the permissions the
    umask gives new folders; in an object store the group's zarr.json is written last, only if
    absent, so of two creators one wins and the other compares its spec and plan with it.

    exclusive=True (a build's driver): the writer holds the build lock (local: fcntl; object
    store: a renewed lease, featurecache.lease) until `writer.close()`; another exclusive writer
    (a second build) gets CacheBusyError, checked before anything is compared or deleted, so
    `overwrite` never deletes a running build's work.

    channel_scales: {layer: (dim,) positive floats}, required to create an int8c cache (see
    `calibrate_channel_scale`; fixed before any block is written, since blocks are written in
    parallel), never for other codecs. Resuming an int8c cache needs none (the stored ones are
    used); given, they must equal the stored ones (SpecMismatchError).
    """
    scales = _check_channel_scales(spec, channel_scales, required=False)
    st = open_store(path)
    table = BlockTable.from_blocks(_validate_plan(spec, plan))
    root = st.local_root
    if root is not None and root.exists() and not root.is_dir():
        raise NotACacheError(f"Expected a folder (or nothing) at {st.location!r}, got a file")
    if root is None:
        return _open_in_store(st, spec, table, channel_scales, overwrite, exclusive)
    lock: int | None = None
    if st.exists(GROUP_METADATA) or not st.is_empty():
        existing = load_state(st)  # NotACacheError for a non-empty non-cache location
        lock = acquire_build_lock(root, root) if exclusive else None
        try:
            if not overwrite:
                _check_same(st, existing, spec, table)
                _check_same_channel_scales(st.location, spec, scales)
                return CacheWriter(st.location, lock=lock)
            shutil.rmtree(root)
        except BaseException:
            if lock is not None:
                os.close(lock)
            raise
    scales = _check_channel_scales(spec, channel_scales, required=True)
    return _create_new(root, spec, table, lock, exclusive, scales)


def _open_in_store(
    st: Store,
    spec: CacheSpec,
    table: BlockTable,
    channel_scales: Mapping[str, Any] | None,
    overwrite: bool,
    exclusive: bool,
) -> CacheWriter:
    """create_cache in an object store: with `exclusive`, the build lease first (lease.py: one
    build at a time, no lock service needed); then reopen, overwrite or create (zarr.json last,
    only if absent: of two creators one wins, the other compares its spec and plan)."""
    lease = acquire_lease(st) if exclusive else None
    try:
        if st.exists(GROUP_METADATA) or not holds_only_leases(st):
            existing = load_state(st)  # NotACacheError for a non-empty non-cache location
            if not overwrite:
                _check_same(st, existing, spec, table)
                given = _check_channel_scales(spec, channel_scales, required=False)
                _check_same_channel_scales(st.location, spec, given)
                return CacheWriter(st.location, lease=lease)
            for key, _ in st.list(""):  # zarr.json sorts last: the cache stops existing last
                if not key.startswith(LEASE_PREFIX):
                    st.delete(key)
        scales = _check_channel_scales(spec, channel_scales, required=True)
        if not _write_new_cache(st, spec, table, scales):  # another creator won: same cache?
            _check_same(st, load_state(st), spec, table)
            _check_same_channel_scales(st.location, spec, scales)
        return CacheWriter(st.location, lease=lease)
    except BaseException:
        if lease is not None:
            lease.release()
        raise


def _write_new_cache(
    st: Store, spec: CacheSpec, table: BlockTable, channel_scales: dict[str, np.ndarray]
) -> bool:
    """Write a new cache's objects into `st`: the arrays' metadata (encoded in memory by zarr)
    and the plan, then the group's zarr.json with the header, created only if absent (it makes
    the cache exist). Returns whether this call created it."""
    encoded: dict[str, Any] = {}
    _create_arrays(MemoryStore(store_dict=encoded), spec, table.rows, channel_scales)
    group = json.loads(encoded.pop(GROUP_METADATA).to_bytes())
    for key in sorted(encoded):
        st.put(key, encoded[key].to_bytes())
    st.put(PLAN_OBJECT, plan_bytes(table))
    group.setdefault("attributes", {})[ATTRS_KEY] = header_json(spec, table)
    return st.create(GROUP_METADATA, json.dumps(group, indent=2).encode())


def _create_new(
    path: Path,
    spec: CacheSpec,
    table: BlockTable,
    lock: int | None,
    exclusive: bool,
    channel_scales: dict[str, np.ndarray],
) -> CacheWriter:
    """Build the cache in a temp folder beside `path` and rename it into place (atomic). With
    `exclusive`, the build lock is taken on the temp folder's lock file before the rename, so the
    cache is never visible unlocked; `lock` (the old cache's, if any) is released."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # mkdir honours the umask (tempfile.mkdtemp would make the cache 0700)
        tmp = path.parent / f".{path.name}.creating-{os.getpid()}-{secrets.token_hex(4)}"
        tmp.mkdir()
    except OSError as exc:
        raise StorageError(
            f"Expected to create the cache folder {str(path)!r}, got {exc.strerror or exc} "
            f"(choose a writable location)"
        ) from exc
    try:
        _write_new_cache(open_store(tmp), spec, table, channel_scales)
        if exclusive:  # the new cache's lock, then the old one's (if any) is let go
            old, lock = lock, acquire_build_lock(tmp, path)
            if old is not None:
                os.close(old)
        try:
            os.rename(tmp, path)  # atomic; replaces an empty folder; fails if another won
        except OSError:
            if not (path.is_dir() and (path / GROUP_METADATA).exists()):
                raise
            if lock is not None:  # another process created it first: lock and compare that one
                os.close(lock)
                lock = None
                lock = acquire_build_lock(path, path)
            st = open_store(path)
            _check_same(st, load_state(st), spec, table)
            _check_same_channel_scales(path, spec, channel_scales)
        return CacheWriter(path, lock=lock)
    except BaseException as exc:
        if lock is not None:
            os.close(lock)
        if isinstance(exc, OSError):
            raise StorageError(
                f"Expected to create the cache {str(path)!r}, got {exc.strerror or exc} in "
                f"{exc.filename or str(tmp)!r} (nothing was written there; free space or choose "
                f"a writable location)"
            ) from exc
        raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _check_same(st: Store, existing: CacheState, spec: CacheSpec, table: BlockTable) -> None:
    if existing.spec != spec:
        raise SpecMismatchError(
            f"Expected the cache at {st.location!r} to match the requested spec, got "
            f"{_diff(existing.spec.to_json(), spec.to_json())} (pass overwrite=True to "
            f"start over)"
        )
    if not existing.table.same_plan(table):

        def show(t: BlockTable) -> str:
            first = [t.block(i) for i in range(min(4, len(t)))]
            return ", ".join(f"{b.source}[{b.row_start}:{b.row_stop}]" for b in first) + (
                f", ... ({len(t)} blocks)" if len(t) > 4 else ""
            )

        raise SpecMismatchError(
            f"Expected the cache at {st.location!r} to have the requested block plan, got "
            f"existing {show(existing.table)} vs requested {show(table)} (pass overwrite=True to "
            f"start over)"
        )


def open_writer(path: str | Path) -> CacheWriter:
    """The writer of an existing cache (e.g. in a Ray actor; the driver created it)."""
    return CacheWriter(path)


class CacheWriter:
    """Writes blocks of one cache. Cheap to create and picklable (holds only the path; a copy
    never holds the build lock). The writer of `create_cache(..., exclusive=True)` holds the
    build lock until `close()` (or the end of a `with` block, or of the process)."""

    def __init__(
        self, path: str | Path, *, lock: int | None = None, lease: Lease | None = None
    ) -> None:
        self.path = Path(path)
        self.location = str(path)  # a local path or a URL
        self.store = open_store(path)
        self._lock = lock
        self._lease = lease
        self.manifest: CacheState = load_state(self.store)  # spec, version, block table
        if self.manifest.version != FORMAT_VERSION:  # e.g. version 1: no digests array
            self.close()
            raise FormatVersionError(
                f"Expected a cache of format version {FORMAT_VERSION} to write into, got version "
                f"{self.manifest.version} at {str(self.path)!r} (it stays readable; rebuild it "
                f"into a new folder, or with --overwrite, to resume or extend it)"
            )

    def __reduce__(self) -> tuple[Any, ...]:
        return (CacheWriter, (self.location,))

    def close(self) -> None:
        """Release the build lock or lease, if this writer holds one (idempotent)."""
        lock, self._lock = self._lock, None
        if lock is not None:
            os.close(lock)
        lease, self._lease = self._lease, None
        if lease is not None:
            lease.release()

    def __enter__(self) -> CacheWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()

    @property
    def spec(self) -> CacheSpec:
        return self.manifest.spec

    def refresh(self) -> CacheState:
        """Re-read the cache's state (other processes may have completed blocks)."""
        self.manifest = load_state(self.store)
        return self.manifest

    def open_block(self, index: int, *, overwrite: bool = False) -> BlockWriter:
        """A BlockWriter for block `index`. A done block (one with a completion record) raises
        BlockAlreadyDoneError unless overwrite=True (then its record and the snapshots go first,
        so readers see it pending). Nothing else is deleted here: the block's shard objects are
        replaced whole as they are written, and `finish` deletes those past the rows written."""
        block = self.manifest.table.block(index)
        if is_done(self.store, block.index):
            if not overwrite:
                raise BlockAlreadyDoneError(
                    f"Expected a pending block, got block {index} ({block.source}) already done "
                    f"in {self.location!r} (pass overwrite=True to rewrite it)"
                )
            clear_record(self.store, block.index)
            self.manifest.table.unmark(block.index)
        planned = int(self.manifest.table.planned[block.index])
        block = replace(block, status=STATUS_PENDING, count=planned, checksum=None, skipped=())
        return BlockWriter(self.location, self.spec, block)

    def note_done(self, result: BlockResult) -> None:
        """Note in this writer's table a block that another process (a worker) committed, without
        any I/O: the build driver's view, from which it writes snapshots. CacheBusyError when
        this writer's lease was taken over (it stalled past its expiry): the driver stops."""
        if self._lease is not None and self._lease.lost:
            raise CacheBusyError(
                f"Expected to hold the build lease of {self.location!r}, got it taken over by "
                f"another build after ours expired (this build stalled); it continues the cache"
            )
        self.manifest.table.mark(
            DoneRecord(index=result.index, count=result.count, checksum=result.checksum,
                       skipped=tuple(result.skipped)),
            self.location,
        )  # fmt: skip

    def snapshot(self) -> bool:
        """Write a snapshot of the done blocks this writer knows, as a new object (readers then
        read it instead of one record per block); False if one of that coverage exists."""
        return write_snapshot(self.store, self.manifest.table)

    def mark_done(self, result: BlockResult) -> Block:
        """Commit a finished block: create its completion record (a few hundred bytes, created
        only if absent; no lock, whatever the number of blocks), by whoever finished the block
        (a build's worker). An identical record already there is accepted (a retried or second
        writer of the same block); a different one raises BlockConflictError."""
        table = self.manifest.table
        block = table.block(result.index)
        if not 0 <= result.count <= block.capacity:
            raise BlockCapacityError(
                f"Expected a count in [0, {block.capacity}] for block {result.index}, got "
                f"{result.count}"
            )
        if result.count:
            sr = self.spec.shard_rows
            last = shard_file(KEYS_ARRAY, 2, (block.row_start + result.count - 1) // sr)
            if not self.store.exists(last):
                raise FeatureCacheError(
                    f"Expected block {result.index}'s data in {self.store.url(last)!r} "
                    f"before marking it done, found no object"
                )
        record = DoneRecord(
            index=result.index,
            count=result.count,
            checksum=result.checksum,
            skipped=tuple(result.skipped),
        )
        commit_record(self.store, record)
        table.mark(record, self.location)
        return table.block(result.index)


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
        # Shards are encoded by zarr into memory (arrays with the cache's own metadata), then each
        # is written as one whole object. write_empty_chunks: an all-zero written row is stored
        # too, so every shard holding written rows has an object and a missing one means a loss.
        self._encoded: dict[str, Any] = {}
        proto = default_buffer_prototype()
        for name in checksum_arrays(spec):
            meta = self.store.read(f"{name}/{GROUP_METADATA}")
            self._encoded[f"{name}/{GROUP_METADATA}"] = proto.buffer.from_bytes(meta)
        memory = MemoryStore(store_dict=self._encoded)
        self._arrays = {
            name: zarr.open_array(memory, path=name, mode="r+").with_config(
                {"write_empty_chunks": True}
            )
            for name in checksum_arrays(spec)
        }
        self._hash = hashlib.sha256()
        self._channel_scales = read_channel_scales(path, spec)  # int8c: {layer: (dim,)}
        for layer in spec.layer_names:  # FORMAT.md: an int8c checksum starts with them
            if layer in self._channel_scales:
                self._hash.update(self._channel_scales[layer].astype("<f4").tobytes())
        self._buffers: dict[str, list[np.ndarray]] = {name: [] for name in self._arrays}
        self._buffered = 0
        self._written = 0
        self._seen: set[str] = set()
        self._skipped: list[str] = []
        self._finished = False

    @property
    def count(self) -> int:
        """Rows appended so far (written or buffered)."""
        return self._written + self._buffered

    def __enter__(self) -> BlockWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

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
        self, keys: Sequence[str], features: dict[str, Any], digests: Any | None = None
    ) -> None:
        """Append rows: keys (n,) unique str; features {layer: (n, tokens, dim) float array or
        tensor} for every layer of the spec; digests: each row's `sample_digest` of its source
        images, n bytes objects or uint8 (n, DIGEST_BYTES), None when the sources have no encoded
        bytes (stored as zeros: "not recorded"). Validates everything before buffering anything."""
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
        if self.count + n > self.block.capacity:
            raise BlockCapacityError(
                f"Expected at most {self.block.capacity} rows in block {self.block.index} "
                f"({self.block.source}), got {self.count + n}"
            )
        staged: dict[str, np.ndarray] = {}
        for layer in self.spec.layers:
            x = to_numpy_float(features[layer.name])
            expected = (n, layer.tokens, layer.dim)
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
                staged[features_path(layer.name)] = x.astype(np.float16)
            else:
                q, scale = quantize_int8(x, self._channel_scales.get(layer.name))
                staged[features_path(layer.name)] = q
                staged[scales_path(layer.name)] = scale
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
            self._hash.update(np.ascontiguousarray(head).tobytes())
            self._arrays[name][start : start + take] = head  # encoded into memory
            key = shard_file(name, self._arrays[name].ndim, start // sr)
            try:
                self.store.put(key, self._encoded.pop(key).to_bytes())
            except OSError as exc:  # disk full, read-only: the block stays pending
                raise StorageError(
                    f"Expected to write {self.store.url(key)!r} (block {self.block.index}, "
                    f"{self.block.source}), got {exc.strerror or exc}; done blocks are kept and "
                    f"this one stays pending: free space or fix permissions, then rerun to resume"
                ) from exc
        self._buffered -= take
        self._written += take

    def finish(self) -> BlockResult:
        """Write what is buffered, delete the block's shard objects past the rows written (an
        earlier attempt's), and return the result for CacheWriter.mark_done."""
        self._check_open()
        if self._buffered:
            self._flush_shard()
        sr = self.spec.shard_rows
        for s in range(-(-(self.block.row_start + self._written) // sr), self.block.row_stop // sr):
            for name, arr in self._arrays.items():
                self.store.delete(shard_file(name, arr.ndim, s))
        self._finished = True
        return BlockResult(
            index=self.block.index,
            count=self._written,
            checksum=CHECKSUM_PREFIX + self._hash.hexdigest(),
            skipped=tuple(self._skipped),
        )
