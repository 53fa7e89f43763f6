"""The student's side of one view of the frame: show the student the region the teacher saw.

    from featurecache import open_cache
    from featurecache.pipelines.training import region_crop

    region = open_cache("cache.zarr").spec.frame_region()        # camera "" (or "top", ...)
    student_frame = region_crop(frame, region).resize((224, 224))  # then the student's resize

A cache records, per camera, the rectangle of the frame its teacher's tokens cover
(`featurecache.region.FrameRegion`: e.g. the centre 420x420 of a 480x640 frame for DINOv2's hub
processor under `build --frame-region native`). Cropping the decoded frame to it before the
student's own resize makes student token (i, j) and teacher token (i, j) describe the same pixels
(up to the two resizes' filters and the half-pixel rounding of the box). The training stream does
this for every frame (`StreamConfig.frame_regions`, from the cache); users' own loops call
`region_crop` where they decode frames, before their resize (and after an augmentation: the view
of a frame is transformed first, then cropped to the region, like the teacher's input was).

A region that is the whole frame (`--frame-region full`, the default; efficientnet; SigLIP;
Qwen2-VL) leaves the frame as it is, whatever its size; no region (caches that record none,
format version 2 among them) too. A region that pads (a letterbox) is reproduced with the
recorded colour; padding of unknown colour, and frames of another size than the region was
recorded for, are refused (FrameRegionError) rather than silently misaligned.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from featurecache.errors import FrameRegionError
from featurecache.pipelines.views import apply_view
from featurecache.region import FrameRegion
from featurecache.view_params import ViewParams

__all__ = ["region_crop", "teacher_pixels"]


def teacher_pixels(
    frame: Image.Image | np.ndarray,
    params: ViewParams | None,
    region: FrameRegion | None,
    *,
    where: str = "a frame",
) -> Image.Image | np.ndarray:
    """The pixels of one decoded frame that the teacher saw, before any resize: the cached
    view's transform (`apply_view`; None = the frame itself), then the crop to the region the
    teacher saw (`region_crop`; None or a whole-frame region = all of it). The same type back
    (PIL; a uint8 (H, W, 3) array stays an array). The one rule the training stream and
    `CachedTargets(image=...)` prepare the student's frame with; `where` names it in errors."""
    if params is not None:
        frame = apply_view(frame, params)
    if region is None or region.whole:
        return frame
    if isinstance(frame, np.ndarray):
        return np.asarray(region_crop(Image.fromarray(frame), region, where=where))
    return region_crop(frame, region, where=where)


def region_crop(frame: Image.Image, region: FrameRegion | None, *, where: str = "") -> Image.Image:
    """The part of `frame` (a decoded PIL image, any mode) that the teacher saw: `frame` itself
    for no region or a whole-frame one, else the region's box rounded to whole pixels, padded
    by the region's pad (rounded) with its fill colour (a letterbox). `where` names the frame in
    errors. FrameRegionError for a frame of another size than the recorded one (of a
    region that is not the whole frame) and for padding of unknown colour."""
    if region is None or region.whole:
        return frame
    x0, y0, x1, y1 = region.pixel_box(frame.height, frame.width, where)
    seen = frame.crop((x0, y0, x1, y1))
    if max(region.pad) == 0:
        return seen
    if region.fill is None:
        at = f" ({where})" if where else ""
        raise FrameRegionError(
            f"Expected the colour of the padding the teacher saw around the frame, got a region "
            f"that pads with an unknown colour ({region.describe()}){at}: the student cannot see "
            "the same picture; rebuild with --frame-region full"
        )
    left, top, right, bottom = region.pixel_pad()
    size = (seen.width + left + right, seen.height + top + bottom)
    canvas = Image.new(frame.mode, size, _fill_for(frame.mode, region.fill))
    canvas.paste(seen, (left, top))
    return canvas


def _fill_for(mode: str, fill: tuple[int, int, int]) -> int | tuple[int, ...]:
    """The fill colour in an image mode ("RGB" as is, "L" its luma, "RGBA" opaque)."""
    if mode == "RGB":
        return fill
    if mode == "RGBA":
        return (*fill, 255)
    return Image.new("RGB", (1, 1), fill).convert(mode).getpixel((0, 0))
