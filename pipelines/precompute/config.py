"""The build's configuration: `BuildConfig` (what `featurecache build` does, validated when made)
and `BuildError`.

A light module (no torch, no Ray): `featurecache build --help` reads its option defaults from
`BuildConfig`'s fields, and the CLI starts without loading a model stack.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal, get_args

from featurecache.errors import FeatureCacheError, OptionError, SpecError
from featurecache.format import (
    CODECS,
    DEFAULT_CODEC,
    DEFAULT_COMPRESSOR,
    DEFAULT_SHARD_ROWS,
    compressor_level,
)
from featurecache.pipelines.precompute.frames import FrameShard
from featurecache.pipelines.views import ViewRecipe, parse_augment
from featurecache.samples import DEFAULT_CAMERA, check_camera
from featurecache.store import is_url, open_store

__all__ = [
    "DEFAULT_FRAME_REGION",
    "FRAME_REGION_MODES",
    "MAX_DECODE_THREADS",
    "MAX_GRID_SIDE",
    "PREPROCESS_MODES",
    "BuildConfig",
    "BuildError",
    "FrameRegionMode",
    "OnBadFrame",
    "PreprocessMode",
]

OnBadFrame = Literal["fail", "skip"]
# Which part of a frame the teacher sees (README "One view of the frame"): "full" the whole frame,
# squashed to the teacher's input as a student squashes it (a centre crop or letterbox of its
# processor is switched off); "native" the teacher's processor as saved, its region recorded in
# the cache and the training stream cropping the student's frame to it.
FrameRegionMode = Literal["full", "native"]
FRAME_REGION_MODES: tuple[str, ...] = get_args(FrameRegionMode)
DEFAULT_FRAME_REGION: FrameRegionMode = "full"
# Where a teacher's preprocessing runs (README, "2. Build a cache"): "host" in the decode threads
# (PIL resize, float32 to the device: the caches of every earlier build); "device" the threads
# only decode and stack uint8 frames, the teacher's device resizes and normalises.
PreprocessMode = Literal["host", "device"]
PREPROCESS_MODES: tuple[str, ...] = get_args(PreprocessMode)
# --grid's bound, checked before any work: 256x256 = 65,536 tokens per frame and layer, beyond any
# teacher's native grid (DINOv2 at 518 px: 37x37); 4000x4000 would allocate ~100 GB per batch.
MAX_GRID_SIDE: Final = 256
MAX_DECODE_THREADS: Final = 32  # a worker's decode threads when chosen for it


class BuildError(FeatureCacheError):
    """A build input or option that cannot work (empty shard, duplicate key, bad option) or a
    worker that kept dying."""


@dataclass(kw_only=True, slots=True)
class BuildConfig:
    """What `featurecache build` does; CLI options map one to one (their defaults are read from
    these fields).

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
    compressor: inside every stored chunk: "zstd:L" (level 1..22; "zstd:3" the default, the
        format's chain before this option) or "none" (bytes -> crc32c: more bytes on disk, less
        writer CPU; measured in benchmarks/writer.py). Recorded in the cache; plain Zarr reads
        either.
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
    grid: (H, W) to resample every layer's patch grid to (each side <= MAX_GRID_SIDE); None
        keeps the native grid.
    trust_remote_code: let transformers run the model folder's own code (hf specs only).
    allow_random_weights: use a hf model whose checkpoint misses (or mismatches) some weights.
    prompt: the hf-vlm instruction (or a whole prompt holding the image token); None = the
        teacher's default.
    frame_region: "full" (the teacher sees the whole frame, squashed as the student sees it:
        a centre crop or letterbox of an hf processor is switched off) or "native" (the
        processor as saved; the training stream crops the student's frame to the region the
        teacher saw). The region is recorded in the cache either way.
    preprocess: where the teacher's resize + rescale + normalise run. "host" (the default: caches
        identical to earlier builds', so they resume; the fingerprint is fixed by the driver,
        often a CPU-only head node that cannot know what its workers hold): PIL in the decode
        threads, float32 (B, 3, H, W) sent to the device. "device": the decode threads only
        decode and stack uint8 frames (4x fewer bytes; pinned, copied non_blocking on CUDA)
        and the teacher's device resizes (torch, antialiased), rescales and normalises
        (teachers/device_preprocess.py); efficientnet-lite0 and hf: (RADIO and processors of
        transformers' PIL backend) only: py:, hf-vlm: and SigLIP2 NaFlex teachers keep theirs on
        the host. Recorded in the fingerprint: a cache takes features of one mode only.
    decode_threads: image decode + preprocess threads per worker (they run ahead of the model;
        PIL releases the GIL while decoding, so threads scale); None: `decode_threads_for` the
        cores the worker is given (a GPU worker: all of them, up to MAX_DECODE_THREADS).
    max_retries: times a block is retried after its actor died, before the build fails.
    num_cpus: CPUs of a local Ray instance (None = all; a CPU worker's torch threads follow
        it), or torch threads of a local build on CPU (None = this process's setting, e.g.
        OMP_NUM_THREADS); ignored with `address`.
    ray_temp_dir: the local Ray instance's temp dir (tests give each run its own).
    progress: show the tqdm progress bar on the driver.
    views: views cached per frame: 1 = the frame only; V > 1 adds views 1..V-1, augmentations
        drawn by `augment` whose teacher targets and parameters are stored (FORMAT.md "Views";
        training replays them with `train --augment views`). Each frame then costs V forwards.
    augment: the recipe of views 1..V-1 (required when views > 1, refused otherwise): a name
        (openvla, openpi, none), explicit terms ("crop=0.9,ratio=1,flip=0.5,rotate=5,..."), and
        per camera "CAMERA:RECIPE"; a str or several (featurecache.pipelines.views); () = none.
    view_seed: the seed views are drawn from, with each frame's key, camera and view index.
    """

    frames: Sequence[Any]
    teacher: str
    layers: Sequence[str]
    out: str | Path
    codec: str = DEFAULT_CODEC
    compressor: str = DEFAULT_COMPRESSOR
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
    frame_region: FrameRegionMode = DEFAULT_FRAME_REGION
    preprocess: PreprocessMode = "host"
    decode_threads: int | None = None
    max_retries: int = 3
    num_cpus: int | None = None
    ray_temp_dir: str | None = None
    progress: bool = True
    views: int = 1
    augment: Sequence[str] | str = ()
    view_seed: int = 0

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
        try:
            compressor_level(self.compressor, "--compressor")
        except SpecError as exc:
            raise BuildError(f"{exc}.") from None
        if self.frame_region not in FRAME_REGION_MODES:
            raise BuildError(
                f"Expected --frame-region in {FRAME_REGION_MODES}, got {self.frame_region!r}."
            )
        if self.preprocess not in PREPROCESS_MODES:
            raise BuildError(
                f"Expected --preprocess in {PREPROCESS_MODES}, got {self.preprocess!r}."
            )
        if self.on_bad_frame not in get_args(OnBadFrame):
            raise BuildError(f"Expected --on-bad-frame fail or skip, got {self.on_bad_frame!r}.")
        for name in ("batch_size", "shard_rows", "decode_threads", "calibration_frames"):
            value = getattr(self, name)
            if name == "decode_threads" and value is None:
                continue
            if not isinstance(value, int) or value < 1:
                raise BuildError(f"Expected {name} to be an integer >= 1, got {value!r}.")
        if self.workers is not None and (not isinstance(self.workers, int) or self.workers < 1):
            raise BuildError(f"Expected --workers >= 1, got {self.workers!r}.")
        if not self.gpus_per_worker > 0:
            raise BuildError(f"Expected --gpus-per-worker > 0, got {self.gpus_per_worker!r}.")
        if self.grid is not None:
            grid = tuple(int(g) for g in self.grid)
            if len(grid) != 2 or min(grid) < 1 or max(grid) > MAX_GRID_SIDE:
                raise OptionError(
                    f"Expected --grid HxW with 1 <= H, W <= {MAX_GRID_SIDE}, got {self.grid!r}."
                )
            self.grid = grid
        if not isinstance(self.views, int) or self.views < 1:
            raise BuildError(f"Expected --views to be an integer >= 1, got {self.views!r}.")
        if isinstance(self.augment, str):
            self.augment = (self.augment,)
        self.augment = tuple(str(a) for a in self.augment or ())
        if self.views > 1 and not self.augment:
            raise BuildError(
                f"Expected --augment RECIPE (openvla, openpi, or terms such as "
                f"crop=0.9,ratio=1,brightness=0.2) with --views {self.views}, got none."
            )
        if self.views == 1 and self.augment:
            raise BuildError(
                f"Expected --views V > 1 with --augment {' '.join(self.augment)!r} (view 0 is "
                f"the frame itself; V - 1 augmented views are cached), got --views 1."
            )
        self.view_recipe  # noqa: B018 -- parse now: OptionError before any work
        if is_url(self.out):  # kept as written: Path() would turn s3://b/c into s3:/b/c
            open_store(self.out)  # UnsupportedURLError now, before any work, for x://, http://
        else:
            self.out = Path(self.out)

    def decode_threads_for(self, cores: int, device: str) -> int:
        """Decode threads of a worker given `cores` CPU cores on `device`: `decode_threads` when
        set; else on CUDA every core (the host only decodes there, and a GPU eats frames faster
        than a core decodes them), up to MAX_DECODE_THREADS; on the CPU a quarter of them, at
        least 2 (the teacher's forward uses the cores there)."""
        if self.decode_threads is not None:
            return self.decode_threads
        if device == "cuda":
            return max(1, min(cores, MAX_DECODE_THREADS))
        return max(2, min(cores // 4, MAX_DECODE_THREADS))

    @property
    def view_recipe(self) -> ViewRecipe | None:
        """The parsed `augment` for the build's cameras, or None with one view."""
        if self.views == 1 or not self.augment:
            return None
        return parse_augment(self.augment, self.camera_names, self.view_seed)

    @property
    def camera_names(self) -> tuple[str, ...]:
        """The cameras each frame is read through: the configured ones, or the plain image."""
        return tuple(self.cameras) if self.cameras else (DEFAULT_CAMERA,)
