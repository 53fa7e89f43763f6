"""Frames as 8-bit RGB: the one rule that turns an encoded image (a tar member, a LeRobot frame)
or an in-memory image (PIL, a uint8 array) into what every teacher and student sees.

    decode_image(data, ext, where)  encoded bytes -> RGB PIL image (fully loaded)
    to_rgb(image, where)            PIL image or uint8 (H, W[, C]) array -> RGB PIL image

Each refusal is a BadFrameError naming `where` (e.g. "sample 'k' of shard.tar"), which
`--on-bad-frame skip` may skip. The sample contract (featurecache.samples) re-exports both.
"""

from __future__ import annotations

import io
from typing import Any, Final

import numpy as np
from PIL import Image

from featurecache.errors import BadFrameError

__all__ = ["IMAGE_EXTS", "decode_image", "to_rgb"]

# Image extensions recognised in a sample, in order of preference when one camera has several.
IMAGE_EXTS: Final = ("png", "jpg", "jpeg", "webp", "bmp", "tif", "tiff", "ppm")
# 8-bit modes PIL converts to RGB with a well-defined meaning (alpha, if any, is dropped).
_RGB_CONVERTIBLE: Final = frozenset(
    {"1", "L", "P", "PA", "LA", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "HSV"}
)
_16_BIT: Final = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})
# Formats whose 32-bit "I" mode can only hold 16-bit grey (PIL opens 16-bit PGM as "I").
_I_IS_16_BIT: Final = frozenset({"PNG", "PPM"})


def decode_image(data: bytes, ext: str = "", where: str = "") -> Image.Image:
    """Decode an encoded image to an 8-bit RGB PIL image (fully loaded); see `to_rgb`.

    Raises BadFrameError (naming `where`, e.g. "sample 'k' of shard.tar") when `data` is empty,
    not a decodable image, or in a mode without a defined RGB meaning.
    """
    at = f" in {where}" if where else ""
    if not data:
        raise BadFrameError(f"Expected an image ({'/'.join(IMAGE_EXTS)}){at}, got none.")
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except Exception as err:  # PIL raises many types for corrupt data (and decompression bombs)
        raise BadFrameError(
            f"Expected a decodable {ext or 'image'} ({len(data)} bytes){at}, got: {err}"
        ) from err
    return to_rgb(image, where)


def to_rgb(image: Image.Image | np.ndarray | Any, where: str = "") -> Image.Image:
    """An 8-bit RGB PIL image from a PIL image or a uint8 array (H, W), (H, W, 1|3|4) (HWC).

    Modes: RGB as is; 1/L/P/CMYK/YCbCr/HSV converted by PIL; LA/PA/RGBA/RGBa: alpha dropped
    (colour channels kept, not composited); 16-bit grey (I;16*, and "I" from PNG/PGM, which can
    only hold 16 bits) scaled to 8 bits as round(v / 257), so 0 -> 0 and 65535 -> 255.
    Float ("F"), 32-bit integer, LAB and other modes raise BadFrameError naming `where`.
    """
    at = f" in {where}" if where else ""
    if not isinstance(image, Image.Image):
        image = _array_image(image, at)
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in _RGB_CONVERTIBLE:
        if mode in ("P", "PA"):
            image = image.convert("RGBA")  # palette transparency goes to alpha, then is dropped
        return image.convert("RGB")
    if mode in _16_BIT or (mode == "I" and image.format in _I_IS_16_BIT):
        values = np.asarray(image).astype(np.uint32)
        if values.size and (values.min() < 0 or values.max() > 65535):  # pragma: no cover
            raise BadFrameError(f"Expected 16-bit grey values{at}, got range outside 0..65535")
        grey = ((values * 255 + 32767) // 65535).astype(np.uint8)  # round(v / 257)
        return Image.fromarray(grey).convert("RGB")
    raise BadFrameError(
        f"Expected an image with 8-bit colour or 16-bit grey{at}, got PIL mode {mode!r} "
        f"({image.format or 'array'}) which has no defined 8-bit RGB meaning (convert it to "
        f"8-bit RGB or 16-bit grey PNG first)"
    )


def _array_image(array: Any, at: str) -> Image.Image:
    """A PIL image from a uint8 HWC array (numpy, or anything `np.asarray` takes)."""
    arr = np.asarray(array)
    if arr.dtype != np.uint8:
        raise BadFrameError(
            f"Expected a PIL image or a uint8 array (H, W[, C]){at}, got dtype {arr.dtype} "
            f"(scale floats to 0..255 and cast to uint8)"
        )
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] in (3, 4))) and min(arr.shape[:2]) > 0:
        return Image.fromarray(np.ascontiguousarray(arr))  # uint8: L, RGB or RGBA
    raise BadFrameError(
        f"Expected a uint8 image array of shape (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) "
        f"(channels last){at}, got shape {tuple(arr.shape)}"
    )
