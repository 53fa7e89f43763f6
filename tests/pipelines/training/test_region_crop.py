"""The student's side of one view of the frame (issue 20 part 3): `region_crop` and the training
stream show the student the region of the frame the cached targets describe.

Oracles, written in the test: the crop box from the processors' documented rules
(frame_regions.short_side_then_crop) applied with PIL's own `resize(box=...)`; the teacher's view
read back from its processor output (un-normalised); a direct forward of the tiny DINOv2 on
pixels prepared here (numpy normalisation), compared with the cached targets.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from featurecache.errors import FrameRegionError
from featurecache.pipelines.precompute.config import BuildConfig
from featurecache.pipelines.precompute.precompute import build_cache
from featurecache.pipelines.precompute.teachers import load_teacher
from featurecache.pipelines.training import region_crop
from featurecache.pipelines.training.cached_targets import CachedTargets
from featurecache.pipelines.training.stream import StreamConfig, iter_batches
from featurecache.reader import open_cache
from featurecache.region import FrameRegion

from ..frame_regions import (
    HUB_CROP,
    HUB_SHORT,
    LEROBOT,
    WIDE,
    save_dinov2_hub,
    short_side_then_crop,
    smooth_frame,
    write_frames_tar,
)
from ..precompute.tiny_teachers import save_tiny_teacher

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406])
IMAGENET_STD = np.array([0.229, 0.224, 0.225])


# ---- region_crop on its own -------------------------------------------------------------------


def test_whole_or_no_region_leaves_the_frame_alone() -> None:
    frame = smooth_frame(480, 640, seed=0)
    assert region_crop(frame, None) is frame
    assert region_crop(frame, FrameRegion.whole_frame(240, 320)) is frame  # any size


def test_a_crop_is_the_box_rounded_to_pixels_and_refuses_another_size() -> None:
    frame = smooth_frame(480, 640, seed=0)
    region = FrameRegion(frame=(480, 640), box=(106.67, 26.67, 533.33, 453.33), mapping="resize")
    out = region_crop(frame, region)
    assert out.size == (426, 426)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(frame)[27:453, 107:533])
    with pytest.raises(FrameRegionError, match=r"Expected a 640x480 frame.*got 512x256 \(k7\)"):
        region_crop(smooth_frame(256, 512, seed=0), region, where="k7")


def test_a_letterbox_is_reproduced_with_its_colour_and_refused_without() -> None:
    frame = smooth_frame(256, 512, seed=0)
    fill = (122, 116, 104)
    letterbox = {"frame": (256, 512), "box": (0, 0, 512, 256), "pad": (0, 128, 0, 128)}
    region = FrameRegion(**letterbox, mapping="pad", fill=fill)
    out = np.asarray(region_crop(frame, region))
    want = np.empty((512, 512, 3), np.uint8)  # the letterbox, by hand
    want[:] = fill
    want[128:384] = np.asarray(frame)
    np.testing.assert_array_equal(out, want)
    unknown = FrameRegion(**letterbox, mapping="pad")
    with pytest.raises(FrameRegionError, match="unknown colour"):
        region_crop(frame, unknown)


# ---- the stream and the cache -----------------------------------------------------------------


CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073])
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711])


@dataclass(frozen=True)
class NativeCache:
    """A cache of 4 frames through a cropping teacher with its processor as saved (fp16)."""

    family: str  # "dinov2_hub" (short side 36, crop 32) or "clip" (short side 32, crop 32)
    spec: str
    shard: Path
    cache: Path
    frames: list
    size: tuple[int, int]  # (height, width)
    short: int
    mean: np.ndarray
    std: np.ndarray


CASES = {  # family: (frame size, short side, mean, std), the processors tiny_teachers saves
    "dinov2_hub": (LEROBOT, HUB_SHORT, IMAGENET_MEAN, IMAGENET_STD),
    "clip": (WIDE, 32, CLIP_MEAN, CLIP_STD),
}


@pytest.fixture(scope="module", params=sorted(CASES), ids=["clip@256x512", "dinov2_hub@480x640"])
def native_cache(request, tmp_path_factory: pytest.TempPathFactory) -> NativeCache:
    """DINOv2 hub-style on LeRobot-sized frames, CLIP on 2:1 frames: `build --frame-region
    native`, so the cache records a crop."""
    family = request.param
    size, short, mean, std = CASES[family]
    root = tmp_path_factory.mktemp(f"region_{family}")
    folder = (
        save_dinov2_hub(root / family)
        if family == "dinov2_hub"
        else save_tiny_teacher(family, root / family)
    )
    spec = f"hf:{folder}"
    frames = [smooth_frame(*size, seed=10 + i) for i in range(4)]
    shard = root / "frames-000000.tar"
    write_frames_tar(shard, frames)
    cache = root / "cache.zarr"
    build_cache(
        BuildConfig(
            frames=[shard],
            teacher=spec,
            layers=["1"],
            out=cache,
            codec="fp16",
            local=True,
            frame_region="native",
            progress=False,
        )
    )
    return NativeCache(
        family=family, spec=spec, shard=shard, cache=cache, frames=frames, size=size,
        short=short, mean=mean, std=std,
    )  # fmt: skip


def _stream(shard: Path, cache: Path, regions) -> torch.Tensor:
    config = StreamConfig(
        shards=[shard],
        image_size=HUB_CROP,
        batch_size=4,
        cache=cache,
        layer="1",
        shuffle=False,
        frame_regions=regions,
    )
    (batch,) = [b for b in iter_batches(config) if len(b)]
    return batch.images  # (4, 3, 32, 32) in [0, 1]


def test_the_streams_student_frame_is_the_teachers_view(native_cache) -> None:
    """Same pixels up to the resize: the stream's student frame (cropped to the recorded region,
    then resized) against the teacher's processor output, un-normalised."""
    c = native_cache
    teacher = load_teacher(c.spec, ["1"], frame_region="native")
    seen = teacher.preprocess(c.frames)["pixel_values"].numpy()  # (4, 3, 32, 32), normalised
    teachers_view = seen * c.std[:, None, None] + c.mean[:, None, None]  # [0, 1] pixels
    regions = open_cache(c.cache).spec.frame_regions
    aligned = np.abs(_stream(c.shard, c.cache, regions).numpy() - teachers_view).mean()
    squashed = np.abs(_stream(c.shard, c.cache, None).numpy() - teachers_view).mean()
    assert aligned < 0.01  # measured 0.003: bilinear after a crop vs bicubic before it
    assert squashed > 0.1  # measured 0.18: the whole frame squashed is another picture


def _direct_forward(c: NativeCache, pixels: list[Image.Image]) -> torch.Tensor:
    """hidden_states[1] patch tokens of the tiny model (CLIP: its vision tower), on 32x32 RGB
    images normalised here."""
    from transformers import AutoModel

    model = AutoModel.from_pretrained(c.spec.removeprefix("hf:")).eval()
    model = model.vision_model if c.family == "clip" else model
    x = np.stack([np.asarray(p, dtype=np.float64) / 255.0 for p in pixels])
    x = (x - c.mean) / c.std
    batch = torch.from_numpy(x).permute(0, 3, 1, 2).float()
    with torch.inference_mode():
        out = model(pixel_values=batch, output_hidden_states=True)
    return out.hidden_states[1][:, 1:]  # CLS dropped


def test_the_teacher_on_the_students_view_gives_the_cached_targets(native_cache) -> None:
    """The cached targets equal the teacher run on the region the student is shown (the crop
    box of the documented rule, resampled by PIL straight to 32 px), and not the teacher on the
    whole frame squashed, which the student would see without the region."""
    c = native_cache
    cached = open_cache(c.cache).read([f"f{i:04d}" for i in range(4)], "1").float()  # (4, 16, 32)
    box = short_side_then_crop(*c.size, c.short, HUB_CROP)
    size = (HUB_CROP, HUB_CROP)
    bicubic = Image.Resampling.BICUBIC
    region_view = _direct_forward(c, [f.resize(size, bicubic, box=box) for f in c.frames])
    whole_view = _direct_forward(c, [f.resize(size, bicubic) for f in c.frames])
    cos = torch.nn.functional.cosine_similarity
    aligned = cos(cached, region_view, dim=-1)  # (4, 16) per token
    misaligned = cos(cached, whole_view, dim=-1)
    # measured: 1.0000 mean, 0.999999 min (PIL's box resize is the processor's resize + crop)
    assert float(aligned.mean()) > 0.9999 and float(aligned.min()) > 0.999
    assert float(misaligned.mean()) < 0.9  # measured: 0.46


def test_a_run_keeps_the_region_for_evaluation_and_refuses_other_frame_sizes(
    native_cache, tmp_path
) -> None:
    """train records the cache's regions in the run's target; evaluate shows the student the
    same crop, and refuses frames of another size (their box is unknown)."""
    from featurecache.pipelines.training import evaluate_run, load_run, train

    from ._train_helpers import train_config

    c = native_cache
    run = tmp_path / "run"
    train(train_config([c.shard], run, cache=str(c.cache), steps=2, batch_size=4))
    regions = open_cache(c.cache).spec.frame_regions
    assert load_run(run, "cpu").target.frame_regions == regions
    assert evaluate_run(run, [str(c.shard)])["samples"] == 4
    other = tmp_path / "small-000000.tar"
    write_frames_tar(other, [smooth_frame(240, 320, seed=3)])
    height, width = c.size
    with pytest.raises(FrameRegionError, match=rf"Expected a {width}x{height} frame.*got 320x240"):
        evaluate_run(run, [str(other)])


@pytest.mark.parametrize("short", [32, 36], ids=["no crop", "crop into the letterbox"])
def test_a_letterboxing_processors_view_is_the_padded_region(short) -> None:
    """LLaVA's processor with do_pad centres a 2:1 frame on a square of its mean colour before
    resizing: the recorded region reaches outside the frame, and region_crop reproduces the
    letterbox (same pixels as the processor's input, up to uint8 rounding of the resize)."""
    import transformers

    from featurecache.pipelines.precompute.teachers.region import image_processor_region

    processor = transformers.LlavaImageProcessorPil(
        do_pad=True, size={"shortest_edge": short}, crop_size={"height": 32, "width": 32}
    )
    frame = smooth_frame(256, 512, seed=4)
    region = image_processor_region(processor, 256, 512)
    # by hand: the 512x512 letterbox (frame rows 128..384) resized to short x short, the centre
    # 32 px kept: (short - 32) // 2 = 0 or 2 resized px, 512 / short frame px each, cut off
    cut = (short - 32) // 2 * 512 / short
    assert region.mapping == "pad" and region.box == (cut, 0.0, 512.0 - cut, 256.0)
    assert region.pad == pytest.approx((0.0, 128.0 - cut, 0.0, 128.0 - cut))
    mean = np.array(processor.image_mean)
    assert region.fill == tuple(int(m * 255) for m in mean)  # LLaVA's background colour
    seen = processor(images=[frame], return_tensors="np")["pixel_values"][0]  # (3, 32, 32)
    teachers_view = seen * np.array(processor.image_std)[:, None, None] + mean[:, None, None]
    student = region_crop(frame, region).resize((32, 32), Image.Resampling.BICUBIC)
    diff = np.abs(np.asarray(student, np.float64).transpose(2, 0, 1) / 255 - teachers_view)
    # up to uint8 rounding, and (with the crop) the box's and pad's rounding to whole pixels
    assert diff.max() < 4 / 255 and diff.mean() < 0.5 / 255


def test_padding_after_normalisation_is_the_mean_colour_bottom_right() -> None:
    """transformers' PIL backend pads to pad_size at the bottom and right after normalising (0,
    i.e. the mean colour): the region grows that way and region_crop reproduces it."""
    import transformers

    from featurecache.pipelines.precompute.teachers.region import image_processor_region

    processor = transformers.CLIPImageProcessorPil(
        size={"shortest_edge": 32},
        crop_size={"height": 32, "width": 32},
        do_pad=True,
        pad_size={"height": 40, "width": 36},
    )
    frame = smooth_frame(256, 512, seed=5)
    region = image_processor_region(processor, 256, 512)
    assert region.mapping == "pad" and region.input == (40, 36)
    seen = processor(images=[frame], return_tensors="np")["pixel_values"][0]  # (3, 40, 36)
    mean, std = np.array(processor.image_mean), np.array(processor.image_std)
    teachers_view = seen * std[:, None, None] + mean[:, None, None]
    student = region_crop(frame, region).resize((36, 40), Image.Resampling.BICUBIC)
    diff = np.abs(np.asarray(student, np.float64).transpose(2, 0, 1) / 255 - teachers_view)
    # Same pixels except within the filter's reach (2 px) of the frame's edge: the teacher pads
    # after its resize (a hard edge), the student resizes the padded region (a blended one).
    assert region.box == (128.0, 0.0, 384.0, 256.0)  # CLIP's centre square; padding beside it
    assert region.pad == (0.0, 0.0, 32.0, 64.0)  # 4 and 8 px of the 32 px crop, 8 frame px each
    assert diff[:, :30, :30].max() < 2 / 255  # the frame
    assert diff[:, 34:, :].max() < 1 / 255 and diff[:, :, 34:].max() < 1 / 255  # the padding


def test_a_crop_that_cuts_the_whole_letterbox_away_is_a_plain_crop() -> None:
    import transformers

    from featurecache.pipelines.precompute.teachers.region import image_processor_region

    processor = transformers.LlavaImageProcessorPil(
        do_pad=True, size={"shortest_edge": 64}, crop_size={"height": 32, "width": 32}
    )
    # the 512x512 letterbox resized to 64 (8 frame px each): the centre 32 px are frame rows
    # 128..384 of the square, i.e. all 256 rows of the frame, and its columns 128..384
    region = image_processor_region(processor, 256, 512)
    assert region.box == (128.0, 0.0, 384.0, 256.0)
    assert region.pad == (0.0, 0.0, 0.0, 0.0) and region.mapping == "resize"
    assert region.fill is None


@pytest.mark.parametrize("as_array", [False, True], ids=["pil", "uint8"])
def test_cached_targets_shows_the_student_the_region_the_teacher_saw(
    native_cache, as_array
) -> None:
    """CachedTargets(image=...) crops each sample's frame to the documented box (rounded to whole
    pixels) before collate, keeping its type; the targets are the frame's cached rows."""
    c = native_cache
    keys = [f"f{i:04d}" for i in range(4)]
    frames = [np.asarray(f) if as_array else f for f in c.frames]
    samples = [{"key": k, "image": f} for k, f in zip(keys, frames, strict=True)]
    collate = CachedTargets(c.cache, "1", image="image", collate=lambda batch: batch)
    batch, targets = collate(samples)  # (the collated list, AlignmentTargets)
    box = tuple(round(v) for v in short_side_then_crop(*c.size, c.short, HUB_CROP))
    for sample, frame in zip(batch, c.frames, strict=True):
        got = sample["image"]
        assert isinstance(got, np.ndarray) == as_array
        assert np.array_equal(np.asarray(got), np.asarray(frame.crop(box)))
    cached = open_cache(c.cache).read(keys, "1")
    assert torch.equal(targets.values, cached)
