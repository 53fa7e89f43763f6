"""Preprocessing on the teacher's device (`featurecache build --preprocess device`): the decode
threads only decode and stack frames as uint8; the device resizes, rescales and normalises.

    batch = FrameBatch.stack(images, pin=True)          # decode thread: uint8, pinned on CUDA
    x = recipe(batch.to("cuda", non_blocking=True))      # device: (B, 3, h, w) float32
    recipe = DevicePreprocess.from_image_processor(processor, where="hf:/m/dinov2")

Host path (a transformers PIL-backend processor, efficientnet-lite0): resize the uint8 frame
with PIL, [centre crop], then per pixel rescale + normalise to float32. The device replays it:

    resize        torch F.interpolate of the pixels as float, antialias=True (the processor's
                  filter: PIL BILINEAR -> "bilinear", BICUBIC -> "bicubic", NEAREST ->
                  "nearest-exact"), as PIL runs it: width, then height, each pass rounded
                  half up and clipped to 0..255; skipped for a frame already at the size
                  (PIL returns a copy then)
    centre crop   the same window, (h - ch) // 2, (w - cw) // 2
    values        a lookup table (3, 256) float32: channel c's value of pixel v computed by the
                  host's own code (the processor's `rescale` and `normalize`), so every pixel
                  that reaches it equal gets bit-identical floats

So frames already at the model's size give bit-identical inputs; a resize differs from PIL's by
at most two 8-bit steps on a few pixels in a hundred (torch's antialiased filters are PIL's, its
arithmetic float where PIL's is fixed point; measured on sample frames 64 -> 32..224 px, bilinear
and bicubic: tests/pipelines/precompute/test_device_preprocess.py).
RADIO's recipe is torch already ([0, 1] floats, bilinear without antialias): `resize_pixels`
False runs the table first, then the same interpolation on the device.

Frames of one batch with different sizes are kept in groups of one size (`FrameBatch.groups`),
each resized on its own and put back in order; groups must end at one input size (after the
resize and crop), else ShapeMismatchError, as the host processor cannot stack them either.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from featurecache.errors import OptionError, ShapeMismatchError
from featurecache.pipelines.precompute.teachers.region import resized_shape, size_fields

__all__ = ["DevicePreprocess", "FrameBatch", "fixed_size", "lookup_table", "resize_note"]

# PIL's filters a torch interpolation mode replays (mode, antialias); LANCZOS, BOX and HAMMING
# have none.
TORCH_RESAMPLE: dict[int, tuple[str, bool]] = {
    int(Image.Resampling.NEAREST): ("nearest-exact", False),
    int(Image.Resampling.BILINEAR): ("bilinear", True),
    int(Image.Resampling.BICUBIC): ("bicubic", True),
}
PIL_FILTER_NAMES = {int(r): r.name for r in Image.Resampling}
HOST_HINT = "use --preprocess host"


class FrameBatch:
    """A batch of decoded RGB frames as uint8, grouped by size, in batch order.

    groups: ((positions int64 (b,), frames uint8 (b, H, W, 3)), ...), one per frame size, the
    positions of its frames in the batch (one group, positions 0..B-1, when all share a size).
    """

    def __init__(self, groups: Sequence[tuple[torch.Tensor, torch.Tensor]], count: int) -> None:
        self.groups = tuple(groups)
        self.count = count

    @classmethod
    def stack(cls, images: Sequence[Image.Image], *, pin: bool = False) -> FrameBatch:
        """RGB PIL images (other modes converted) -> uint8 groups; `pin`: in page-locked memory
        (CUDA: copied to the device with non_blocking, overlapping the running forward)."""
        by_size: dict[tuple[int, int], list[int]] = {}
        for i, image in enumerate(images):
            by_size.setdefault((image.height, image.width), []).append(i)
        groups = []
        for (h, w), positions in by_size.items():
            frames = torch.empty((len(positions), h, w, 3), dtype=torch.uint8, pin_memory=pin)
            out = frames.numpy()
            for j, i in enumerate(positions):
                image = images[i]
                out[j] = np.asarray(image if image.mode == "RGB" else image.convert("RGB"))
            groups.append((torch.tensor(positions, dtype=torch.int64), frames))
        return cls(groups, len(images))

    def to(self, device: torch.device | str, non_blocking: bool = False) -> FrameBatch:
        """The batch on `device` (non_blocking copies where the frames are pinned)."""
        return FrameBatch(
            [
                (p.to(device, non_blocking=non_blocking), f.to(device, non_blocking=non_blocking))
                for p, f in self.groups
            ],
            self.count,
        )

    def __len__(self) -> int:
        return self.count


def lookup_table(values: Callable[[np.ndarray], Any]) -> torch.Tensor:
    """(3, 256) float32: `values` (the host's per-pixel rescale + normalise, taking uint8
    (3, 1, 256) channel-first, every channel 0..255) as a table indexed [channel, pixel]."""
    pixels = np.broadcast_to(np.arange(256, dtype=np.uint8), (3, 1, 256)).copy()
    table = torch.as_tensor(np.asarray(values(pixels)), dtype=torch.float32)
    assert table.shape == (3, 1, 256), table.shape
    return table[:, 0].contiguous()


@dataclass(frozen=True, eq=False)
class DevicePreprocess:
    """A teacher's preprocessing as torch ops on whatever device its batch is on; see the module
    docstring. Called as `recipe(frames: FrameBatch) -> (B, 3, h, w) float32`."""

    table: torch.Tensor
    """(3, 256) float32: the value of each channel's 8-bit pixel after rescale + normalise."""
    size: Callable[[int, int], tuple[int, int]] | None
    """A frame's (h, w) -> its resized (h, w); None: no resize."""
    mode: str = "bilinear"
    """torch interpolation mode of the resize."""
    antialias: bool = True
    """F.interpolate's antialias (PIL filters are antialiased when they shrink)."""
    resize_pixels: bool = True
    """True: resize the 8-bit pixels (rounded back to 0..255, as PIL), then the table; False:
    the table first, then resize the floats (RADIO's torch recipe)."""
    crop: tuple[int, int] | None = None
    """(h, w) of the centre crop after the resize, or None."""
    recipe: dict[str, Any] = field(default_factory=dict)
    """JSON-able description for the teacher's fingerprint (its "preprocess"."device")."""
    _tables: dict[torch.device, torch.Tensor] = field(
        default_factory=dict, init=False, repr=False
    )  # `table` per device it has run on (copied there once)

    def __call__(self, batch: FrameBatch) -> torch.Tensor:
        """uint8 frames (any sizes, grouped) -> the model input (B, 3, h, w) float32 on the
        frames' device."""
        parts = [(positions, self._one_size(frames)) for positions, frames in batch.groups]
        shapes = sorted({tuple(x.shape[1:]) for _, x in parts})
        if len(shapes) != 1:
            raise ShapeMismatchError(
                f"Expected the frames of one batch to give one input size after the resize, got "
                f"{shapes} (frames of different aspect ratios: resize them to one size first)."
            )
        if len(parts) == 1:
            return parts[0][1]
        first = parts[0][1]
        out = first.new_empty((batch.count, *first.shape[1:]))
        for positions, x in parts:
            out.index_copy_(0, positions, x)
        return out

    def _one_size(self, frames: torch.Tensor) -> torch.Tensor:
        """uint8 (b, H, W, 3) of one size -> float32 (b, 3, h, w)."""
        pixels = frames.permute(0, 3, 1, 2)  # (b, 3, H, W) uint8
        if not self.resize_pixels:
            x = self._lookup(pixels)
            if self.size is not None:
                x = self._interpolate(x, self.size(*x.shape[-2:]))
            return self._crop(x)
        if self.size is not None:
            pixels = self._resize_pixels(pixels, self.size(*pixels.shape[-2:]))
        return self._lookup(self._crop(pixels))

    def _resize_pixels(self, pixels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """uint8 (b, 3, H, W) resized as PIL resizes an 8-bit image: the width first, then the
        height (a pass only where the side changes), each pass rounded half up and clipped to
        0..255 (PIL's fixed point does both; rounding only once, or half to even, moves ~1 in 5
        pixels by one step, and a bicubic overshoot kept between the passes up to 18)."""
        h, w = size
        if (h, w) == tuple(pixels.shape[-2:]):
            return pixels  # PIL returns a copy
        x = pixels.float()
        if w != x.shape[-1]:
            x = self._interpolate(x, (x.shape[-2], w)).add_(0.5).floor_().clamp_(0, 255)
        if h != x.shape[-2]:
            x = self._interpolate(x, (h, w)).add_(0.5).floor_().clamp_(0, 255)
        return x.to(torch.uint8)

    def _interpolate(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        align = False if self.mode in ("bilinear", "bicubic") else None
        return F.interpolate(
            x, size=size, mode=self.mode, antialias=self.antialias, align_corners=align
        )

    def _crop(self, x: torch.Tensor) -> torch.Tensor:
        if self.crop is None:
            return x
        (h, w), (ch, cw) = x.shape[-2:], self.crop
        if ch > h or cw > w:
            raise ShapeMismatchError(
                f"Expected the centre crop {cw}x{ch} to fit in the resized {w}x{h} frame, got a "
                f"crop that pads ({HOST_HINT}, or --frame-region full)."
            )
        top, left = (h - ch) // 2, (w - cw) // 2
        return x[..., top : top + ch, left : left + cw]

    def _lookup(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 (b, 3, h, w) -> float32 (b, 3, h, w): table[c, pixel]."""
        table = self._tables.get(pixels.device)
        if table is None:
            table = self._tables[pixels.device] = self.table.to(pixels.device)
        b, _, h, w = pixels.shape
        # one index_select per channel with int32 indices: ~4x faster on a CPU than one gather
        # with int64 offsets (and a quarter of its index memory)
        channels = [
            table[c].index_select(0, pixels[:, c].reshape(-1).int()).view(b, h, w) for c in range(3)
        ]
        return torch.stack(channels, dim=1)

    @classmethod
    def from_image_processor(cls, processor: Any, *, where: str) -> DevicePreprocess:
        """The device replay of a transformers PIL-backend image processor, as configured
        (after `see_whole_frame` under --frame-region full). OptionError naming the setting the
        replay cannot express (another processor class, do_pad, a LANCZOS / BOX / HAMMING
        filter)."""
        from transformers.image_processing_backends import PilBackend

        cls_ = type(processor)
        steps = ("_preprocess", "resize", "center_crop", "rescale", "normalize")
        own = [s for s in steps if getattr(cls_, s, None) is not getattr(PilBackend, s)]
        if not isinstance(processor, PilBackend) or own:
            raise OptionError(
                f"Expected an image processor of transformers' PIL backend for --preprocess "
                f"device of {where}, got {cls_.__name__} (its own {', '.join(own) or 'class'}); "
                f"{HOST_HINT}"
            )
        if getattr(processor, "do_pad", False):
            raise OptionError(
                f"Expected do_pad False for --preprocess device of {where}, got do_pad True "
                f"(padding is not replayed on the device); {HOST_HINT} or --frame-region full"
            )
        recipe: dict[str, Any] = {"frames": "uint8 (B, H, W, 3)"}
        size_rule = mode = None
        antialias = False
        if getattr(processor, "do_resize", False):
            resample = processor.resample
            resample = int(Image.Resampling.BILINEAR if resample is None else resample)
            if resample not in TORCH_RESAMPLE:
                name = PIL_FILTER_NAMES.get(resample, str(resample))
                raise OptionError(
                    f"Expected resample BILINEAR, BICUBIC or NEAREST for --preprocess device of "
                    f"{where}, got {name} (no torch filter replays it); {HOST_HINT}"
                )
            mode, antialias = TORCH_RESAMPLE[resample]
            size = processor.size

            def size_rule(h: int, w: int) -> tuple[int, int]:
                return tuple(int(v) for v in resized_shape(size, h, w, where=where))

            recipe["resize"] = resize_note(size_fields(size), mode, antialias, rounded=True)
        crop = None
        if getattr(processor, "do_center_crop", False):
            crop_size = size_fields(processor.crop_size)
            crop = (crop_size["height"], crop_size["width"])
            recipe["centre_crop"] = list(crop)

        def values(pixels: np.ndarray) -> np.ndarray:
            x = pixels
            if getattr(processor, "do_rescale", False):
                x = processor.rescale(x, processor.rescale_factor)
            if getattr(processor, "do_normalize", False):
                x = processor.normalize(x, processor.image_mean, processor.image_std)
            return np.asarray(x, dtype=np.float32)

        recipe["values"] = "lookup table of the processor's rescale + normalize"
        return cls(
            table=lookup_table(values),
            size=size_rule,
            mode=mode or "bilinear",
            antialias=antialias,
            crop=crop,
            recipe=recipe,
        )


def fixed_size(height: int, width: int) -> Callable[[int, int], tuple[int, int]]:
    """A size rule that resizes every frame to height x width (squash)."""
    return lambda _h, _w: (height, width)


def resize_note(size: Any, mode: str, antialias: bool, *, rounded: bool) -> str:
    """How a recipe resizes on the device, for the fingerprint."""
    tail = ", rounded to uint8" if rounded else ""
    return f"to {size}: torch F.interpolate {mode}, antialias={antialias}{tail}"
