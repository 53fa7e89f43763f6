"""`hf:PATH_OR_ID`: a transformers vision backbone (ViT, DINOv2, SigLIP / CLIP vision) as teacher.

Features of layer "k" are `hidden_states[k]` ("0" is the embedding output, "N" the last block,
as transformers returns them) restricted to the patch tokens: whatever precedes the patch grid
(CLS, DINOv2's register tokens) is dropped, counted as `tokens - (H/patch) * (W/patch)` and
checked against the config. With `grid=(H, W)` the patch grid is bilinearly resampled to H x W.

Preprocessing: the folder's image processor (AutoImageProcessor, PIL backend) when it has a
`preprocessor_config.json`; otherwise a documented default: resize to the config's `image_size`
(bilinear), scale to [0, 1], normalize with the ImageNet mean/std. A dual-tower checkpoint (CLIP,
SigLIP) contributes its vision tower only. `trust_remote_code` stays False unless asked for.
"""

from __future__ import annotations

import contextlib
import inspect
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from featurecache.pipelines.build.teachers.base import Teacher, UnknownTeacherError, check_layers

__all__ = [
    "DEFAULT_MEAN",
    "DEFAULT_STD",
    "HFVisionTeacher",
    "load_image_processor",
    "quiet_transformers",
]

DEFAULT_MEAN = (0.485, 0.456, 0.406)  # ImageNet, used when the model ships no image processor
DEFAULT_STD = (0.229, 0.224, 0.225)


def load_image_processor(path: str, *, trust_remote_code: bool = False) -> Any | None:
    """The model's AutoImageProcessor (PIL backend: torchvision is not required), or None when the
    folder (or offline hub id) has none."""
    from transformers import AutoImageProcessor

    if Path(path).is_dir() and not (Path(path) / "preprocessor_config.json").exists():
        return None
    with quiet_transformers():
        try:
            return AutoImageProcessor.from_pretrained(
                path, trust_remote_code=trust_remote_code, backend="pil"
            )
        except TypeError:  # transformers without the `backend` option
            return AutoImageProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
        except OSError:
            return None


class HFVisionTeacher(Teacher):
    """A transformers vision encoder; layers "0".."num_hidden_layers"."""

    def __init__(
        self,
        spec: str,
        layers: Sequence[str],
        *,
        device: str | torch.device = "cpu",
        trust_remote_code: bool = False,
        grid: tuple[int, int] | None = None,
    ) -> None:
        from transformers import AutoConfig, AutoModel

        self.spec = spec
        self.path = spec.split(":", 1)[1]
        self.device = torch.device(device)
        self.grid = tuple(grid) if grid else None
        try:
            with quiet_transformers():
                config = AutoConfig.from_pretrained(self.path, trust_remote_code=trust_remote_code)
                model, info = AutoModel.from_pretrained(
                    self.path,
                    trust_remote_code=trust_remote_code,
                    dtype=torch.float32,
                    output_loading_info=True,
                )
        except (OSError, ValueError) as err:
            raise UnknownTeacherError(
                f"Expected {spec!r} to name a transformers vision model (a folder with "
                f"config.json and weights, or a cached hub id), got: {err}"
            ) from err
        # Weights the checkpoint lacks (e.g. ViT's pooler) are random at every load: not hashed.
        missing = list(info.get("missing_keys", []))
        if hasattr(model, "vision_model") and hasattr(config, "vision_config"):
            model = model.vision_model  # CLIP / SigLIP dual tower: keep the image side
            missing = [k.removeprefix("vision_model.") for k in missing]
        self._hash_skip = tuple(missing)
        vision = getattr(config, "vision_config", None) or config
        for attr in ("num_hidden_layers", "patch_size"):
            if not hasattr(vision, attr):
                raise UnknownTeacherError(
                    f"Expected {spec!r} to be a ViT-like vision backbone with {attr} in its "
                    f"config, got a {type(config).__name__} without it."
                )
        self.config = vision
        self.model_type = config.model_type
        self.patch = _pair(vision.patch_size)
        self.layers = check_layers(
            spec, layers, [str(i) for i in range(vision.num_hidden_layers + 1)]
        )
        self.model = model.eval().requires_grad_(False).to(self.device)
        self.processor = load_image_processor(self.path, trust_remote_code=trust_remote_code)
        self.image_size = _pair(getattr(vision, "image_size", 224))
        self._accepts_interpolate = (
            "interpolate_pos_encoding" in inspect.signature(self.model.forward).parameters
        )
        self._register_tokens = int(getattr(vision, "num_register_tokens", 0) or 0)
        self._grid_in: tuple[int, int] | None = None

    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """PIL images -> (B, 3, H, W) float32 by the image processor (or the default)."""
        images = [im if im.mode == "RGB" else im.convert("RGB") for im in images]
        if self.processor is not None:
            return self.processor(images=images, return_tensors="pt")["pixel_values"].float()
        h, w = self.image_size
        arrays = [np.asarray(im.resize((w, h), Image.BILINEAR)) for im in images]
        x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float().div_(255.0)
        mean = torch.tensor(DEFAULT_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(DEFAULT_STD).view(1, 3, 1, 1)
        return x.sub_(mean).div_(std)

    def forward(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        """(B, 3, H, W) -> {layer: (B, (H/p)*(W/p), D)} patch tokens of hidden_states[layer]."""
        kwargs: dict[str, Any] = {"output_hidden_states": True}
        size = tuple(batch.shape[-2:])
        if self._accepts_interpolate and size != self.image_size:
            kwargs["interpolate_pos_encoding"] = True
        hidden = self.model(pixel_values=batch, **kwargs).hidden_states
        gh, gw = size[0] // self.patch[0], size[1] // self.patch[1]
        self._grid_in = (gh, gw)
        out = {}
        for name in self.layers:
            h = hidden[int(name)]  # (B, prefix + gh*gw, D)
            prefix = h.shape[1] - gh * gw
            if prefix < 0 or (self._register_tokens and prefix != 1 + self._register_tokens):
                raise UnknownTeacherError(
                    f"Expected {self.spec} layer {name} to hold a {gh}x{gw} patch grid after "
                    f"CLS/register tokens, got {h.shape[1]} tokens."
                )
            out[name] = h[:, prefix:]
        return self._finish(out)

    def native_grid(self, layer: str) -> tuple[int, int] | None:
        if self._grid_in is None:
            self([Image.new("RGB", (64, 64))])
        return self._grid_in

    def _identity(self) -> dict[str, Any]:
        c = self.config
        return {
            "teacher": "hf",
            "model_type": self.model_type,
            "architecture": type(self.model).__name__,
            "hidden_size": int(getattr(c, "hidden_size", 0)),
            "num_hidden_layers": int(c.num_hidden_layers),
            "patch_size": list(self.patch),
        }

    def _preprocessing(self) -> dict[str, Any]:
        if self.processor is not None:
            return {"image_processor": _jsonable(self.processor.to_dict())}
        return {
            "resize": list(self.image_size),
            "resample": "bilinear",
            "scale": "1/255",
            "mean": list(DEFAULT_MEAN),
            "std": list(DEFAULT_STD),
        }

    def _module(self) -> torch.nn.Module:
        return self.model


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' load reports and backend notices (errors still raise)."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def _pair(value: Any) -> tuple[int, int]:
    if isinstance(value, list | tuple):
        return int(value[0]), int(value[1])
    return int(value), int(value)


def _jsonable(value: Any) -> Any:
    """A processor dict made JSON-able (tuples -> lists, enums/objects -> str), path-free."""
    if isinstance(value, dict):
        return {
            str(k): _jsonable(v)
            for k, v in sorted(value.items())
            if k not in ("_processor_class", "processor_class", "_name_or_path")
        }
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)
