"""The build's plan: everything checked before any work starts.

`prepare_build(config)` turns `config.frames` into shards (frames.shards_from_frames: tar
patterns and Python iterables), lists every shard's keys (tar headers only), refuses empty shards
and keys repeated across the input (naming both shards), checks that the output is nothing, an
empty folder or a cache, loads the teacher on the driver's CPU (an unknown spec or a layer out of
range fails here) and returns the cache spec and block plan: one block per input shard, aligned
to Zarr shards (`featurecache.manifest.plan_blocks`). With cameras, every teacher layer is cached
once per camera, as cache layer `<camera>/<layer>` (`featurecache.format.camera_layer`). Layer
sizes are measured on the first decodable frame of the first shard (`probe_frames`), and so is
the region of each camera's frames the teacher sees (`frame_regions`, recorded in the spec).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from PIL import Image

from featurecache.completion import load_state
from featurecache.errors import NotACacheError
from featurecache.format import (
    GROUP_METADATA,
    camera_layer,
)
from featurecache.lease import holds_only_leases
from featurecache.manifest import Block, plan_blocks
from featurecache.pipelines.precompute.config import BuildConfig, BuildError
from featurecache.pipelines.precompute.frames import (
    FrameShard,
    IterableShard,
    TarShard,
    shards_from_frames,
)
from featurecache.region import FrameRegion
from featurecache.samples import BadFrameError
from featurecache.spec import CacheSpec, LayerSpec
from featurecache.store import open_store

__all__ = [
    "BuildPlan",
    "cache_layers",
    "frame_regions",
    "load_build_teacher",
    "prepare_build",
    "probe_frames",
    "scan_shards",
]

SCAN_THREADS = 16  # tar shards whose keys the plan lists at once
PROBE_TRIES = 16  # frames of the first shard tried for the layer-size probe


@dataclass(frozen=True)
class BuildPlan:
    """The checked inputs: shards with their sample counts, the cache spec and the block plan
    (block i reads shards[i])."""

    shards: tuple[tuple[FrameShard, int], ...]
    spec: CacheSpec
    blocks: tuple[Block, ...]

    @property
    def frames(self) -> int:
        return sum(count for _, count in self.shards)


def _keys_of(shards: Sequence[FrameShard]) -> Iterator[Iterable[str]]:
    """Each shard's keys, in order. Tar shards are listed SCAN_THREADS at a time (in an object
    store each is a few ranged reads: latency, not CPU); other shards when their turn comes."""
    pool = ThreadPoolExecutor(SCAN_THREADS, thread_name_prefix="scan")
    try:
        futures = [
            pool.submit(lambda s: list(s.iter_keys()), s) if isinstance(s, TarShard) else None
            for s in shards
        ]
        for shard, future in zip(shards, futures, strict=True):
            yield shard.iter_keys() if future is None else future.result()
    finally:
        pool.shutdown(cancel_futures=True)


def scan_shards(shards: Sequence[FrameShard]) -> list[tuple[FrameShard, int]]:
    """(shard, sample count) per shard, from its keys (tar headers only). Raises BuildError for
    an empty shard or a key that repeats (within a shard or across shards, naming both). A
    Python iterable shard comes back pinned to the keys read here: the build's second read of it
    is checked against them (frames.IterableShard.pinned)."""
    seen: dict[str, str] = {}
    out = []
    for shard, keys in zip(shards, _keys_of(shards), strict=True):
        source = shard.name
        count = 0
        listed: list[str] | None = [] if isinstance(shard, IterableShard) else None
        for key in keys:
            if listed is not None:
                listed.append(key)
            if key in seen:
                where = "twice in" if seen[key] == source else f"in {seen[key]} and in"
                raise BuildError(f"Expected unique sample keys, got {key!r} {where} {source}.")
            seen[key] = source
            count += 1
        if count == 0:
            raise BuildError(f"Expected frame samples in every shard, got none in {source}.")
        if isinstance(shard, IterableShard) and listed is not None:
            shard = shard.pinned(listed)
        out.append((shard, count))
    return out


def check_output(out: str | Path) -> None:
    """Refuse an output that is a file, or a non-empty folder (or object-store prefix) that is
    not a cache."""
    st = open_store(out)
    root = st.local_root
    if root is not None and root.exists() and not root.is_dir():
        raise NotACacheError(
            f"Expected --out to be a cache folder or a new path, got a file: {out}"
        )
    if st.exists(GROUP_METADATA):
        load_state(st)  # NotACacheError / FormatVersionError: a foreign group
    elif not (st.is_empty() or holds_only_leases(st)):  # leases: a build killed at creation
        raise NotACacheError(
            f"Expected --out to be a cache, an empty folder or a new path, got a non-empty "
            f"{'folder' if root is not None else 'object-store prefix'} that is not a cache: {out}"
        )


def load_build_teacher(config: BuildConfig, device: str) -> Any:
    """The teacher `config` names, loaded on `device` (the driver, each worker: one call site)."""
    from featurecache.pipelines.precompute.teachers import load_teacher

    return load_teacher(
        config.teacher,
        config.layers,
        device=device,
        trust_remote_code=config.trust_remote_code,
        allow_random_weights=config.allow_random_weights,
        grid=config.grid,
        prompt=config.prompt,
        frame_region=config.frame_region,
        preprocess=config.preprocess,
    )


def cache_layers(teacher_layers: Sequence[LayerSpec], cameras: Sequence[str]) -> list[LayerSpec]:
    """The cache's layers: each teacher layer once per camera, camera-major ("top/4", "top/7",
    "wrist/4", ...); unchanged for the single plain camera."""
    return [
        replace(layer, name=camera_layer(camera, layer.name))
        for camera in cameras
        for layer in teacher_layers
    ]


def probe_frames(shard: FrameShard, cameras: Sequence[str]) -> list[Image.Image] | None:
    """The images (one per camera, in order) of the first of `shard`'s first PROBE_TRIES frames
    that decodes: the first camera's is what the teacher's layer sizes are measured on, because
    some families' token counts follow the frame's size and aspect ratio (SigLIP2 NaFlex,
    Qwen2-VL, Idefics3, ...); each camera's gives its frame region. None when none decodes (the
    teacher then measures a blank square probe and no region is recorded; the bad frames fail or
    are skipped in their block as usual)."""
    frames = shard.iter_frames()
    try:
        for _, (key, raw) in zip(range(PROBE_TRIES), frames, strict=False):
            try:
                return shard.images(raw, key, cameras)
            except BadFrameError:
                continue
    finally:
        close = getattr(frames, "close", None)
        if close is not None:
            close()  # a generator over a tar (or a store object's stream): release it now
    return None


def frame_regions(
    teacher: Any, cameras: Sequence[str], probes: Sequence[Image.Image] | None
) -> dict[str, FrameRegion]:
    """{camera: the region of its frames the teacher sees}, measured on each camera's probe
    image ({} without probes). Frames of another size than their camera's probe are refused by
    the workers where the region is not the whole frame (FrameRegion.box_for)."""
    if not probes:
        return {}
    return {
        camera: teacher.frame_region(image.height, image.width)
        for camera, image in zip(cameras, probes, strict=True)
    }


def prepare_build(config: BuildConfig, teacher: Any | None = None) -> tuple[BuildPlan, Any]:
    """Check everything and plan the build; returns (plan, the teacher loaded on the CPU)."""
    shards = shards_from_frames(config.frames)
    check_output(config.out)
    counted = scan_shards(shards)
    if teacher is None:
        teacher = load_build_teacher(config, "cpu")
    probes = probe_frames(counted[0][0], config.camera_names)
    spec = CacheSpec(
        layers=tuple(
            cache_layers(teacher.layer_specs(probes[0] if probes else None), config.camera_names)
        ),
        codec=config.codec,
        shard_rows=config.shard_rows,
        compressor=config.compressor,
        fingerprint=teacher.fingerprint(),
        views=config.views,
        augment=None if config.view_recipe is None else config.view_recipe.to_json(),
        frame_regions=frame_regions(teacher, config.camera_names, probes),
    )
    blocks = plan_blocks([(shard.name, count) for shard, count in counted], config.shard_rows)
    return BuildPlan(tuple(counted), spec, tuple(blocks)), teacher
