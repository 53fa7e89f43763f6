"""The on-disk format: named constants, the spec and manifest types, block planning, and the
atomic, cross-process manifest update. docs/FORMAT.md is the prose version of this module.

A cache is a Zarr v3 group:
    zarr.json                  group metadata; attributes["featurecache"] is the manifest
    keys                       uint8 (rows, key_bytes): UTF-8 sample key, NUL-padded
    features/<layer>           float16 or int8 (rows, tokens, dim), chunk (1, tokens, dim),
                               shard (shard_rows, tokens, dim)
    scales/<layer>             float32 (rows, tokens), int8 caches only: x ~= q * scale
    featurecache.lock          empty file, fcntl lock for manifest updates (not part of Zarr)
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Final, Literal

from featurecache.errors import (
    FormatVersionError,
    NotACacheError,
    SpecError,
    UnknownBlockError,
    UnknownLayerError,
)

FORMAT_VERSION: Final = 1  # bump on any change a version-1 reader would misread
ATTRS_KEY: Final = "featurecache"  # group attribute holding the manifest
GROUP_METADATA: Final = "zarr.json"
LOCK_FILE: Final = "featurecache.lock"
KEYS_ARRAY: Final = "keys"
FEATURES_GROUP: Final = "features"
SCALES_GROUP: Final = "scales"

CODECS: Final = ("fp16", "int8")
Codec = Literal["fp16", "int8"]
FEATURE_DTYPE: Final = {"fp16": "float16", "int8": "int8"}
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
Status = Literal["pending", "done"]

# A cache layer: the teacher's layer name, prefixed by the camera in multi-camera caches
# ("top/16": features/top/16, a nested Zarr group per camera). Camera names: featurecache.samples.
_LAYER_NAME = re.compile(r"^([a-z][a-z0-9_\-]*/)?[A-Za-z0-9_][A-Za-z0-9_.\-]*$")


def camera_layer(camera: str, layer: str) -> str:
    """The cache layer name of teacher layer `layer` seen through `camera` ("" = single camera):
    "16" or "top/16"."""
    return f"{camera}/{layer}" if camera else str(layer)


def features_path(layer: str) -> str:
    """Zarr path of a layer's feature array."""
    return f"{FEATURES_GROUP}/{layer}"


def scales_path(layer: str) -> str:
    """Zarr path of a layer's int8 scale array."""
    return f"{SCALES_GROUP}/{layer}"


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
        return cls(str(d["name"]), int(d["tokens"]), int(d["dim"]), tuple(grid) if grid else None)


def _canonical(fingerprint: dict[str, Any]) -> dict[str, Any]:
    """The fingerprint as it reads back from JSON (tuples -> lists), so comparisons hold."""
    try:
        return json.loads(json.dumps(fingerprint, sort_keys=True))
    except TypeError as exc:
        raise SpecError(f"Expected a JSON-able fingerprint dict, got {exc}") from exc


@dataclass(frozen=True)
class CacheSpec:
    """What a cache holds: its layers, codec ("fp16" lossless, "int8" per-token absmax), rows per
    Zarr shard, the teacher fingerprint (JSON-able dict) and the key width in bytes."""

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
            shard_rows=int(d["shard_rows"]),
            fingerprint=d.get("fingerprint") or {},
            key_bytes=int(d.get("key_bytes", DEFAULT_KEY_BYTES)),
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
        return cls(
            index=int(d["index"]),
            source=str(d["source"]),
            row_start=int(d["row_start"]),
            row_stop=int(d["row_stop"]),
            count=int(d["count"]),
            status=d.get("status", STATUS_PENDING),
            checksum=d.get("checksum"),
            skipped=tuple(d.get("skipped") or ()),
        )


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
            "version": FORMAT_VERSION,
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
            blocks = tuple(Block.from_json(b) for b in d["blocks"])
            rows = int(d["rows"])
        except (KeyError, TypeError) as exc:
            raise NotACacheError(f"Expected a complete manifest in {where}, missing {exc}") from exc
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
    meta_file = Path(path) / GROUP_METADATA
    if not Path(path).is_dir():
        raise NotACacheError(f"Expected a featurecache cache directory, got {str(path)!r}")
    try:
        meta = json.loads(meta_file.read_text())
    except FileNotFoundError as exc:
        raise NotACacheError(
            f"Expected a Zarr v3 group ({GROUP_METADATA}) at {str(path)!r}, found none"
        ) from exc
    except (OSError, json.JSONDecodeError) as exc:
        raise NotACacheError(f"Expected readable JSON in {str(meta_file)!r}, got {exc}") from exc
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
    return Manifest.from_json(attrs, where=str(path))


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


def write_group_metadata(path: str | Path, meta: dict[str, Any]) -> None:
    """Write zarr.json atomically: temp file in the same folder, fsync, os.replace, fsync dir."""
    path = Path(path)
    tmp = path / f".{GROUP_METADATA}.{os.getpid()}.tmp"
    data = json.dumps(meta, indent=2).encode()
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path / GROUP_METADATA)
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


def checksum_arrays(spec: CacheSpec) -> list[str]:
    """The arrays a block checksum covers, in hashing order: keys, then per layer (spec order)
    features and, for int8, scales. See FORMAT.md "Block checksum"."""
    arrays = [KEYS_ARRAY]
    for layer in spec.layer_names:
        arrays.append(features_path(layer))
        if spec.codec == "int8":
            arrays.append(scales_path(layer))
    return arrays
