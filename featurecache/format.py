"""The on-disk format: named constants, the spec and manifest types, block planning, and the
atomic, cross-process manifest update. docs/FORMAT.md is the prose version of this module.

A cache is a Zarr v3 group:
    zarr.json                  group metadata; attributes["featurecache"] is the manifest
    keys                       uint8 (rows, key_bytes): UTF-8 sample key, NUL-padded
    features/<layer>           float16 or int8 (rows, tokens, dim), chunk (1, tokens, dim),
                               shard (shard_rows, tokens, dim)
    scales/<layer>             float32 (rows, tokens), int8 and int8c: x ~= q * scale
    channel_scales/<layer>     float32 (dim,), int8c only: x ~= q * scale * channel_scale
    featurecache.lock          empty file, fcntl lock for manifest updates (not part of Zarr)
    featurecache.build.lock    fcntl lock held by the build writing the cache; says who (not Zarr)
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import os
import re
import socket
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Final, Literal

from featurecache.errors import (
    CacheBusyError,
    FormatVersionError,
    ManifestError,
    NotACacheError,
    SpecError,
    StorageError,
    UnknownBlockError,
    UnknownLayerError,
)
from featurecache.store import local_path

# Bump on any change an older reader would misread. 2: the int8c codec (channel_scales arrays)
# and the per-row source digest. Readers read every version from 1 up to this one.
FORMAT_VERSION: Final = 2
ATTRS_KEY: Final = "featurecache"  # group attribute holding the manifest
GROUP_METADATA: Final = "zarr.json"
LOCK_FILE: Final = "featurecache.lock"
BUILD_LOCK_FILE: Final = "featurecache.build.lock"  # held (flock) by the one build writing
KEYS_ARRAY: Final = "keys"
# digests: uint8 (rows, DIGEST_BYTES), `sample_digest` of each row's source images; all zero for
# a row whose source had no encoded image bytes (Python frames). Since format version 2.
DIGESTS_ARRAY: Final = "digests"
DIGEST_BYTES: Final = 16
DIGEST_DTYPE: Final = "uint8"
DIGESTS_SINCE_VERSION: Final = 2
FEATURES_GROUP: Final = "features"
SCALES_GROUP: Final = "scales"
CHANNEL_SCALES_GROUP: Final = "channel_scales"

CODECS: Final = ("fp16", "int8", "int8c")
Codec = Literal["fp16", "int8", "int8c"]
FEATURE_DTYPE: Final = {"fp16": "float16", "int8": "int8", "int8c": "int8"}
SCALED_CODECS: Final = ("int8", "int8c")  # codecs with per-token scales/<layer>
CHANNEL_SCALED_CODECS: Final = ("int8c",)  # codecs with a per-channel channel_scales/<layer>
CODEC_SINCE_VERSION: Final = {"fp16": 1, "int8": 1, "int8c": 2}  # first format version with it
# The build's default: int8c meets the fidelity targets on every feature kind benchmarks/cache.py
# measures (int8 misses them with outlier channels) and equals int8 where int8 is good enough.
DEFAULT_CODEC: Final = "int8c"
SCALE_DTYPE: Final = "float32"
KEY_DTYPE: Final = "uint8"
INT8_LEVELS: Final = 127  # q = round(x / scale), scale = absmax / 127, q in [-127, 127]
ZSTD_LEVEL: Final = (
    3  # zstd level of every array (fp16 zstd vs blosc+shuffle: same ratio, measured)
)

DEFAULT_SHARD_ROWS: Final = 64
DEFAULT_KEY_BYTES: Final = 128
CHECKSUM_PREFIX: Final = "sha256:"

STATUS_PENDING: Final = "pending"
STATUS_DONE: Final = "done"
STATUSES: Final = (STATUS_PENDING, STATUS_DONE)
Status = Literal["pending", "done"]

# A cache layer: the teacher's layer name, prefixed by the camera in multi-camera caches
# ("top/16": features/top/16, a nested Zarr group per camera). Camera names: featurecache.samples.
_CHECKSUM = re.compile(rf"^{CHECKSUM_PREFIX}[0-9a-f]{{64}}$")
_LAYER_NAME = re.compile(r"^([a-z][a-z0-9_\-]*/)?[A-Za-z0-9_][A-Za-z0-9_.\-]*$")


def camera_layer(camera: str, layer: str) -> str:
    """The cache layer name of teacher layer `layer` seen through `camera` ("" = single camera):
    "16" or "top/16"."""
    return f"{camera}/{layer}" if camera else str(layer)


def features_path(layer: str) -> str:
    """Zarr path of a layer's feature array."""
    return f"{FEATURES_GROUP}/{layer}"


def scales_path(layer: str) -> str:
    """Zarr path of a layer's per-token scale array (int8, int8c)."""
    return f"{SCALES_GROUP}/{layer}"


def channel_scales_path(layer: str) -> str:
    """Zarr path of a layer's per-channel scale vector (int8c): float32 (dim,)."""
    return f"{CHANNEL_SCALES_GROUP}/{layer}"


def sample_digest(images: Mapping[str, bytes]) -> bytes:
    """The content digest of one source sample (FORMAT.md "Digests"): its encoded image bytes
    {camera: bytes} ("" for a single plain image) -> DIGEST_BYTES bytes. One image: the first 16
    bytes of its SHA-256; several cameras: the first 16 bytes of the SHA-256 of their digests
    concatenated in sorted camera order. SHA-256: hardware-accelerated on current x86 and ARM CPUs
    (measured ~2x faster than BLAKE2b here), and in every standard library."""
    if not images:
        raise SpecError("Expected at least one image to digest, got none")
    parts = [hashlib.sha256(images[c]).digest()[:DIGEST_BYTES] for c in sorted(images)]
    if len(parts) == 1:
        return parts[0]
    return hashlib.sha256(b"".join(parts)).digest()[:DIGEST_BYTES]


def cache_cameras(spec: CacheSpec) -> tuple[str, ...]:
    """The cameras a cache's layers were computed from, sorted ("" for single-camera caches):
    the prefixes of camera_layer names."""
    return tuple(sorted({name.rpartition("/")[0] for name in spec.layer_names}))


def array_ndim(array_path: str) -> int:
    """Dimensions of a per-row array: 3 for features/<layer> (row, token, dim), 2 for keys,
    digests and scales/<layer>."""
    return 3 if array_path.startswith(f"{FEATURES_GROUP}/") else 2


def shard_file(array_path: str, ndim: int, shard_index: int) -> str:
    """Relative file path of a shard (or, for keys/scales, of a chunk of shard_rows rows):
    default chunk key encoding with "/" separator, e.g. `features/4/c/3/0/0`."""
    return "/".join([array_path, "c", str(shard_index)] + ["0"] * (ndim - 1))


@dataclass(frozen=True)
class LayerSpec:
    """One cached teacher layer: `tokens` rows of `dim` features per sample; `grid` the token grid
    (h, w) when the tokens are patches of one (h * w may be < tokens, e.g. with a CLS token)."""

    name: str
    tokens: int
    dim: int
    grid: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _LAYER_NAME.match(self.name):
            raise SpecError(
                f"Expected a layer name of letters, digits, '_', '.', '-', optionally after "
                f"'<camera>/', "
                f"got {self.name!r}"
            )
        for what, value in (("tokens", self.tokens), ("dim", self.dim)):
            if not isinstance(value, int) or value <= 0:
                raise SpecError(
                    f"Expected a positive int for layer {self.name!r} {what}, got {value!r}"
                )
        if self.grid is not None:
            grid = tuple(int(g) for g in self.grid)
            if len(grid) != 2 or min(grid) <= 0:
                raise SpecError(
                    f"Expected grid (h, w) of positive ints for layer {self.name!r}, "
                    f"got {self.grid!r}"
                )
            if grid[0] * grid[1] > self.tokens:
                raise SpecError(
                    f"Expected layer {self.name!r} grid h * w <= tokens {self.tokens} (the grid's "
                    f"patches are among the tokens), got {grid[0]}x{grid[1]}"
                )
            object.__setattr__(self, "grid", grid)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "tokens": self.tokens,
            "dim": self.dim,
            "grid": list(self.grid) if self.grid else None,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> LayerSpec:
        grid = d.get("grid")
        name = d["name"]
        tokens, dim = (
            json_int(d, "tokens", f"layer {name!r}"),
            json_int(d, "dim", f"layer {name!r}"),
        )
        if grid is not None and not (isinstance(grid, list) and all(_is_int(g) for g in grid)):
            raise SpecError(f"Expected layer {name!r} grid [h, w] of ints or null, got {grid!r}")
        return cls(name, tokens, dim, tuple(grid) if grid else None)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def json_int(d: dict[str, Any], key: str, what: str, default: int | None = None) -> int:
    """The integer field `key` of a parsed JSON object: SpecError naming `what` and the key when
    it is absent (without a default), a string, a float or a bool, never a silent int()."""
    value = d.get(key, default)
    if not _is_int(value):
        raise SpecError(f"Expected {what} {key} to be an integer, got {value!r}")
    return value


def _canonical(fingerprint: dict[str, Any]) -> dict[str, Any]:
    """The fingerprint as it reads back from JSON (tuples -> lists), so comparisons hold."""
    try:
        return json.loads(json.dumps(fingerprint, sort_keys=True))
    except TypeError as exc:
        raise SpecError(f"Expected a JSON-able fingerprint dict, got {exc}") from exc


@dataclass(frozen=True)
class CacheSpec:
    """What a cache holds: its layers, codec ("fp16" lossless, "int8" per-token absmax, "int8c"
    per-token absmax of channel-scaled tokens), rows per Zarr shard, the teacher fingerprint
    (JSON-able dict) and the key width in bytes."""

    layers: tuple[LayerSpec, ...]
    codec: Codec
    shard_rows: int = DEFAULT_SHARD_ROWS
    fingerprint: dict[str, Any] = field(default_factory=dict)
    key_bytes: int = DEFAULT_KEY_BYTES

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", tuple(self.layers))
        if not self.layers or not all(isinstance(x, LayerSpec) for x in self.layers):
            raise SpecError(f"Expected one or more LayerSpec, got {self.layers!r}")
        names = [x.name for x in self.layers]
        if len(set(names)) != len(names):
            raise SpecError(f"Expected distinct layer names, got {names}")
        if self.codec not in CODECS:
            raise SpecError(f"Expected codec in {CODECS}, got {self.codec!r}")
        for what, value in (("shard_rows", self.shard_rows), ("key_bytes", self.key_bytes)):
            if not isinstance(value, int) or value <= 0:
                raise SpecError(f"Expected a positive int {what}, got {value!r}")
        object.__setattr__(self, "fingerprint", _canonical(dict(self.fingerprint)))

    @property
    def layer_names(self) -> tuple[str, ...]:
        return tuple(x.name for x in self.layers)

    def layer(self, name: str) -> LayerSpec:
        """The LayerSpec called `name`; UnknownLayerError naming the known layers otherwise."""
        for x in self.layers:
            if x.name == str(name):
                return x
        raise UnknownLayerError(f"Expected a layer in {list(self.layer_names)}, got {name!r}")

    def to_json(self) -> dict[str, Any]:
        return {
            "layers": [x.to_json() for x in self.layers],
            "codec": self.codec,
            "shard_rows": self.shard_rows,
            "key_bytes": self.key_bytes,
            "fingerprint": self.fingerprint,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> CacheSpec:
        return cls(
            layers=tuple(LayerSpec.from_json(x) for x in d["layers"]),
            codec=d["codec"],
            shard_rows=json_int(d, "shard_rows", "the spec"),
            fingerprint=d.get("fingerprint") or {},
            key_bytes=json_int(d, "key_bytes", "the spec", DEFAULT_KEY_BYTES),
        )


@dataclass(frozen=True)
class Block:
    """A row block: rows [row_start, row_stop) owned by one source (e.g. one input tar), a whole
    number of shards; rows [row_start, row_start + count) are written, the rest is padding.
    `checksum` ("sha256:<hex>", see FORMAT.md) and `skipped` (keys of bad frames) are set when done.
    """

    index: int
    source: str
    row_start: int
    row_stop: int
    count: int
    status: Status = STATUS_PENDING
    checksum: str | None = None
    skipped: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        what = f"block {self.index!r}"
        for name in ("index", "row_start", "row_stop", "count"):
            value = getattr(self, name)
            if not _is_int(value) or value < 0:
                raise SpecError(f"Expected {what} {name} to be an integer >= 0, got {value!r}")
        if self.row_stop < self.row_start:
            raise SpecError(
                f"Expected {what} row_stop >= row_start, got rows [{self.row_start}, "
                f"{self.row_stop})"
            )
        if self.count > self.capacity:
            raise SpecError(
                f"Expected {what} count <= its capacity {self.capacity} (rows [{self.row_start}, "
                f"{self.row_stop})), got {self.count}"
            )
        if self.status not in STATUSES:
            raise SpecError(f"Expected {what} status in {STATUSES}, got {self.status!r}")
        if self.done and not (
            isinstance(self.checksum, str) and _CHECKSUM.match(self.checksum) is not None
        ):
            raise SpecError(
                f"Expected done {what} checksum '{CHECKSUM_PREFIX}<64 hex digits>', got "
                f"{self.checksum!r}"
            )
        if not isinstance(self.source, str) or not all(isinstance(k, str) for k in self.skipped):
            raise SpecError(
                f"Expected {what} source and skipped keys to be strings, got {self.source!r}, "
                f"{list(self.skipped)[:3]!r}"
            )

    @property
    def capacity(self) -> int:
        return self.row_stop - self.row_start

    @property
    def done(self) -> bool:
        return self.status == STATUS_DONE

    def same_plan(self, other: Block) -> bool:
        """Whether two blocks describe the same planned rows (status and results aside)."""
        return (self.index, self.source, self.row_start, self.row_stop) == (
            other.index,
            other.source,
            other.row_start,
            other.row_stop,
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "source": self.source,
            "row_start": self.row_start,
            "row_stop": self.row_stop,
            "count": self.count,
            "status": self.status,
            "checksum": self.checksum,
            "skipped": list(self.skipped),
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Block:
        what = f"block {d.get('index')!r}"
        skipped = d.get("skipped") or []
        if not isinstance(skipped, list):
            raise SpecError(f"Expected {what} skipped to be a list of keys, got {skipped!r}")
        return cls(
            index=json_int(d, "index", "a block"),
            source=d["source"],
            row_start=json_int(d, "row_start", what),
            row_stop=json_int(d, "row_stop", what),
            count=json_int(d, "count", what),
            status=d.get("status", STATUS_PENDING),
            checksum=d.get("checksum"),
            skipped=tuple(skipped),
        )


def check_block_table(spec: CacheSpec, blocks: Sequence[Block], rows: int) -> None:
    """The block table's own rules (FORMAT.md): blocks in index order, contiguous from row 0,
    each on whole shards, ending at `rows`. SpecError naming the first block that breaks one."""
    row = 0
    for i, b in enumerate(blocks):
        if b.index != i or b.row_start != row:
            raise SpecError(
                f"Expected block {i} to have index {i} and start at row {row} (blocks contiguous "
                f"from row 0), got index {b.index} rows [{b.row_start}, {b.row_stop})"
            )
        if b.row_start % spec.shard_rows or b.row_stop % spec.shard_rows:
            raise SpecError(
                f"Expected block {i} rows on shard boundaries (multiples of shard_rows "
                f"{spec.shard_rows}), got [{b.row_start}, {b.row_stop})"
            )
        row = b.row_stop
    if not _is_int(rows) or rows != row:
        raise SpecError(f"Expected rows = {row} (the last block's row_stop), got {rows!r}")


@dataclass(frozen=True)
class Manifest:
    """The parsed `featurecache` group attribute: spec, block table and total rows."""

    spec: CacheSpec
    blocks: tuple[Block, ...]
    rows: int
    version: int = FORMAT_VERSION

    def block(self, index: int) -> Block:
        if not 0 <= index < len(self.blocks):
            raise UnknownBlockError(
                f"Expected a block index in [0, {len(self.blocks)}), got {index}"
            )
        return self.blocks[index]

    def with_block(self, block: Block) -> Manifest:
        blocks = list(self.blocks)
        blocks[block.index] = block
        return replace(self, blocks=tuple(blocks))

    @property
    def done_blocks(self) -> tuple[Block, ...]:
        return tuple(b for b in self.blocks if b.done)

    def to_json(self) -> dict[str, Any]:
        return {
            "version": self.version,
            **self.spec.to_json(),
            "rows": self.rows,
            "blocks": [b.to_json() for b in self.blocks],
        }

    @classmethod
    def from_json(cls, d: dict[str, Any], where: str = "cache") -> Manifest:
        version = d.get("version")
        if not isinstance(version, int) or version < 1:
            raise FormatVersionError(
                f"Expected an integer format version in {where}, got {version!r}"
            )
        if version > FORMAT_VERSION:
            raise FormatVersionError(
                f"Expected format version <= {FORMAT_VERSION} in {where}, got {version} "
                f"(written by a newer featurecache: upgrade to read it)"
            )
        try:
            spec = CacheSpec.from_json(d)
            if not isinstance(d["blocks"], list):
                raise SpecError(f"Expected blocks to be a list, got {d['blocks']!r}")
            blocks = tuple(Block.from_json(b) for b in d["blocks"])
            rows = d["rows"]
            check_block_table(spec, blocks, rows)
        except (KeyError, TypeError, AttributeError) as exc:
            raise ManifestError(
                f"Expected a complete manifest in {where}, got a missing or malformed field "
                f"({type(exc).__name__}: {exc}); restore the file or rebuild the cache"
            ) from exc
        except SpecError as exc:
            raise ManifestError(
                f"{exc} in the manifest of {where} (edited or corrupt: restore the file or "
                f"rebuild the cache)"
            ) from exc
        if version < CODEC_SINCE_VERSION[spec.codec]:
            raise FormatVersionError(
                f"Expected format version >= {CODEC_SINCE_VERSION[spec.codec]} for codec "
                f"{spec.codec!r} in {where}, got {version}"
            )
        return cls(spec=spec, blocks=blocks, rows=rows, version=version)


def plan_blocks(sources: Sequence[tuple[str, int]], shard_rows: int) -> list[Block]:
    """One pending block per (source, sample count), in order; each starts on a shard boundary
    and owns ceil(count / shard_rows) whole shards."""
    if shard_rows <= 0:
        raise SpecError(f"Expected a positive shard_rows, got {shard_rows}")
    blocks, row = [], 0
    for i, (source, count) in enumerate(sources):
        if count < 0:
            raise SpecError(f"Expected a sample count >= 0 for {source!r}, got {count}")
        capacity = math.ceil(count / shard_rows) * shard_rows
        blocks.append(Block(i, str(source), row, row + capacity, int(count)))
        row += capacity
    return blocks


# ---- manifest I/O: read, lock, atomic read-modify-write -------------------------------------


def read_group_metadata(path: str | Path) -> dict[str, Any]:
    """The group's zarr.json as a dict; NotACacheError naming the path when it is not one."""
    path = local_path(path, "the cache")
    meta_file = path / GROUP_METADATA
    if not path.is_dir():
        raise NotACacheError(f"Expected a featurecache cache directory, got {str(path)!r}")
    try:
        meta = json.loads(meta_file.read_bytes())
    except FileNotFoundError as exc:
        raise NotACacheError(
            f"Expected a Zarr v3 group ({GROUP_METADATA}) at {str(path)!r}, found none"
        ) from exc
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        raise NotACacheError(
            f"Expected JSON in {str(meta_file)!r}, got unparsable bytes ({exc}): the file is "
            f"corrupt; restore it from a backup or rebuild the cache"
        ) from exc
    if not isinstance(meta, dict):
        raise NotACacheError(
            f"Expected a JSON object in {str(meta_file)!r}, got a {type(meta).__name__}"
        )
    if meta.get("zarr_format") != 3 or meta.get("node_type") != "group":
        raise NotACacheError(
            f"Expected a Zarr v3 group in {str(meta_file)!r}, got zarr_format="
            f"{meta.get('zarr_format')!r} node_type={meta.get('node_type')!r}"
        )
    return meta


def read_manifest(path: str | Path) -> Manifest:
    """Parse and validate the manifest of the cache at `path`."""
    meta = read_group_metadata(path)
    attrs = (meta.get("attributes") or {}).get(ATTRS_KEY)
    if not isinstance(attrs, dict):
        raise NotACacheError(
            f"Expected attribute {ATTRS_KEY!r} in {str(Path(path) / GROUP_METADATA)!r}: "
            f"a Zarr group but not a featurecache cache"
        )
    return Manifest.from_json(attrs, where=str(Path(path) / GROUP_METADATA))


@contextlib.contextmanager
def manifest_lock(path: str | Path) -> Iterator[None]:
    """An exclusive cross-process lock (fcntl.flock on featurecache.lock) for manifest updates."""
    lock_path = Path(path) / LOCK_FILE
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def acquire_build_lock(folder: str | Path, cache: str | Path) -> int:
    """Take the build lock of the cache `cache` (its file in `folder`: the cache itself, or the
    folder it is being created in) without waiting: returns the open fd that holds it (closing
    it releases it, as does the process's exit). CacheBusyError naming who holds it otherwise."""
    lock_file = Path(folder) / BUILD_LOCK_FILE
    fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 256, 0).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise CacheBusyError(
            f"Expected no other build writing {str(cache)!r}, got one running ({holder}); wait "
            f"for it to finish, then rerun this command: it resumes and writes only what is "
            f"left (do not delete the cache: that would destroy the running build's work)"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode(), 0)
    return fd


def write_group_metadata(path: str | Path, meta: dict[str, Any]) -> None:
    """Write zarr.json atomically: temp file in the same folder, fsync, os.replace, fsync dir."""
    path = Path(path)
    tmp = path / f".{GROUP_METADATA}.{os.getpid()}.tmp"
    data = json.dumps(meta, indent=2).encode()
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path / GROUP_METADATA)
    except OSError as exc:  # disk full, read-only: the old zarr.json stays as it was
        tmp.unlink(missing_ok=True)
        raise StorageError(
            f"Expected to write {str(path / GROUP_METADATA)!r}, got {exc.strerror or exc} (the "
            f"manifest is unchanged; free space or fix permissions, then rerun to resume)"
        ) from exc
    dir_fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def update_manifest(path: str | Path, change: Callable[[Manifest], Manifest]) -> Manifest:
    """Read-modify-write the manifest under the lock; `change` gets the current manifest."""
    with manifest_lock(path):
        meta = read_group_metadata(path)
        manifest = change(read_manifest(path))
        meta.setdefault("attributes", {})[ATTRS_KEY] = manifest.to_json()
        write_group_metadata(path, meta)
        return manifest


def checksum_arrays(spec: CacheSpec, version: int = FORMAT_VERSION) -> list[str]:
    """The per-shard arrays a block checksum covers, in hashing order: keys, digests (format
    version >= 2), then per layer (spec order) features and, for int8/int8c, scales. For int8c
    the stream starts with the `channel_scale_arrays` (see FORMAT.md "Block checksum")."""
    arrays = [KEYS_ARRAY]
    if version >= DIGESTS_SINCE_VERSION:
        arrays.append(DIGESTS_ARRAY)
    for layer in spec.layer_names:
        arrays.append(features_path(layer))
        if spec.codec in SCALED_CODECS:
            arrays.append(scales_path(layer))
    return arrays


def channel_scale_arrays(spec: CacheSpec) -> list[str]:
    """The per-layer channel scale vectors (int8c; none for other codecs), in spec order: written
    once when the cache is created, hashed at the start of every block checksum."""
    if spec.codec not in CHANNEL_SCALED_CODECS:
        return []
    return [channel_scales_path(layer) for layer in spec.layer_names]
