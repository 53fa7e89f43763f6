"""The transformers vision families an `hf:` teacher supports, and how each one's images are
prepared: the folder's saved image processor when it has one, else the family's convention.

family (model_type)           dropped before the patches  preprocessing without a saved processor
ViT (vit)                     CLS                         resize S, bilinear, mean = std = 0.5
DINOv2 (dinov2)               CLS                         resize S, bicubic, ImageNet mean/std
DINOv2 + registers            CLS + registers             resize S, bicubic, ImageNet mean/std
  (dinov2_with_registers)
DINOv3 ViT (dinov3_vit)       CLS + registers             resize S, bilinear, ImageNet mean/std
CLIP (clip, ..._vision_model) CLS                         resize S, bicubic, OpenAI CLIP mean/std
SigLIP, SigLIP2 fixed-res     none                        resize S, bicubic, mean = std = 0.5
  (siglip, ..._vision_model)
SigLIP2 NaFlex (siglip2)      none (padding patches)      aspect kept, <= max patches (--grid:
                                                          H*W), bilinear, mean = std = 0.5
RADIO / C-RADIO (radio)       summary (CLS) + registers   [0, 1] pixels, torch bilinear to S; the
                                                          model normalises itself

S is the config's `image_size` (RADIO: rounded down to a multiple of the patch size). With a
saved processor (`preprocessor_config.json`) that processor runs, PIL backend. Processors that
exist only as torchvision classes (DINOv3's) are replayed, where torchvision is missing, by the
equivalent PIL processor (resize, rescale, normalize) with the saved values; a saved RADIO
processor that normalises is refused (the model normalises inside: it would be done twice).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from featurecache.pipelines.model_loading import LoadOptions, ModelLoadError, load_processor
from featurecache.pipelines.precompute.teachers.base import UnknownTeacherError
from featurecache.pipelines.precompute.teachers.device_preprocess import (
    DevicePreprocess,
    fixed_size,
    lookup_table,
    resize_note,
)

__all__ = [
    "VISION_FAMILIES",
    "RadioPreprocess",
    "VisionFamily",
    "image_preprocessor",
    "jsonable",
    "pair",
    "vision_family",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HALF = (0.5, 0.5, 0.5)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True, slots=True, kw_only=True)
class VisionFamily:
    """One supported vision backbone family."""

    model_type: str
    """The config's model_type."""
    name: str
    """Human name for messages and the README table."""
    prefix: Callable[[Any], int]
    """Tokens before the patch grid in hidden_states, from the vision config (CLS, registers)."""
    mean: tuple[float, float, float] | None
    """Normalisation mean of the convention (None: the model normalises itself)."""
    std: tuple[float, float, float] | None
    """Normalisation std of the convention."""
    resample: str = "bilinear"
    """PIL resample filter of the convention."""
    naflex: bool = False
    """Native-resolution patches with an attention mask and spatial shapes (SigLIP2 NaFlex)."""


def _registers(c: Any) -> int:
    return int(getattr(c, "num_register_tokens", 0) or 0)


VISION_FAMILIES: Final[dict[str, VisionFamily]] = {
    f.model_type: f
    for f in (
        VisionFamily(model_type="vit", name="ViT", prefix=lambda c: 1, mean=HALF, std=HALF),
        VisionFamily(
            model_type="dinov2",
            name="DINOv2",
            prefix=lambda c: 1,
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            resample="bicubic",
        ),
        VisionFamily(
            model_type="dinov2_with_registers",
            name="DINOv2 with registers",
            prefix=lambda c: 1 + _registers(c),
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            resample="bicubic",
        ),
        VisionFamily(
            model_type="dinov3_vit",
            name="DINOv3 ViT",
            prefix=lambda c: 1 + _registers(c),
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
        ),
        VisionFamily(
            model_type="clip",
            name="CLIP",
            prefix=lambda c: 1,
            mean=CLIP_MEAN,
            std=CLIP_STD,
            resample="bicubic",
        ),
        VisionFamily(
            model_type="clip_vision_model",
            name="CLIP vision",
            prefix=lambda c: 1,
            mean=CLIP_MEAN,
            std=CLIP_STD,
            resample="bicubic",
        ),
        VisionFamily(
            model_type="siglip",
            name="SigLIP / SigLIP2 fixed-res",
            prefix=lambda c: 0,
            mean=HALF,
            std=HALF,
            resample="bicubic",
        ),
        VisionFamily(
            model_type="siglip_vision_model",
            name="SigLIP vision",
            prefix=lambda c: 0,
            mean=HALF,
            std=HALF,
            resample="bicubic",
        ),
        VisionFamily(
            model_type="siglip2",
            name="SigLIP2 NaFlex",
            prefix=lambda c: 0,
            mean=HALF,
            std=HALF,
            naflex=True,
        ),
        VisionFamily(
            model_type="radio",
            name="RADIO / C-RADIO",
            prefix=lambda c: int(c.num_cls_tokens) + int(c.num_registers),
            mean=None,
            std=None,
        ),
    )
}


def vision_family(model_type: str, spec: str) -> VisionFamily:
    """The family of `model_type`; UnknownTeacherError naming it and the supported list."""
    family = VISION_FAMILIES.get(model_type)
    if family is None:
        names = ", ".join(f"{f.name} ({f.model_type})" for f in VISION_FAMILIES.values())
        raise UnknownTeacherError(
            f"Expected an hf: vision backbone of a supported family ({names}), got model_type "
            f"{model_type!r} in {spec}."
        )
    return family


class RadioPreprocess:
    """RADIO's documented input: RGB in [0, 1], resized with torch's bilinear interpolation
    (align_corners=False) to `size`; no normalisation (RadioModel's input conditioner applies
    norm_mean / norm_std itself)."""

    def __init__(self, size: tuple[int, int]) -> None:
        self.size = size

    def __call__(self, images: Sequence[Image.Image], **_: Any) -> Any:
        from transformers import BatchFeature

        x = [torch.from_numpy(_unit(np.asarray(im))) for im in images]
        return BatchFeature(
            {
                "pixel_values": torch.stack(
                    [
                        F.interpolate(
                            t.permute(2, 0, 1)[None],
                            size=self.size,
                            mode="bilinear",
                            align_corners=False,
                        )[0]
                        for t in x
                    ]
                )
            }
        )

    def device_recipe(self) -> DevicePreprocess:
        """The same torch ops on the device: [0, 1] by lookup table, then the interpolation."""
        return DevicePreprocess(
            table=lookup_table(_unit),
            size=fixed_size(*self.size),
            mode="bilinear",
            antialias=False,
            resize_pixels=False,
            recipe={
                "frames": "uint8 (B, H, W, 3)",
                "values": "lookup table of pixel / 255",
                "resize": resize_note(list(self.size), "bilinear", False, rounded=False),
            },
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "recipe": "radio",
            "scale": "1/255 (pixels in [0, 1])",
            "resize": list(self.size),
            "resample": "torch bilinear, align_corners=False",
            "normalize": "inside the model (norm_mean / norm_std)",
        }


def _unit(pixels: np.ndarray) -> np.ndarray:
    """uint8 pixels -> float32 in [0, 1] (RADIO's input, host and device alike)."""
    return np.asarray(pixels, dtype=np.float32) / 255.0


def image_preprocessor(
    path: str | Path,
    family: VisionFamily,
    vision_config: Any,
    *,
    options: LoadOptions,
    max_num_patches: int | None = None,
) -> tuple[Any, str]:
    """(a callable `processor(images=..., return_tensors="pt") -> dict` with `to_dict()`, where
    it came from: "saved", "saved (PIL replay)" or "convention"). See the module docstring."""
    import transformers

    size = pair(getattr(vision_config, "image_size", 224))
    saved, source = _saved_processor(path, options)
    if family.model_type == "radio":
        if saved is not None and getattr(saved, "do_normalize", False):
            raise UnknownTeacherError(
                f"Expected the RADIO folder {path} to have no image processor that normalises "
                "(RadioModel normalises [0, 1] pixels itself: it would be done twice), got "
                f"{type(saved).__name__} with do_normalize=True."
            )
        patch = int(vision_config.patch_size)
        return RadioPreprocess((size[0] // patch * patch, size[1] // patch * patch)), "convention"
    if family.naflex:
        kwargs = {} if max_num_patches is None else {"max_num_patches": max_num_patches}
        if saved is not None:
            for key, value in kwargs.items():
                setattr(saved, key, value)
            return saved, source
        processor = transformers.Siglip2ImageProcessorPil(
            patch_size=int(vision_config.patch_size),
            max_num_patches=int(kwargs.get("max_num_patches", vision_config.num_patches)),
        )
        return processor, "convention"
    if saved is not None:
        return saved, source
    resample = getattr(Image.Resampling, family.resample.upper())
    processor = transformers.ViTImageProcessorPil(
        size={"height": size[0], "width": size[1]},
        resample=resample,
        image_mean=list(family.mean),
        image_std=list(family.std),
    )
    return processor, "convention"


def _saved_processor(path: str | Path, options: LoadOptions) -> tuple[Any | None, str]:
    """The folder's image processor (PIL backend), or a PIL replay of a torchvision-only one."""
    try:
        return load_processor(path, options=options, image_only=True), "saved"
    except ModelLoadError:
        file = Path(path) / "preprocessor_config.json"
        if not file.is_file():
            raise
    # A torchvision-only class (DINOv3's) without torchvision: replay resize/rescale/normalize.
    import transformers

    saved = json.loads(file.read_text())
    if saved.get("do_center_crop") or saved.get("do_pad"):
        raise ModelLoadError(
            f"Expected an image processor this machine can run in {file}, got "
            f"{saved.get('image_processor_type')!r}, which needs torchvision (not installed)."
        )
    keys = ("size", "resample", "do_resize", "do_rescale", "rescale_factor", "do_normalize")
    kwargs = {k: saved[k] for k in (*keys, "image_mean", "image_std") if k in saved}
    return transformers.ViTImageProcessorPil(**kwargs), "saved (PIL replay)"


def pair(value: Any) -> tuple[int, int]:
    """(h, w) from an int or a pair (config sizes are either)."""
    if isinstance(value, list | tuple):
        return int(value[0]), int(value[1])
    return int(value), int(value)


def jsonable(value: Any) -> Any:
    """A processor dict made JSON-able (tuples -> lists, enums/objects -> str), path-free."""
    if isinstance(value, dict):
        return {
            str(k): jsonable(v)
            for k, v in sorted(value.items())
            if k not in ("_processor_class", "processor_class", "_name_or_path")
        }
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)
