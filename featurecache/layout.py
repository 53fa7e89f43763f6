"""A new cache's objects, and the checks that an existing cache is the one asked for.

`write_new_cache(store, spec, table, channel_scales)` writes what a new cache consists of: the
arrays' metadata (encoded in memory by zarr: keys, digests, features, scales, channel scales),
the block plan, then the group's zarr.json with the header, created only if absent (it makes the
cache exist). `check_same_cache` / `check_same_channel_scales` compare an existing cache with a
requested spec, plan and channel scales (SpecMismatchError showing both). Used by the writer's
`create_cache` (featurecache.writer), which owns locking, overwriting and the local rename.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.storage import MemoryStore

from featurecache.block_table import BlockTable
from featurecache.chunk_codec import ChunkChain
from featurecache.codecs import check_channel_scale
from featurecache.completion import PLAN_OBJECT, CacheState, header_json, plan_bytes
from featurecache.errors import (
    InvalidFeaturesError,
    SpecMismatchError,
)
from featurecache.format import (
    ATTRS_KEY,
    CHANNEL_SCALED_CODECS,
    DIGEST_BYTES,
    DIGEST_DTYPE,
    DIGESTS_ARRAY,
    FEATURE_DTYPE,
    GROUP_METADATA,
    KEY_DTYPE,
    KEYS_ARRAY,
    SCALE_DTYPE,
    SCALED_CODECS,
    STATUS_PENDING,
    VIEW_PARAM_DTYPE,
    VIEW_PARAM_FIELDS,
    channel_scale_arrays,
    channel_scales_path,
    features_path,
    scales_path,
    view_params_path,
)
from featurecache.manifest import Block
from featurecache.spec import CacheSpec
from featurecache.store import Store, open_store


def validate_plan(spec: CacheSpec, plan: Sequence[Block]) -> tuple[Block, ...]:
    """The plan's blocks, pending, after checking they are contiguous from row 0 and own whole
    shards holding their count (SpecMismatchError naming the block otherwise)."""
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
    chain = ChunkChain.named(spec.compressor).zarr_kwargs()  # every array's, inside its shards
    zarr.create_array(
        store, name=KEYS_ARRAY, shape=(rows, spec.key_bytes), chunks=(sr, spec.key_bytes),
        dtype=KEY_DTYPE, fill_value=0, dimension_names=("row", "byte"), **chain,
        attributes={ATTRS_KEY: {"role": "keys", "encoding": "utf-8, NUL-padded"}},
    )  # fmt: skip
    zarr.create_array(
        store, name=DIGESTS_ARRAY, shape=(rows, DIGEST_BYTES), chunks=(sr, DIGEST_BYTES),
        dtype=DIGEST_DTYPE, fill_value=0, dimension_names=("row", "byte"), **chain,
        attributes={ATTRS_KEY: {"role": "digests", "digest": "sample_digest (FORMAT.md)"}},
    )  # fmt: skip
    for view in range(1, spec.views):
        cameras = len(spec.view_cameras)
        zarr.create_array(
            store, name=view_params_path(view), shape=(rows, cameras, len(VIEW_PARAM_FIELDS)),
            chunks=(sr, cameras, len(VIEW_PARAM_FIELDS)), dtype=VIEW_PARAM_DTYPE, fill_value=0,
            dimension_names=("row", "camera", "field"), **chain,
            attributes={ATTRS_KEY: {"role": "view_params", "view": view,
                                    "cameras": list(spec.view_cameras),
                                    "fields": list(VIEW_PARAM_FIELDS)}},
        )  # fmt: skip
    for layer in spec.layers:
        t, d = layer.tokens, layer.dim
        for view in range(spec.views):
            zarr.create_array(
                store, name=features_path(layer.name, view), shape=(rows, t, d),
                chunks=(1, t, d), shards=(sr, t, d), dtype=FEATURE_DTYPE[spec.codec],
                fill_value=0, dimension_names=("row", "token", "dim"), **chain,
                attributes={ATTRS_KEY: {"role": "features", "layer": layer.name, "view": view,
                                        "codec": spec.codec,
                                        "grid": list(layer.grid) if layer.grid else None}},
            )  # fmt: skip
            if spec.codec in SCALED_CODECS:
                zarr.create_array(
                    store, name=scales_path(layer.name, view), shape=(rows, t), chunks=(sr, t),
                    dtype=SCALE_DTYPE, fill_value=0, dimension_names=("row", "token"),
                    **chain, attributes={ATTRS_KEY: {"role": "scales",
                    "layer": layer.name, "view": view,
                    "dequantize": "features[r, t, :] * scales[r, t]"}},
                )  # fmt: skip
        if spec.codec in CHANNEL_SCALED_CODECS:  # written once, here, before any block
            arr = zarr.create_array(
                store, name=channel_scales_path(layer.name), shape=(d,), chunks=(d,),
                dtype=SCALE_DTYPE, fill_value=0, dimension_names=("dim",), **chain,
                attributes={ATTRS_KEY: {"role": "channel_scales", "layer": layer.name,
                "dequantize": "features[r, t, :] * scales[r, t] * channel_scales[:]"}},
            )  # fmt: skip
            arr[:] = channel_scales[layer.name]


def given_channel_scales(
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


def check_same_channel_scales(
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


def write_new_cache(
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


def check_same_cache(st: Store, existing: CacheState, spec: CacheSpec, table: BlockTable) -> None:
    """SpecMismatchError showing both when the existing cache has another spec or block plan. A
    cache written before frame regions were recorded (none) resumes as it was: without them."""
    if not existing.spec.frame_regions:
        spec = replace(spec, frame_regions={})
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
