"""The training stream: WebDataset frame shards joined by `__key__` with cached teacher targets.

    shard list -> split by node (rank) -> split by worker -> shard shuffle (seed + epoch)
      -> tar samples (raw bytes; featurecache.samples: the grouping, key and image rules of
         the build) -> select image/json/action.npy members
      -> join with the cache, in shard order, a chunk of keys at a time        # (T, D) + (T,)
         (join.py; augment "views": each sample's view of this epoch, and its transforms)
      -> shuffle buffer (raw bytes + targets) -> [resume: drop consumed samples]
      -> decode (PIL image, json, npy with allow_pickle=False) -> student_frame (the view's
         transform, the crop to the region the teacher saw: `frame_regions`, region.py; the
         student's resize) -> batch

Why the join comes before the shuffle buffer: the reader decodes a whole Zarr shard when its
first row is asked for and keeps it in a small LRU. Asking in shard order (the order the tar
shard and the cache block were written in) decodes each Zarr shard once; asking after a
shuffle buffer would hop between shards and could evict a shard before its last row is read.
Image decoding comes after the shuffle (and after the resume skip), so buffered samples stay
small and skipping consumed samples on resume costs no decoding.

Nothing here unpickles: only the image, `json` and `action.npy` members are decoded (npy with
allow_pickle=False); every other member is dropped unread.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image

from featurecache.errors import OptionError, ShapeMismatchError
from featurecache.pipelines.training.alignment import (
    AlignmentTargets,
)
from featurecache.pipelines.training.join import CacheJoin
from featurecache.pipelines.training.region import teacher_pixels
from featurecache.pipelines.training.sample_fields import parse_action, parse_meta
from featurecache.pipelines.views import ViewRecipe, apply_view
from featurecache.region import FrameRegion
from featurecache.samples import DEFAULT_CAMERA, BadFrameError, decode_image, iter_samples
from featurecache.view_params import ViewParams


@dataclass(kw_only=True, slots=True)
class StreamConfig:
    """What one pass (epoch) over the frames reads.

    shards: the tar shards, in order (expand patterns with frames.expand_frame_paths first).
    image_size: the student's square input size; frames are resized to it (bilinear).
    batch_size: samples per batch (the last batch of an epoch may be smaller).
    cache: a feature cache folder to join targets from, or None for frames only.
    layer: the cache layer to read (required with `cache`); with `cameras`, the teacher layer
        ("4"), read as each camera's cache layer ("top/4", "wrist/4").
    cameras: read one image per camera (`key.<camera>.<ext>`) and, with a cache, each camera's
        targets: batches then carry a camera axis (see Batch). None: the plain image `key.<ext>`.
    seed, epoch: shard shuffle and shuffle buffer are seeded by (seed, epoch, rank, worker).
    shuffle: False reads shards and samples in order (evaluation).
    shuffle_buffer: samples held by the shuffle buffer (after the join).
    on_missing: "error" (a key not in the cache raises, naming it) or "skip" (counted).
    on_mismatch: "error" (a frame whose image bytes differ from those the cache row was built
        from raises DigestMismatchError naming the key and both sources) or "skip" (counted
        with the missing ones). Caches without digests (format version 1) cannot be checked.
    keep_images: also return the decoded PIL images (for a resident teacher).
    require_actions: raise when a sample has no `action.npy` (training, evaluation).
    skip_batches: batches of this epoch already consumed (resume): dropped before decoding.
    num_workers: DataLoader worker processes (0 = in this process).
    prepare: a function of each non-empty batch whose result becomes `Batch.inputs`, run where
        the batch is made (in the DataLoader workers when num_workers > 0): an HF student's
        processor (`Student.batch_preparer`), off the training process's critical path.
    augment: "views" replays one cached view per sample per epoch (`views.choose_view` of
        (seed, epoch, key)): its targets are joined and the student's frame gets the identical
        `views.apply_view` transform (`student_frame`); "fresh" draws a new augmentation per
        sample per epoch from `recipe` (`ViewRecipe.draw_fresh`) for the student's frame and the
        kept images (a resident teacher sees it too; a cache's targets stay view 0's: the naive
        comparison); "none" uses the frame itself.
    recipe: the augmentation of "fresh" (views.parse_augment over the stream's cameras).
    frame_regions: {camera: FrameRegion} ("" the plain image), the region of each camera's
        frames the targets describe (`cache.spec.frame_regions`): each frame is cropped to it
        (`region_crop`) before the resize to image_size. None or {}: whole frames.
    """

    shards: Sequence[str | Path]
    image_size: int
    batch_size: int
    cache: str | Path | None = None
    layer: str | None = None
    seed: int = 0
    epoch: int = 0
    shuffle: bool = True
    shuffle_buffer: int = 256
    on_missing: Literal["error", "skip"] = "error"
    on_mismatch: Literal["error", "skip"] = "error"
    keep_images: bool = False
    require_actions: bool = True
    skip_batches: int = 0
    num_workers: int = 0
    cameras: Sequence[str] | None = None
    prepare: Callable[[Batch], Any] | None = None
    augment: Literal["none", "views", "fresh"] = "none"
    recipe: ViewRecipe | None = None
    frame_regions: dict[str, FrameRegion] | None = None

    def __post_init__(self) -> None:
        if not self.shards:
            raise OptionError("Expected at least one tar shard in the stream's `shards`, got none.")
        if self.batch_size < 1:
            raise OptionError(f"Expected batch_size >= 1, got {self.batch_size}.")
        if self.cache is not None and self.layer is None:
            raise OptionError("Expected a `layer` with a `cache`, got layer=None.")
        if self.on_missing not in ("error", "skip"):
            raise OptionError(f"Expected on_missing error|skip, got {self.on_missing!r}.")
        if self.on_mismatch not in ("error", "skip"):
            raise OptionError(f"Expected on_mismatch error|skip, got {self.on_mismatch!r}")
        if self.shuffle_buffer < 1:
            raise OptionError(f"Expected shuffle_buffer >= 1, got {self.shuffle_buffer}.")
        if self.cameras is not None and not self.cameras:
            raise OptionError("Expected at least one camera in `cameras`, got none.")
        if self.augment not in ("none", "views", "fresh"):
            raise OptionError(f"Expected augment none|views|fresh, got {self.augment!r}.")
        if (self.augment == "fresh") != (self.recipe is not None):
            raise OptionError(
                f"Expected a `recipe` exactly with augment='fresh', got augment "
                f"{self.augment!r} and recipe {self.recipe!r}."
            )
        if self.augment == "views" and self.cache is None:
            raise OptionError("Expected a `cache` with augment='views' (its views), got none.")

    @property
    def camera_names(self) -> tuple[str, ...]:
        """The cameras read: the configured ones, or the plain image's ("")."""
        return tuple(self.cameras) if self.cameras else (DEFAULT_CAMERA,)


@dataclass(slots=True)
class Batch:
    """One training batch.

    keys: B sample keys. images: (B, 3, S, S) float32 in [0, 1]; with StreamConfig.cameras,
        (B, C, 3, S, S), cameras in that order (so are target, scales, channel_scale).
    instructions: B strings.
    actions: (B, A) float32, A from the data (NaN rows where a frame has none and
        require_actions is False; A = 0 when no frame of the batch has one).
    target: (B, T, D) as stored (int8 or float16) [(B, C, T, D)], or None without a cache.
    scales: (B, T) [(B, C, T)] float32 per-token absmax scales of an int8 cache, else None.
    channel_scale: (D,) [(C, D)] float32 per-channel scale of an int8c cache, else None.
    meta: B parsed json dicts. images_pil: the decoded PIL images when keep_images (B, or
        B * C frame by frame with cameras; whole, not cropped to a region), else None.
    missing: keys skipped since the previous batch: the cache lacks them (on_missing="skip"),
        or their images are not those the cache was built from (on_mismatch="skip").
    mismatched: those of `missing` skipped for their images.
    inputs: the student's model inputs made from this batch by StreamConfig.prepare, else None.
    views: the cached view each sample replays (StreamConfig.augment "views"), else [].
    """

    keys: list[str]
    images: torch.Tensor
    instructions: list[str]
    actions: torch.Tensor
    target: torch.Tensor | None
    scales: torch.Tensor | None
    meta: list[dict]
    images_pil: list | None = None
    missing: list[str] = field(default_factory=list)
    channel_scale: torch.Tensor | None = None
    mismatched: list[str] = field(default_factory=list)
    inputs: Any = None
    views: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.keys)

    def alignment_targets(self, camera: int | None = None) -> AlignmentTargets | None:
        """The batch's targets for AlignmentHead (of camera index `camera` on a camera axis),
        or None without a cache."""
        if self.target is None:
            return None
        pick = (lambda x: x) if camera is None else (lambda x: None if x is None else x[:, camera])
        channel = self.channel_scale
        return AlignmentTargets(
            values=pick(self.target),
            scales=pick(self.scales),
            channel_scale=channel if camera is None or channel is None else channel[camera],
            keys=self.keys,
            missing=self.missing,
        )


def _worker() -> tuple[int, int]:
    info = torch.utils.data.get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


def _rank() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class _Select:
    """Shard urls -> {key, source, images {camera: (bytes, ext)}, json (bytes|None), npy
    (bytes|None)}, read by featurecache.samples (the build's rules: a frame without the
    image of one of `cameras` fails here)."""

    def __init__(self, cameras: Sequence[str]) -> None:
        self.cameras = tuple(cameras)

    def __call__(self, shards: Iterable[dict]) -> Iterator[dict]:
        for shard in shards:
            url = shard["url"]
            for s in iter_samples(url):
                yield {
                    "key": s.key,
                    "source": url,
                    "images": {c: s.image(c) for c in self.cameras},
                    "encoded": {c: s.image(c)[0] for c in s.cameras},  # for the join's digest
                    "json": s.members.get("json"),
                    "npy": s.members.get("action.npy"),
                }


class _Shuffle:
    """A seeded shuffle buffer; the seed also depends on rank and worker, so streams differ."""

    def __init__(self, size: int, seed: int) -> None:
        self.size, self.seed = size, seed

    def __call__(self, samples: Iterable[dict]) -> Iterator[dict]:
        (worker, _), (rank, _) = _worker(), _rank()
        rng = random.Random(f"{self.seed}/{rank}/{worker}")
        buf: list[dict] = []
        for s in samples:
            buf.append(s)
            if len(buf) >= self.size:
                i = rng.randrange(len(buf))
                buf[i], buf[-1] = buf[-1], buf[i]
                yield buf.pop()
        rng.shuffle(buf)
        yield from buf


class _SkipConsumed:
    """Drop the samples of the first `skip_batches` batches of this worker's share (resume).

    A DataLoader returns worker w's batches at positions w, w + W, w + 2W, ... (in order), so of
    the first k batches worker w made len(range(w, k, W)) of them.
    """

    def __init__(self, skip_batches: int, batch_size: int) -> None:
        self.skip_batches, self.batch_size = skip_batches, batch_size

    def __call__(self, samples: Iterable[dict]) -> Iterator[dict]:
        worker, workers = _worker()
        todo = len(range(worker, self.skip_batches, workers)) * self.batch_size
        for s in samples:
            if todo > 0:  # skip reports met here rode on consumed batches: already counted
                todo -= s["key"] is not None
                continue
            yield s


def student_frame(
    image: Image.Image,
    params: ViewParams | None,
    image_size: int,
    region: FrameRegion | None = None,
    *,
    where: str = "a frame",
) -> torch.Tensor:
    """The student's pixels of one decoded frame: the replayed view's transform (`apply_view`,
    the one the build applied before the teacher; None = the frame itself), then the crop to the
    region of the frame the teacher saw (`region_crop`; None = the whole frame), then a bilinear
    resize to image_size x image_size -> uint8 (S, S, 3). One place for the student-side
    preparation of a frame; `where` names the frame in errors."""
    image = teacher_pixels(image, params, region, where=where)
    resized = image.resize((image_size, image_size), Image.Resampling.BILINEAR)
    return torch.from_numpy(np.asarray(resized, dtype=np.uint8).copy())


class _DecodeBatch:
    """Decode and collate samples into `Batch`es of `batch_size`."""

    def __init__(self, config: StreamConfig) -> None:
        self.image_size, self.batch_size = config.image_size, config.batch_size
        self.recipe, self.seed, self.epoch = config.recipe, config.seed, config.epoch
        self.keep_images, self.require_actions = config.keep_images, config.require_actions
        self.cameras = config.camera_names
        self.camera_axis = config.cameras is not None
        self.regions = dict(config.frame_regions or {})

    def __call__(self, samples: Iterable[dict]) -> Iterator[Batch]:
        group: list[dict] = []
        missing: list[str] = []
        mismatched: list[str] = []
        for s in samples:
            missing += s.get("missing", [])
            mismatched += s.get("mismatched", [])
            if s["key"] is None:
                continue
            group.append(s)
            if len(group) == self.batch_size:
                yield self._collate(group, missing, mismatched)
                group, missing, mismatched = [], [], []
        if group:
            yield self._collate(group, missing, mismatched)
        elif missing:
            yield self._collate([], missing, mismatched)

    def _collate(self, group: list[dict], missing: list[str], mismatched: list[str]) -> Batch:
        pil, pixels, metas, actions = [], [], [], []
        for s in group:
            views = []
            replayed = s.get("view_params")
            for c, camera in enumerate(self.cameras):
                at = (
                    f"sample {s['key']!r}{f' camera {camera!r}' if camera else ''} of {s['source']}"
                )
                image = decode_image(*s["images"][camera], at)
                params = None if replayed is None else replayed[c]
                if self.recipe is not None:  # augment "fresh"
                    params = self.recipe.draw_fresh(
                        self.seed, self.epoch, s["key"], camera, image.size
                    )
                if self.keep_images and params is not None:  # the resident teacher sees it too
                    image, params = apply_view(image, params), None
                pil.append(image)
                region = self.regions.get(camera)
                views.append(student_frame(image, params, self.image_size, region, where=at))
            pixels.append(torch.stack(views) if self.camera_axis else views[0])  # [C,] S, S, 3
            where = f"sample {s['key']!r} of {s['source']}"
            metas.append(parse_meta(s["json"], where))
            if s["npy"] is None:
                if self.require_actions:
                    raise BadFrameError(
                        f"Expected an action.npy in sample {s['key']!r} of {s['source']}, got none."
                    )
                actions.append(None)
            else:
                actions.append(parse_action(s["npy"], where))
        shape = next((a.shape for a in actions if a is not None), (0,))  # from the data
        for s, a in zip(group, actions, strict=True):  # one shape: chunks are never broadcast
            if a is not None and a.shape != shape:
                raise ShapeMismatchError(
                    f"Expected action.npy of shape {shape} (the batch's first) in sample "
                    f"{s['key']!r} of {s['source']}, got {a.shape}: every frame's actions need "
                    f"one shape, (D,) or (H, D)."
                )
        actions = [np.full(shape, np.nan, np.float32) if a is None else a for a in actions]
        side = self.image_size
        empty = (0, len(self.cameras), 3, side, side) if self.camera_axis else (0, 3, side, side)
        images = (
            torch.stack(pixels).movedim(-1, -3).float().div_(255.0) if group else torch.zeros(empty)
        )  # (B, [C,] 3, S, S)
        has_target = bool(group) and "target" in group[0]
        has_scales = has_target and group[0]["scales"] is not None
        return Batch(
            keys=[s["key"] for s in group],
            images=images,
            instructions=[m.get("instruction", "") for m in metas],
            actions=torch.from_numpy(np.stack(actions).astype(np.float32))
            if group
            else torch.zeros((0, 0)),
            target=torch.stack([s["target"] for s in group]) if has_target else None,
            scales=torch.stack([s["scales"] for s in group]) if has_scales else None,
            meta=metas,
            images_pil=pil if self.keep_images else None,
            missing=missing,
            channel_scale=group[0].get("channel_scale") if has_target else None,
            mismatched=mismatched,
            views=[s["view"] for s in group if "view" in s],
        )


def build_pipeline(config: StreamConfig) -> Any:
    """The webdataset DataPipeline of one epoch (iterate it, or hand it to a DataLoader)."""
    import webdataset as wds

    urls = [str(p) for p in config.shards]
    stages: list[Any] = [
        wds.SimpleShardList(urls),
        wds.split_by_node,
        wds.split_by_worker,
    ]
    if config.shuffle:
        stages.append(
            wds.shuffle(len(urls), initial=len(urls), seed=config.seed * 1009 + config.epoch)
        )
    stages.append(_Select(config.camera_names))
    if config.cache is not None:
        assert config.layer is not None
        stages.append(
            CacheJoin(
                config.cache,
                config.layer,
                config.on_missing,
                config.on_mismatch,
                config.camera_names,
                (config.seed, config.epoch) if config.augment == "views" else None,
            )
        )
    if config.shuffle:
        stages.append(_Shuffle(config.shuffle_buffer, config.seed * 1009 + config.epoch))
    if config.skip_batches:
        stages.append(_SkipConsumed(config.skip_batches, config.batch_size))
    stages.append(_DecodeBatch(config))
    if config.prepare is not None:
        stages.append(_Prepare(config.prepare))
    return wds.DataPipeline(*stages)


class _Prepare:
    """Set each non-empty batch's `inputs` to prepare(batch) (StreamConfig.prepare)."""

    def __init__(self, prepare: Callable[[Batch], Any]) -> None:
        self.prepare = prepare

    def __call__(self, batches: Iterable[Batch]) -> Iterator[Batch]:
        for batch in batches:
            if len(batch):
                batch.inputs = self.prepare(batch)
            yield batch


def iter_batches(config: StreamConfig) -> Iterator[Batch]:
    """Batches of one epoch, through a DataLoader with `num_workers` workers when > 0.

    Batches with no samples (only a skip report) are passed on too: check `len(batch)`.
    """
    pipeline = build_pipeline(config)
    if config.num_workers == 0:
        yield from pipeline
        return
    loader = torch.utils.data.DataLoader(
        pipeline, batch_size=None, num_workers=config.num_workers, collate_fn=None
    )
    yield from loader


def check_shards_per_rank(shards: Sequence[str | Path], world_size: int, num_workers: int) -> None:
    """Each rank reads its own shards: there must be at least one per rank (and per worker)."""
    need = world_size * max(1, num_workers)
    if len(shards) < world_size:
        raise OptionError(
            f"Each of the {world_size} ranks reads its own tar shards: expected at least "
            f"{world_size} shards, got {len(shards)}. Write the frames in more, smaller shards."
        )
    if len(shards) < need:
        raise OptionError(
            f"Expected at least {need} tar shards for {world_size} rank(s) x {num_workers} "
            f"worker(s), got {len(shards)}; lower --num-workers."
        )
