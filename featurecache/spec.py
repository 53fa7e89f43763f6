"""The typed description of what a cache holds: `LayerSpec` (one cached teacher layer: tokens,
width, token grid) and `CacheSpec` (its layers, codec, rows per shard, teacher fingerprint, key
width), frozen dataclasses validated on construction and parsed from the manifest's JSON with
`json_int` (never a silent int()). The on-disk names they refer to live in `featurecache.format`;
the block table and the manifest built on them in `featurecache.manifest`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from featurecache.errors import SpecError, UnknownLayerError
from featurecache.format import (
    CODECS,
    DEFAULT_COMPRESSOR,
    DEFAULT_KEY_BYTES,
    DEFAULT_SHARD_ROWS,
    Codec,
    compressor_level,
)
from featurecache.region import FrameRegion

# A cache layer: the teacher's layer name, prefixed by the camera in multi-camera caches
# ("top/16": features/top/16, a nested Zarr group per camera; `format.camera_layer`).
_LAYER_NAME = re.compile(r"^([a-z][a-z0-9_\-]*/)?[A-Za-z0-9_][A-Za-z0-9_.\-]*$")


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
        if grid is not None and not (isinstance(grid, list) and all(is_json_int(g) for g in grid)):
            raise SpecError(f"Expected layer {name!r} grid [h, w] of ints or null, got {grid!r}")
        return cls(name, tokens, dim, tuple(grid) if grid else None)


def is_json_int(value: Any) -> bool:
    """An int of parsed JSON (bool, a subclass of int, is not one)."""
    return isinstance(value, int) and not isinstance(value, bool)


def json_int(d: dict[str, Any], key: str, what: str, default: int | None = None) -> int:
    """The integer field `key` of a parsed JSON object: SpecError naming `what` and the key when
    it is absent (without a default), a string, a float or a bool, never a silent int()."""
    value = d.get(key, default)
    if not is_json_int(value):
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
    (JSON-able dict), the key width in bytes, and its views: `views` per row (1: the frame only;
    V > 1: views 1..V-1 are augmentations, format version 3) drawn as `augment` says (a JSON-able
    dict: "seed", "cameras" (the params array's camera axis, in order) and each camera's terms;
    written by featurecache.pipelines.views, FORMAT.md "Views"; None when views == 1).
    `frame_regions`: {camera: FrameRegion} ("" the single plain camera), the region of each
    camera's frames the teacher saw; empty when not recorded (caches written before it, or by the
    Python writer without one): the student then sees the whole frame, as before
    (docs/FORMAT.md "Frame regions"). `compressor`: inside every chunk's codec chain, "zstd:L"
    (level 1..22; "zstd:3" the default and the one chain of caches written before the field) or
    "none" (bytes -> crc32c: more bytes, less CPU; featurecache.chunk_codec)."""

    layers: tuple[LayerSpec, ...]
    codec: Codec
    shard_rows: int = DEFAULT_SHARD_ROWS
    fingerprint: dict[str, Any] = field(default_factory=dict)
    key_bytes: int = DEFAULT_KEY_BYTES
    views: int = 1
    augment: dict[str, Any] | None = None
    frame_regions: dict[str, FrameRegion] = field(default_factory=dict)
    compressor: str = DEFAULT_COMPRESSOR

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
        compressor_level(self.compressor)  # SpecError unless "none" or "zstd:L"
        object.__setattr__(self, "fingerprint", _canonical(dict(self.fingerprint)))
        if not is_json_int(self.views) or self.views < 1:
            raise SpecError(f"Expected views to be an integer >= 1, got {self.views!r}")
        if (self.views > 1) != (self.augment is not None):
            raise SpecError(
                f"Expected an augment recipe exactly when views > 1, got views {self.views} and "
                f"augment {self.augment!r}"
            )
        if self.augment is not None:
            augment = _canonical(dict(self.augment))
            cameras = augment.get("cameras")
            listed = isinstance(cameras, list) and all(isinstance(c, str) for c in cameras)
            if not (listed and cameras):
                raise SpecError(f"Expected augment cameras as a list of names, got {cameras!r}")
            object.__setattr__(self, "augment", augment)
        regions = dict(self.frame_regions)
        cameras = sorted({name.rpartition("/")[0] for name in names})
        if regions and sorted(regions) != cameras:
            raise SpecError(
                f"Expected one frame region per camera {cameras} (or none), got {sorted(regions)}"
            )
        if not all(isinstance(r, FrameRegion) for r in regions.values()):
            raise SpecError(f"Expected FrameRegion values in frame_regions, got {regions!r}")
        object.__setattr__(self, "frame_regions", regions)

    @property
    def view_cameras(self) -> tuple[str, ...]:
        """The camera axis of every view's params array, in order (() without views)."""
        return tuple(self.augment["cameras"]) if self.augment else ()

    @property
    def layer_names(self) -> tuple[str, ...]:
        return tuple(x.name for x in self.layers)

    def layer(self, name: str) -> LayerSpec:
        """The LayerSpec called `name`; UnknownLayerError naming the known layers otherwise."""
        for x in self.layers:
            if x.name == str(name):
                return x
        raise UnknownLayerError(f"Expected a layer in {list(self.layer_names)}, got {name!r}")

    def frame_region(self, camera: str = "") -> FrameRegion | None:
        """The region of `camera`'s frames ("" the single plain camera) the teacher saw, or None
        when the cache does not record one (the student sees the whole frame)."""
        return self.frame_regions.get(camera)

    def to_json(self) -> dict[str, Any]:
        out = {
            "layers": [x.to_json() for x in self.layers],
            "codec": self.codec,
            "shard_rows": self.shard_rows,
            "key_bytes": self.key_bytes,
            "fingerprint": self.fingerprint,
            "compressor": self.compressor,
        }
        if self.views > 1:
            out |= {"views": self.views, "augment": self.augment}
        if self.frame_regions:  # optional: absent in caches that record none
            out["frame_regions"] = {c: r.to_json() for c, r in sorted(self.frame_regions.items())}
        return out

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> CacheSpec:
        regions = d.get("frame_regions") or {}
        if not isinstance(regions, dict):
            raise SpecError(f"Expected frame_regions to be an object, got {regions!r}")
        return cls(
            layers=tuple(LayerSpec.from_json(x) for x in d["layers"]),
            codec=d["codec"],
            shard_rows=json_int(d, "shard_rows", "the spec"),
            fingerprint=d.get("fingerprint") or {},
            key_bytes=json_int(d, "key_bytes", "the spec", DEFAULT_KEY_BYTES),
            compressor=d.get("compressor", DEFAULT_COMPRESSOR),  # absent: written before it
            views=json_int(d, "views", "the spec", 1),
            augment=d.get("augment"),
            frame_regions={
                str(c): FrameRegion.from_json(r, f"the frame region of camera {c!r}")
                for c, r in regions.items()
            },
        )
