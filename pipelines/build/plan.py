"""The build's configuration and plan: everything checked before any work starts.

`prepare_build(config)` turns `config.frames` into shards (frames.shards_from_frames: tar
patterns and Python iterables), lists every shard's keys (tar headers only), refuses empty shards
and keys repeated across the input (naming both shards), checks that the output is nothing, an
empty folder or a cache, loads the teacher on the driver's CPU (an unknown spec or a layer out of
range fails here) and returns the cache spec and block plan: one block per input shard, aligned
to Zarr shards (`featurecache.manifest.plan_blocks`). With cameras, every teacher layer is cached
once per camera, as cache layer `<camera>/<layer>` (`featurecache.format.camera_layer`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

from featurecache.completion import load_state
from featurecache.errors import FeatureCacheError, NotACacheError
from featurecache.format import (
    CODECS,
    DEFAULT_CODEC,
    DEFAULT_SHARD_ROWS,
    GROUP_METADATA,
    camera_layer,
)
from featurecache.lease import holds_only_leases
from featurecache.manifest import Block, plan_blocks
from featurecache.pipelines.build.frames import FrameShard, TarShard, shards_from_frames
from featurecache.samples import DEFAULT_CAMERA, check_camera
from featurecache.spec import CacheSpec, LayerSpec
from featurecache.store import is_url, open_store

__all__ = [
    "BuildConfig",
    "BuildError",
    "BuildPlan",
    "cache_layers",
    "load_build_teacher",
    "prepare_build",
    "scan_shards",
]

OnBadFrame = Literal["fail", "skip"]
SCAN_THREADS = 16  # tar shards whose keys the plan lists at once


class BuildError(FeatureCacheError):
    """A build input or option that cannot work (empty shard, duplicate key, bad option) or a
    worker that kept dying."""


@dataclass(kw_only=True)
class BuildConfig:
    """What `featurecache build` does; CLI options map one to one.

    frames: what to read, in order: tar files, globs, brace patterns or folders (str/Path), and
        Python shards: frames.IterableShard / TarShard, or any re-iterable of (key, image) or
        (key, {camera: image}) pairs (wrapped in an IterableShard). One block per shard.
    teacher: "efficientnet-lite0[@R]", "hf:PATH_OR_ID", "hf-vlm:PATH_OR_ID" or "py:MODULE:FACTORY".
    layers: the teacher's layer names to cache ("4", "16", "head"...).
    out: the cache folder or object-store prefix (s3://BUCKET/PATH, gs://BUCKET/PATH; created;
        an existing cache of the same spec resumes). On a cluster, `frames` and `out` are paths
        every node sees (a shared file system) or URLs (no shared file system needed).
    codec: "int8c" (the default: int8 with per-token and per-layer per-channel scales, ~2x
        smaller than fp16), "int8" (per-token absmax only, ~2x smaller; misses the fidelity
        targets with outlier channels) or "fp16" (lossless). See FORMAT.md.
    calibration_frames: int8c: frames of the first shard whose teacher features calibrate each
        layer's channel scale (run by the driver, before any block is written).
    batch_size: frames per teacher forward.
    shard_rows: rows per Zarr shard (the unit a reader decodes and a block is aligned to).
    cameras: camera names to cache, each image `key.<camera>.<ext>` (layers become
        "<camera>/<layer>"); None reads the plain image `key.<ext>` (single-camera data).
    local: True runs in this process without Ray (one worker, same writer, resume and
        fingerprint); False runs a Ray job; None: local unless `address` is given or more than
        one worker is asked for or visible (GPUs), measured in benchmarks/build.py.
    address: a Ray cluster address ("auto", "ray://...", "host:port"); None starts a local one.
    workers: teacher actors; None = the cluster's GPUs / gpus_per_worker, or 1 on CPU-only.
    gpus_per_worker: GPUs each actor asks for when the cluster has GPUs (fractions share one).
    on_bad_frame: "fail" (stop, naming shard and key) or "skip" (record the key, go on).
    overwrite: delete an existing cache at `out` and start over.
    grid: (H, W) to resample every layer's patch grid to; None keeps the native grid.
    trust_remote_code: let transformers run the model folder's own code (hf specs only).
    allow_random_weights: use a hf model whose checkpoint misses (or mismatches) some weights.
    prompt: the hf-vlm instruction (or a whole prompt holding the image token); None = the
        teacher's default.
    decode_threads: image decode + preprocess threads per actor (they run ahead of the model).
    max_retries: times a block is retried after its actor died, before the build fails.
    num_cpus: CPUs of a local Ray instance (None = all; a CPU worker's torch threads follow
        it), or torch threads of a local build on CPU (None = this process's setting, e.g.
        OMP_NUM_THREADS); ignored with `address`.
    ray_temp_dir: the local Ray instance's temp dir (tests give each run its own).
    progress: show the tqdm progress bar on the driver.
    fault_kill_marker: TEST ONLY: a path; the first actor to finish a batch of block 1 while this
        file does not exist creates it and dies (os._exit), exercising the retry path.
    """

    frames: Sequence[Any]
    teacher: str
    layers: Sequence[str]
    out: str | Path
    codec: str = DEFAULT_CODEC
    calibration_frames: int = 16
    batch_size: int = 32
    shard_rows: int = DEFAULT_SHARD_ROWS
    cameras: Sequence[str] | None = None
    local: bool | None = None
    address: str | None = None
    workers: int | None = None
    gpus_per_worker: float = 1.0
    on_bad_frame: OnBadFrame = "fail"
    overwrite: bool = False
    grid: tuple[int, int] | None = None
    trust_remote_code: bool = False
    allow_random_weights: bool = False
    prompt: str | None = None
    decode_threads: int = 2
    max_retries: int = 3
    num_cpus: int | None = None
    ray_temp_dir: str | None = None
    progress: bool = True
    fault_kill_marker: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.frames, str | Path | FrameShard):
            self.frames = [self.frames]
        self.frames = list(self.frames)
        if not self.frames:
            raise BuildError("Expected at least one frames pattern or shard, got none.")
        if isinstance(self.layers, str):
            self.layers = [x for x in self.layers.split(",") if x.strip()]
        self.layers = [str(x).strip() for x in self.layers]
        if self.cameras is not None:
            if isinstance(self.cameras, str):
                self.cameras = [x for x in self.cameras.split(",") if x.strip()]
            self.cameras = [check_camera(str(c).strip(), " in --cameras") for c in self.cameras]
            if not self.cameras or len(set(self.cameras)) != len(self.cameras):
                raise BuildError(f"Expected distinct camera names, got {self.cameras!r}.")
        if self.local and self.address:
            raise BuildError(
                f"Expected either --local or --address, got both (address {self.address!r})."
            )
        if self.codec not in CODECS:
            raise BuildError(f"Expected --codec in {CODECS}, got {self.codec!r}.")
        if self.on_bad_frame not in ("fail", "skip"):
            raise BuildError(f"Expected --on-bad-frame fail or skip, got {self.on_bad_frame!r}.")
        for name in ("batch_size", "shard_rows", "decode_threads", "calibration_frames"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise BuildError(f"Expected {name} to be an integer >= 1, got {value!r}.")
        if self.workers is not None and (not isinstance(self.workers, int) or self.workers < 1):
            raise BuildError(f"Expected --workers >= 1, got {self.workers!r}.")
        if not self.gpus_per_worker > 0:
            raise BuildError(f"Expected --gpus-per-worker > 0, got {self.gpus_per_worker!r}.")
        if self.grid is not None:
            grid = tuple(int(g) for g in self.grid)
            if len(grid) != 2 or min(grid) < 1:
                raise BuildError(f"Expected --grid HxW with H, W >= 1, got {self.grid!r}.")
            self.grid = grid
        if is_url(self.out):  # kept as written: Path() would turn s3://b/c into s3:/b/c
            open_store(self.out)  # UnsupportedURLError now, before any work, for x://, http://
        else:
            self.out = Path(self.out)

    @property
    def camera_names(self) -> tuple[str, ...]:
        """The cameras each frame is read through: the configured ones, or the plain image."""
        return tuple(self.cameras) if self.cameras else (DEFAULT_CAMERA,)


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
    an empty shard or a key that repeats (within a shard or across shards, naming both)."""
    seen: dict[str, str] = {}
    out = []
    for shard, keys in zip(shards, _keys_of(shards), strict=True):
        source = shard.name
        count = 0
        for key in keys:
            if key in seen:
                where = "twice in" if seen[key] == source else f"in {seen[key]} and in"
                raise BuildError(f"Expected unique sample keys, got {key!r} {where} {source}.")
            seen[key] = source
            count += 1
        if count == 0:
            raise BuildError(f"Expected frame samples in every shard, got none in {source}.")
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
    from featurecache.pipelines.build.teachers import load_teacher

    return load_teacher(
        config.teacher,
        config.layers,
        device=device,
        trust_remote_code=config.trust_remote_code,
        allow_random_weights=config.allow_random_weights,
        grid=config.grid,
        prompt=config.prompt,
    )


def cache_layers(teacher_layers: Sequence[LayerSpec], cameras: Sequence[str]) -> list[LayerSpec]:
    """The cache's layers: each teacher layer once per camera, camera-major ("top/4", "top/7",
    "wrist/4", ...); unchanged for the single plain camera."""
    return [
        replace(layer, name=camera_layer(camera, layer.name))
        for camera in cameras
        for layer in teacher_layers
    ]


def prepare_build(config: BuildConfig, teacher: Any | None = None) -> tuple[BuildPlan, Any]:
    """Check everything and plan the build; returns (plan, the teacher loaded on the CPU)."""
    shards = shards_from_frames(config.frames)
    check_output(config.out)
    counted = scan_shards(shards)
    if teacher is None:
        teacher = load_build_teacher(config, "cpu")
    spec = CacheSpec(
        layers=tuple(cache_layers(teacher.layer_specs(), config.camera_names)),
        codec=config.codec,
        shard_rows=config.shard_rows,
        fingerprint=teacher.fingerprint(),
    )
    blocks = plan_blocks([(shard.name, count) for shard, count in counted], config.shard_rows)
    return BuildPlan(tuple(counted), spec, tuple(blocks)), teacher
