"""The build's workers: `BuildWorker` (holds the teacher, writes whole blocks) and `Progress`
(frames done per block, for the driver's progress bar on a Ray build).

`BuildWorker` is a plain class: the Ray driver turns it into an actor with `ray.remote(...)` (Ray
pickles it by reference to this module, which every node imports from the installed package);
a local build (`--local`) makes one in its own process. Either way a block is written the same
way, by the same code, so the two give identical arrays.
"""

from __future__ import annotations

import collections
import json
import os
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
from PIL import Image

from featurecache.batching import batched
from featurecache.codecs import encode_on_device
from featurecache.errors import SpecMismatchError
from featurecache.format import VIEW_PARAM_FIELDS, camera_layer, sample_digest
from featurecache.pipelines.precompute.config import BuildConfig
from featurecache.pipelines.precompute.frames import FramesChangedError, FrameShard
from featurecache.pipelines.precompute.host_copies import DeviceFeatures, HostCopies
from featurecache.pipelines.precompute.plan import load_build_teacher
from featurecache.pipelines.views import ViewRecipe, apply_view
from featurecache.samples import BadFrameError

__all__ = [
    "BuildWorker",
    "Progress",
    "RemoteProgress",
    "augmented_views",
    "calibration_features",
]

SKIP_HINT = "use --on-bad-frame skip to skip and record such frames"
Report = Callable[[int, int], None]  # (block index, frames processed since the last call)


class BuildWorker:
    """Holds the teacher and writes blocks (a Ray actor, or an object of a local build).

    config: the build's config. fingerprint: the driver's teacher fingerprint; the worker's own
    teacher must match it (so nodes with other package versions or weights cannot mix features
    into one cache). device: "cpu" or "cuda". report: called after each written batch with (block
    index, frames done). teacher: an already loaded teacher to use (local builds reuse the
    driver's), else one is loaded on `device`. cores: the CPU cores this worker is given (its
    decode pool: `BuildConfig.decode_threads_for`).
    """

    def __init__(
        self,
        config: BuildConfig,
        fingerprint: dict,
        device: str,
        report: Report | None = None,
        teacher: Any | None = None,
        cores: int = 1,
    ) -> None:
        import torch

        from featurecache.writer import open_writer

        if device == "cpu" and os.environ.get("OMP_NUM_THREADS"):
            torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
        self.config = config
        self.cameras = config.camera_names
        self.recipe = config.view_recipe  # None with one view
        self.teacher = teacher if teacher is not None else load_build_teacher(config, device)
        mine = self.teacher.fingerprint()
        if _canonical(mine) != _canonical(fingerprint):
            raise SpecMismatchError(
                f"Expected the worker's teacher fingerprint to equal the driver's, got\n"
                f"  worker: {mine}\n  driver: {fingerprint}"
            )
        self.writer = open_writer(config.out)
        self.regions = self.writer.spec.frame_regions  # {camera: FrameRegion}, maybe {}
        self._channel_scales: dict[str, Any] = {}  # int8c: {layer: (dim,) on the device}
        self.report = report
        self.decode_threads = config.decode_threads_for(cores, device)

    def ready(self) -> str:
        """The node this actor runs on (also: a cheap call to wait for the teacher to load)."""
        import socket

        return socket.gethostname()

    def cpu_seconds(self) -> float:
        """CPU time this process has used (all its threads: torch, decode, write)."""
        import time

        return time.process_time()

    def run_block(self, index: int, shard: FrameShard) -> Any:
        """Write block `index` from `shard`; returns the BlockResult (not marked done yet)."""
        cfg = self.config
        block = self.writer.open_block(index, overwrite=False)
        # Three stages overlap: decode + preprocess (decode_threads batches ahead; with
        # --preprocess device only decode + stack uint8), the teacher and the codec on its
        # device (this thread), compress + write (one thread, in order, 2 batches behind; on
        # CUDA it waits for the encoded bytes' copies to the host, which overlap the next
        # batch's forward).
        threads = self.decode_threads
        decode = ThreadPoolExecutor(threads, thread_name_prefix="decode")
        write = ThreadPoolExecutor(1, thread_name_prefix="write")
        inputs: collections.deque[Future] = collections.deque()
        outputs: collections.deque[Future] = collections.deque()
        try:
            for batch in batched(shard.iter_frames(), cfg.batch_size):
                inputs.append(decode.submit(self._prepare, batch, shard))
                if len(inputs) > threads:
                    self._forward(block, inputs.popleft().result(), index, write, outputs)
            while inputs:
                self._forward(block, inputs.popleft().result(), index, write, outputs)
            while outputs:
                outputs.popleft().result()
            result = block.finish()
            _check_planned(shard, result, block.block.count)
            self.writer.mark_done(result)  # this worker commits its block: one small record
            return result
        finally:
            decode.shutdown(wait=False, cancel_futures=True)
            write.shutdown(wait=True, cancel_futures=True)

    def _prepare(
        self, batch: list[tuple[str, Any]], shard: FrameShard
    ) -> tuple[list[str], Any, list[str], list[bytes] | None, Any]:
        """Decode + the teacher's host-side preprocessing (thread pool): (good keys, its batch
        of B * V * C images (frame-major, then view, then camera: `teacher.prepare`), or None;
        bad keys; the good frames' sample_digest, or None when the shard has no encoded images;
        views' params float64 (B, V - 1, C, fields), or None with one view)."""
        keys, images, bad, digests, params = [], [], [], [], []
        for key, raw in batch:
            try:
                frames = shard.images(raw, key, self.cameras)
                self._check_regions(frames, key, shard)
                encoded = shard.encoded(raw, self.cameras)
            except BadFrameError as err:
                if self.config.on_bad_frame == "fail":
                    raise BadFrameError(f"{err} ({SKIP_HINT})") from None
                bad.append(key)
                continue
            images += frames
            if self.recipe is not None:
                views, rows = augmented_views(self.recipe, self.config.views, key, frames)
                images += views
                params.append(rows)
            digests.append(None if encoded is None else sample_digest(encoded))
            keys.append(key)
        inputs = self.teacher.prepare(images) if images else None
        view_params = np.stack(params) if params else None
        return keys, inputs, bad, (None if None in digests else digests), view_params

    def _check_regions(self, frame: list[Any], key: str, shard: FrameShard) -> None:
        """FrameRegionError for an image of another size than its camera's recorded region was
        measured on, where that region is not the whole frame (the teacher saw another part of
        it than the cache says)."""
        for camera, image in zip(self.cameras, frame, strict=True):
            region = self.regions.get(camera)
            if region is not None:
                what = f"sample {key!r}{f' camera {camera!r}' if camera else ''} of {shard.name}"
                region.box_for(image.height, image.width, what)

    def _forward(
        self,
        block: Any,
        prepared: tuple,
        index: int,
        write: ThreadPoolExecutor,
        outputs: collections.deque[Future],
    ) -> None:
        """Run the teacher on a prepared batch; hand the features to the write thread."""
        import torch

        keys, inputs, bad, digests, params = prepared
        copies = HostCopies.start([])
        if keys:
            with torch.inference_mode():
                out = self.teacher.forward(self.teacher.model_input(inputs))
                views = _per_camera(out, self.cameras, len(keys), self.config.views)
                # the codec runs where the features are: only the stored bytes come back, copied
                # without blocking this thread (host_copies.py)
                copies = HostCopies.start(
                    [{name: self._encode(block, name, x) for name, x in view.items()}
                     for view in views]
                )  # fmt: skip
        outputs.append(write.submit(self._write, block, keys, copies, digests, params, bad, index))
        while len(outputs) > 2:
            outputs.popleft().result()  # bounded: at most 2 batches of features wait

    def _encode(self, block: Any, layer: str, x: Any) -> DeviceFeatures:
        """A cache layer's features (n, tokens, dim) on the teacher's device -> its stored bytes,
        still there (`codecs.encode_on_device`: byte for byte the writer's numpy encoding)."""
        codec = block.spec.codec
        scale = self._channel_scales.get(layer)
        if scale is None and codec == "int8c":
            import torch

            scale = torch.from_numpy(block.channel_scales[layer]).to(x.device)
            self._channel_scales[layer] = scale
        return encode_on_device(x, codec, scale)

    def _write(
        self,
        block: Any,
        keys: list[str],
        copies: HostCopies,
        digests: list[bytes] | None,
        params: Any,
        bad: list[str],
        index: int,
    ) -> None:
        for key in bad:
            block.skip(key)
        if keys:
            feats = copies.wait()  # the one sync with the device's copies
            block.append(keys, feats[0], digests, view_features=feats[1:], view_params=params)
        if self.report is not None:
            self.report(index, len(keys) + len(bad))


def calibration_features(config: BuildConfig, teacher: Any, shard: FrameShard) -> dict[str, Any]:
    """The teacher's features of the first `config.calibration_frames` decodable frames of
    `shard`, per cache layer: {layer: float32 tensor (n, tokens, dim)}, {} when none decodes.
    The sample an int8c cache's channel scales are calibrated on, before any block is written
    (one vector per layer, fixed at creation: docs/FORMAT.md). With on_bad_frame "fail" a frame
    that does not decode (or lacks a camera) fails here, naming it, as its block would; with
    "skip" it is passed over (its block records it)."""
    import torch

    cameras = config.camera_names
    images: list[Any] = []
    frames = 0
    for key, raw in shard.iter_frames():
        if frames == config.calibration_frames:
            break
        try:
            images += shard.images(raw, key, cameras)
        except BadFrameError as err:
            if config.on_bad_frame == "fail":
                raise BadFrameError(f"{err} ({SKIP_HINT})") from None
            continue
        frames += 1
    parts: dict[str, list[Any]] = {}
    step = config.batch_size * len(cameras)
    for start in range(0, len(images), step):
        batch = images[start : start + step]
        out = {k: v.float().cpu() for k, v in teacher(batch).items()}
        for layer, value in _per_camera(out, cameras, len(batch) // len(cameras))[0].items():
            parts.setdefault(layer, []).append(value)
    return {layer: torch.cat(values) for layer, values in parts.items()}


def augmented_views(
    recipe: ViewRecipe, views: int, key: str, frames: Sequence[Image.Image]
) -> tuple[list[Image.Image], np.ndarray]:
    """Views 1..views-1 of one sample's camera frames (in `recipe.cameras` order): (the images,
    view-major then camera; their params float64 (views - 1, cameras, fields))."""
    images, rows = [], np.empty((views - 1, len(frames), len(VIEW_PARAM_FIELDS)))
    for view in range(1, views):
        for c, (camera, frame) in enumerate(zip(recipe.cameras, frames, strict=True)):
            params = recipe.draw(key, view, camera, frame.size)
            images.append(apply_view(frame, params))
            rows[view - 1, c] = params.to_row(frame.size)
    return images, rows


def _per_camera(
    out: dict[str, Any], cameras: Sequence[str], frames: int, views: int = 1
) -> list[dict[str, Any]]:
    """Teacher outputs over B * V * C images (frame-major, then view, then camera) -> per view,
    cache layers: [{"top/4": (B, T, D), ...} of view 0, of view 1, ...] (the plain layer names
    with the single default camera)."""
    feats: list[dict[str, Any]] = [{} for _ in range(views)]
    for layer, value in out.items():
        per_frame = value.reshape(frames, views, len(cameras), *value.shape[1:])  # (B, V, C, ..)
        for view in range(views):
            for c, camera in enumerate(cameras):
                feats[view][camera_layer(camera, layer)] = per_frame[:, view, c]
    return feats


class RemoteProgress:
    """A `Report` that forwards to a `Progress` actor (picklable: it travels to every worker)."""

    def __init__(self, actor: Any) -> None:
        self.actor = actor

    def __call__(self, index: int, frames: int) -> None:
        self.actor.add.remote(index, frames)


class Progress:
    """A tiny Ray actor: frames processed per block, reported by workers after each batch."""

    def __init__(self) -> None:
        self.frames: dict[int, int] = {}

    def add(self, block: int, n: int) -> None:
        self.frames[block] = self.frames.get(block, 0) + n

    def reset(self, block: int) -> None:
        self.frames.pop(block, None)

    def get(self) -> dict[int, int]:
        return dict(self.frames)


def _check_planned(shard: FrameShard, result: Any, planned: int) -> None:
    """FramesChangedError unless the block read as many frames (written + skipped) as the plan
    counted in its shard: a shard that yields fewer frames than it listed is not done."""
    read = result.count + len(result.skipped)
    if read != planned:
        raise FramesChangedError(
            f"Expected {planned} frames in {shard.name} (as the plan counted its keys), got "
            f"{read} in the build's read of it (the shard changed, or its keys and frames "
            f"disagree); the block is left pending"
        )


def _canonical(fingerprint: dict) -> Any:
    return json.loads(json.dumps(fingerprint, sort_keys=True))
