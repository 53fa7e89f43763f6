"""Which region of a frame a transformers image processor lets through, and how to make it let
the whole frame through (`--frame-region full`).

    region = image_processor_region(processor, height=480, width=640, where="hf:/m/dinov2")
    # DINOv2's hub processor (shortest_edge 256, crop 224): box (108.9, 30.0, 529.3, 450.0)
    see_whole_frame(processor, where=...)   # in place: squash to the crop size, no crop, no pad

The geometry is replayed from the processor's own settings with transformers' own sizing
functions, in the order its PIL backend applies them (`PilBackend._preprocess`):

    [pad to square]   LLaVA's processor with do_pad: the frame centred on a square of the
                      processor's mean colour (int(mean * 255)), before anything else (a
                      centre crop may then cut into the padding and the frame alike)
    resize            size {height, width}: squash; {shortest_edge}: aspect kept, short side to
                      it; {shortest_edge, longest_edge}, {max_height, max_width}: aspect kept
    centre crop       crop_size at ((h - ch) // 2, (w - cw) // 2) of the resized image
    [pad]             do_pad with pad_size: bottom and right, value 0 after normalisation (the
                      mean colour)

A resize maps output pixel i onto input pixels [i * s, (i + 1) * s) with s = input / output, so
the crop's edges land on fractional frame pixels: the box keeps them. The region's `box` is the
part of the frame the input holds, its `pad` the padding around it (frame pixels). Processors
whose resize, crop or preprocessing is their own code (Qwen2-VL's smart resize, NaFlex, tilers)
are not replayed here: their families know their region (the teachers, `VLMFamily.region`), and an
unknown one is refused (FrameRegionError) rather than guessed.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from featurecache.errors import FrameRegionError, OptionError
from featurecache.region import FrameRegion, RegionMapping

__all__ = ["image_processor_region", "resized_shape", "see_whole_frame", "size_fields"]

_SIZE_FIELDS = ("height", "width", "shortest_edge", "longest_edge", "max_height", "max_width")


def image_processor_region(
    processor: Any, height: int, width: int, *, where: str = ""
) -> FrameRegion:
    """The region of a height x width frame that `processor` (a transformers PIL-backend image
    processor) passes to the model; FrameRegionError for a processor whose geometry is its own
    code, or a centre crop larger than the resized frame (it pads with black)."""
    _check_replayable(processor, where)
    # Followed through the steps: the frame's part still in the image (`box`, frame pixels), and
    # where it lies in the current image (`at`, its pixels: x0, y0, x1, y1) of size (h, w); the
    # rest of the image is padding.
    box = (0.0, 0.0, float(width), float(height))
    at = (0.0, 0.0, float(width), float(height))
    h, w = height, width
    scaling: RegionMapping = "squash"  # how the frame part is resized: squash or resize
    fill: tuple[int, int, int] | None = None  # the colour of any padding added
    if getattr(processor, "do_pad", False) and hasattr(processor, "pad_to_square") and h != w:
        side = max(h, w)
        top, left = (side - h) // 2, (side - w) // 2
        at = (float(left), float(top), float(left + w), float(top + h))
        h = w = side
        mean = getattr(processor, "image_mean", None)
        fill = tuple(int(m * 255) for m in mean) if mean else (0, 0, 0)  # as LLaVA pads
    if getattr(processor, "do_resize", True):
        size = size_fields(processor.size)
        new_h, new_w = _resized(size, h, w, where)
        if not (size.get("height") and size.get("width")):
            scaling = "resize"
        at = (at[0] * new_w / w, at[1] * new_h / h, at[2] * new_w / w, at[3] * new_h / h)
        h, w = new_h, new_w
    if getattr(processor, "do_center_crop", False):
        crop = size_fields(processor.crop_size)
        ch, cw = int(crop["height"]), int(crop["width"])
        if ch > h or cw > w:
            raise FrameRegionError(
                f"Expected the centre crop {cw}x{ch} of {where or 'the teacher'} to fit in the "
                f"resized {width}x{height} frame ({w}x{h}), got a crop that pads with black; "
                "use --frame-region full"
            )
        top, left = (h - ch) // 2, (w - cw) // 2
        box, at = _crop(box, at, (float(left), float(top), float(left + cw), float(top + ch)))
        h, w = ch, cw
    pad_size = getattr(processor, "pad_size", None)
    pads_last = not hasattr(processor, "pad_to_square")  # LLaVA pads first, and only then
    if getattr(processor, "do_pad", False) and pad_size is not None and pads_last:
        pad = size_fields(pad_size)
        if (int(pad["height"]), int(pad["width"])) != (h, w):  # bottom and right
            h, w = int(pad["height"]), int(pad["width"])
            fill = _normalised_zero(processor)
    sx = (box[2] - box[0]) / (at[2] - at[0])  # frame pixels per image pixel
    sy = (box[3] - box[1]) / (at[3] - at[1])
    around = (at[0] * sx, at[1] * sy, (w - at[2]) * sx, (h - at[3]) * sy)
    around = tuple(0.0 if abs(v) < 1e-9 else v for v in around)
    padded = max(around) > 0  # a crop may have cut all the padding away
    return FrameRegion(
        frame=(height, width),
        box=box,
        pad=around if padded else (0.0, 0.0, 0.0, 0.0),
        mapping="pad" if padded else scaling,
        fill=fill if padded else None,
        input=(int(h), int(w)),
    )


def _crop(
    box: tuple[float, ...], at: tuple[float, ...], window: tuple[float, ...]
) -> tuple[tuple[float, float, float, float], tuple[float, float, float, float]]:
    """(box, at) after cropping the image to `window` (its pixels): the frame part shrinks to
    what the window keeps of it, and moves to the window's coordinates."""
    sx = (box[2] - box[0]) / (at[2] - at[0])
    sy = (box[3] - box[1]) / (at[3] - at[1])
    kept = (
        max(at[0], window[0]),
        max(at[1], window[1]),
        min(at[2], window[2]),
        min(at[3], window[3]),
    )
    new_box = (
        box[0] + (kept[0] - at[0]) * sx,
        box[1] + (kept[1] - at[1]) * sy,
        box[0] + (kept[2] - at[0]) * sx,
        box[1] + (kept[3] - at[1]) * sy,
    )
    new_at = (kept[0] - window[0], kept[1] - window[1], kept[2] - window[0], kept[3] - window[1])
    return new_box, new_at


def see_whole_frame(processor: Any, *, where: str = "") -> None:
    """Change `processor` in place so that it passes the whole frame, squashed as a student
    squashes it: a centre crop becomes a resize to the crop size (the model's input size and
    token count stay), padding is switched off. A resize that keeps the aspect without a crop
    already passes everything and stays. OptionError when the result still is not the whole
    frame (a processor whose geometry this cannot change)."""
    from transformers.image_utils import SizeDict

    _check_replayable(processor, where)
    if getattr(processor, "do_center_crop", False):
        crop = size_fields(processor.crop_size)
        processor.size = SizeDict(height=int(crop["height"]), width=int(crop["width"]))
        processor.do_center_crop = False
    if getattr(processor, "do_pad", False):
        processor.do_pad = False
    for height, width in ((480, 640), (640, 480), (256, 512)):  # landscape, portrait, 2:1
        region = image_processor_region(processor, height, width, where=where)
        if not region.whole:
            raise OptionError(
                f"Expected --frame-region full to make {where or 'the teacher'} see the whole "
                f"frame, got {region.describe()}; use --frame-region native"
            )


def _check_replayable(processor: Any, where: str) -> None:
    """FrameRegionError unless the processor's geometry is PilBackend's (or LLaVA's pad-first
    variant of it): otherwise its own code decides, and replaying its settings would guess."""
    from transformers import LlavaImageProcessorPil
    from transformers.image_processing_backends import PilBackend

    cls = type(processor)
    geometry = isinstance(processor, PilBackend) and all(
        getattr(cls, name) is getattr(PilBackend, name) for name in ("resize", "center_crop")
    )
    steps = getattr(cls, "_preprocess", None)
    known = geometry and (
        steps is PilBackend._preprocess or steps is LlavaImageProcessorPil._preprocess
    )
    if not known:
        raise FrameRegionError(
            f"Expected an image processor whose geometry featurecache knows (transformers' "
            f"PIL backend: resize, centre crop, pad) for {where or 'the teacher'}, got "
            f"{cls.__name__}; wrap the teacher as a py: plug-in that reports its frame_region"
        )


def size_fields(size: Any) -> dict[str, int]:
    """The set fields of a processor size (a dict or a transformers SizeDict)."""
    get = size.get if isinstance(size, dict) else (lambda k: getattr(size, k, None))
    return {k: int(v) for k in _SIZE_FIELDS if (v := get(k)) is not None}


def resized_shape(size: Any, height: int, width: int, *, where: str = "") -> tuple[int, int]:
    """(h, w) of a height x width frame after a PIL-backend processor's resize to `size` (its
    `size`: a dict or SizeDict); also what the device replay resizes to (device_preprocess.py)."""
    return _resized(size_fields(size), height, width, where)


def _resized(size: dict[str, int], height: int, width: int, where: str) -> tuple[int, int]:
    """(h, w) after the PIL backend's resize to `size` (transformers' sizing functions)."""
    from transformers.image_transforms import (
        get_resize_output_image_size,
        get_size_with_aspect_ratio,
    )
    from transformers.image_utils import ChannelDimension, get_image_size_for_max_height_width

    if "shortest_edge" in size and "longest_edge" in size:
        return tuple(
            get_size_with_aspect_ratio((height, width), size["shortest_edge"], size["longest_edge"])
        )
    if "shortest_edge" in size:
        shape_only = np.empty((1, height, width), dtype=np.uint8)  # the function reads the shape
        return tuple(
            get_resize_output_image_size(
                shape_only,
                size=size["shortest_edge"],
                default_to_square=False,
                input_data_format=ChannelDimension.FIRST,
            )
        )
    if "max_height" in size and "max_width" in size:
        return tuple(
            get_image_size_for_max_height_width(
                (height, width), size["max_height"], size["max_width"]
            )
        )
    if "height" in size and "width" in size:
        return size["height"], size["width"]
    raise FrameRegionError(
        f"Expected an image processor size with height and width, shortest_edge or max_height "
        f"and max_width for {where or 'the teacher'}, got {size}"
    )


def _normalised_zero(processor: Any) -> tuple[int, int, int]:
    """The pixel colour a 0 after rescale + normalise stands for: the mean colour (black when
    nothing is normalised)."""
    if not getattr(processor, "do_normalize", False):
        return (0, 0, 0)
    mean = processor.image_mean
    mean = [mean] * 3 if isinstance(mean, int | float) else list(mean)
    factor = processor.rescale_factor if getattr(processor, "do_rescale", False) else 1.0
    return tuple(int(min(255, max(0, round(m / factor)))) for m in mean)
