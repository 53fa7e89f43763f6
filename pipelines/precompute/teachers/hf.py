"""`hf:PATH_OR_ID`: a transformers vision backbone as teacher (families: hf_families.py).

Layer "k" is `hidden_states[k]` ("0" the embedding output, "N" the last block, as transformers
returns them) restricted to the patch tokens: the CLS / summary and register tokens the family
puts before the grid are dropped (their count comes from the config and is checked against the
output). Layer "final" is the model's own output at the patch tokens: `last_hidden_state`, i.e.
after the family's final norm where it has one (RADIO: its `features`). With `grid=(H, W)` every
patch grid is resampled to H x W (featurecache.pipelines.resample); for SigLIP2 NaFlex the grid
also sets the processor's patch budget (H * W), so square frames are cut into H x W patches.

Loading is honest (model_loading): every weight of the model must come from the checkpoint; a
checkpoint's classification or pooling head that the backbone does not build may be left over.
A dual-tower checkpoint (CLIP, SigLIP) runs and hashes its vision tower only.

`frame_region="full"` (the build's default) switches a saved processor's centre crop (and LLaVA-
style letterbox) off: the frame is squashed to the crop size, as a student squashes it, so the
whole frame reaches the teacher; "native" keeps the processor as saved. `frame_region(h, w)`
reports the region either way (teachers/region.py). With `--preprocess device` the processor
(or RADIO's recipe) is replayed on the model's device from uint8 frames (device_preprocess.py);
NaFlex keeps its patching on the host. A VLM folder is
refused with a pointer to `hf-vlm:`; an unsupported architecture names itself and the list.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image

from featurecache.errors import UnknownLayerError
from featurecache.pipelines.model_loading import LoadOptions, load_config, load_pretrained
from featurecache.pipelines.precompute.config import DEFAULT_FRAME_REGION, FrameRegionMode
from featurecache.pipelines.precompute.teachers.base import (
    Teacher,
    UnknownTeacherError,
    check_layers,
)
from featurecache.pipelines.precompute.teachers.device_preprocess import DevicePreprocess
from featurecache.pipelines.precompute.teachers.hf_families import (
    RadioPreprocess,
    image_preprocessor,
    jsonable,
    pair,
    vision_family,
)
from featurecache.pipelines.precompute.teachers.region import (
    image_processor_region,
    see_whole_frame,
)
from featurecache.pipelines.vlm import is_vlm_config
from featurecache.region import FrameRegion

__all__ = ["FINAL_LAYER", "HFVisionTeacher"]

FINAL_LAYER = "final"
# Checkpoint tensors a backbone may leave unused: heads of *ForImageClassification checkpoints
# and poolers the backbone is built without.
UNUSED_HEADS = (r"^classifier\.", r"^head\.", r"^pooler\.", r"^fc_norm\.")


class HFVisionTeacher(Teacher):
    """A transformers vision encoder; layers "0".."num_hidden_layers" and "final"."""

    def __init__(
        self,
        spec: str,
        layers: Sequence[str],
        *,
        device: str | torch.device = "cpu",
        options: LoadOptions | None = None,
        grid: tuple[int, int] | None = None,
        frame_region: FrameRegionMode = DEFAULT_FRAME_REGION,
    ) -> None:
        from transformers import MODEL_MAPPING, AutoModel

        options = options or LoadOptions()
        self.spec = spec
        self.path = spec.split(":", 1)[1]
        self.device = torch.device(device)
        self.grid = tuple(grid) if grid else None
        config = load_config(self.path, options=options)
        if is_vlm_config(config):
            raise UnknownTeacherError(
                f"Expected a vision backbone for {spec}, got a VLM ({config.model_type}): use "
                f"--teacher hf-vlm:{self.path} for its language model's image-token states."
            )
        self.family = vision_family(config.model_type, spec)
        kwargs: dict[str, Any] = {"dtype": torch.float32}
        model_cls = MODEL_MAPPING[type(config)]
        if "add_pooling_layer" in inspect.signature(model_cls.__init__).parameters:
            kwargs["add_pooling_layer"] = False  # the pooler is never used for patch tokens
        model = load_pretrained(
            AutoModel, self.path, options=options, unused=UNUSED_HEADS, **kwargs
        )
        vision = getattr(config, "vision_config", None) or config
        if hasattr(model, "vision_model") and hasattr(config, "vision_config"):
            model = model.vision_model  # dual tower: the image side runs, and is hashed
        self.config = vision
        self.model_type = config.model_type
        self.patch = pair(vision.patch_size)
        names = [str(i) for i in range(vision.num_hidden_layers + 1)] + [FINAL_LAYER]
        self.layers = check_layers(spec, layers, names)
        self.model = model.eval().requires_grad_(False).to(self.device)
        budget = self.grid[0] * self.grid[1] if (self.grid and self.family.naflex) else None
        self.processor, self.processor_source = image_preprocessor(
            self.path, self.family, vision, options=options, max_num_patches=budget
        )
        if frame_region == "full" and self._replays_processor:
            see_whole_frame(self.processor, where=spec)  # its centre crop / letterbox: off
        self._prefix = self.family.prefix(vision)
        self._accepts_interpolate = (
            "interpolate_pos_encoding" in inspect.signature(self.model.forward).parameters
        )
        self._grid_in: tuple[int, int] | None = None

    def preprocess(self, images: Sequence[Image.Image]) -> Any:
        """PIL images -> the family's model inputs (pixel_values (B, 3, H, W) float32; NaFlex:
        patches (B, P, 3*p*p), pixel_attention_mask (B, P), spatial_shapes (B, 2))."""
        from transformers import BatchFeature

        images = [im if im.mode == "RGB" else im.convert("RGB") for im in images]
        out = self.processor(images=images, return_tensors="pt")
        return BatchFeature({k: v for k, v in out.items() if torch.is_tensor(v)})

    def forward(self, batch: Any) -> dict[str, torch.Tensor]:
        """Inputs (the processor's, or pixel_values from the device preprocessing) -> {layer:
        (B, h*w, D)} patch tokens of hidden_states[layer] / the output."""
        inputs = {"pixel_values": batch} if torch.is_tensor(batch) else dict(batch)
        if self.family.naflex:
            shapes = inputs["spatial_shapes"]
            if bool((shapes != shapes[0]).any()):
                raise UnknownLayerError(
                    f"Expected every frame of a batch to give {self.spec} one patch grid, got "
                    f"{sorted({tuple(s) for s in shapes.tolist()})} (frames of different "
                    "aspect ratios: resize them to one size first)."
                )
            gh, gw = (int(v) for v in shapes[0])
        else:
            size = tuple(inputs["pixel_values"].shape[-2:])
            gh, gw = size[0] // self.patch[0], size[1] // self.patch[1]
            if self._accepts_interpolate and size != pair(getattr(self.config, "image_size", 0)):
                inputs["interpolate_pos_encoding"] = True
        result = self.model(**inputs, output_hidden_states=True)
        self._grid_in = (gh, gw)
        out = {}
        for name in self.layers:
            if name == FINAL_LAYER:
                h = result.features if self.model_type == "radio" else result.last_hidden_state
                if self.model_type == "radio":
                    out[name] = h
                    continue
            else:
                h = result.hidden_states[int(name)]
            out[name] = self._patches(h, name, gh, gw)
        return self._finish(out)

    def _patches(self, h: torch.Tensor, name: str, gh: int, gw: int) -> torch.Tensor:
        """(B, prefix + gh*gw [+ padding], D) -> (B, gh*gw, D), the prefix checked."""
        if self.family.naflex:
            return h[:, : gh * gw]  # valid patches first, padding after
        if h.shape[1] != self._prefix + gh * gw:
            raise UnknownTeacherError(
                f"Expected {self.spec} layer {name} to hold {self._prefix} CLS/register tokens "
                f"and a {gh}x{gw} patch grid, got {h.shape[1]} tokens."
            )
        return h[:, self._prefix :]

    def native_grid(self, layer: str) -> tuple[int, int] | None:
        if self._grid_in is None:
            self([Image.new("RGB", (64, 64))])
        return self._grid_in

    def _device_recipe(self) -> DevicePreprocess | None:
        """RADIO's torch recipe, or the replay of a PIL-backend processor (OptionError naming a
        setting it cannot replay); None for NaFlex (its patching stays on the host)."""
        if self.family.naflex:
            return None
        if isinstance(self.processor, RadioPreprocess):
            return self.processor.device_recipe()
        return DevicePreprocess.from_image_processor(self.processor, where=self.spec)

    @property
    def _replays_processor(self) -> bool:
        """Whether the region is read from the processor's settings (not RADIO's or NaFlex's
        own preprocessing, which see the whole frame)."""
        return not (self.family.naflex or isinstance(self.processor, RadioPreprocess))

    def frame_region(self, height: int, width: int) -> FrameRegion:
        """The processor's region of a height x width frame (NaFlex: the whole frame, aspect
        kept; RADIO: the whole frame, squashed)."""
        if self.family.naflex:
            return FrameRegion.whole_frame(height, width, "resize")
        if isinstance(self.processor, RadioPreprocess):
            return FrameRegion.whole_frame(height, width, "squash", input=self.processor.size)
        return image_processor_region(self.processor, height, width, where=self.spec)

    def _identity(self) -> dict[str, Any]:
        c = self.config
        return {
            "teacher": "hf",
            "family": self.family.name,
            "model_type": self.model_type,
            "architecture": type(self.model).__name__,
            "hidden_size": int(getattr(c, "hidden_size", 0)),
            "num_hidden_layers": int(c.num_hidden_layers),
            "patch_size": list(self.patch),
            "prefix_tokens_dropped": self._prefix,
        }

    def _preprocessing(self) -> dict[str, Any]:
        return {"source": self.processor_source, "processor": jsonable(self.processor.to_dict())}

    def _module(self) -> torch.nn.Module:
        return self.model
