"""`hf-vlm:PATH_OR_ID`: a LLaVA-style VLM as teacher (transformers' LlavaForConditionalGeneration).

This is the "frozen VLM teacher" of PAPER.md: the counterpart VLM whose representations the VLA
should keep. Features of layer "k" are the language model's `hidden_states[k]` ("0" = the input
embeddings, i.e. the projected image features; "N" = the last decoder layer) at the image-token
positions of a fixed prompt, so one frame gives as many tokens as the vision tower has patches
(CLS dropped by the model's `vision_feature_select_strategy`).

The prompt (default DEFAULT_PROMPT) must contain the processor's image token (`<image>`); the
processor expands it to the image's token count. Every frame of a build uses the same prompt, so
the token positions are fixed, and the prompt is part of the fingerprint.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image

from featurecache.pipelines.build.teachers.base import Teacher, UnknownTeacherError, check_layers
from featurecache.pipelines.build.teachers.hf import _jsonable, quiet_transformers

__all__ = ["DEFAULT_PROMPT", "HFVLMTeacher"]

DEFAULT_PROMPT = "USER: <image>\nWhat is on the table? ASSISTANT:"


class HFVLMTeacher(Teacher):
    """A LLaVA VLM; layers "0".."text_config.num_hidden_layers"."""

    def __init__(
        self,
        spec: str,
        layers: Sequence[str],
        *,
        device: str | torch.device = "cpu",
        trust_remote_code: bool = False,
        grid: tuple[int, int] | None = None,
        prompt: str | None = None,
    ) -> None:
        from transformers import AutoProcessor, LlavaForConditionalGeneration

        self.spec = spec
        self.path = spec.split(":", 1)[1]
        self.device = torch.device(device)
        self.grid = tuple(grid) if grid else None
        self.prompt = DEFAULT_PROMPT if prompt is None else prompt
        try:
            with quiet_transformers():
                model, info = LlavaForConditionalGeneration.from_pretrained(
                    self.path,
                    trust_remote_code=trust_remote_code,
                    dtype=torch.float32,
                    output_loading_info=True,
                )
                self.processor = AutoProcessor.from_pretrained(
                    self.path, trust_remote_code=trust_remote_code
                )
        except (OSError, ValueError) as err:
            raise UnknownTeacherError(
                f"Expected {spec!r} to name a LLaVA model folder (config, weights, tokenizer "
                f"and processor), got: {err}"
            ) from err
        self._hash_skip = tuple(info.get("missing_keys", []))
        config = model.config
        self.layers = check_layers(
            spec, layers, [str(i) for i in range(config.text_config.num_hidden_layers + 1)]
        )
        self.model = model.eval().requires_grad_(False).to(self.device)
        image_token = getattr(self.processor, "image_token", "<image>")
        if image_token not in self.prompt:
            raise UnknownTeacherError(
                f"Expected the hf-vlm prompt to contain the image token {image_token!r}, "
                f"got {self.prompt!r}."
            )
        probe = self.processor(
            text=self.prompt, images=Image.new("RGB", (32, 32)), return_tensors="pt"
        )
        self.input_ids = probe["input_ids"][:1].to(self.device)  # (1, L)
        self.attention_mask = probe["attention_mask"][:1].to(self.device)
        token_id = config.image_token_id
        self.positions = (self.input_ids[0] == token_id).nonzero().flatten()  # (n_image_tokens,)
        n = int(self.positions.numel())
        side = math.isqrt(n)
        self._grid_in = (side, side) if side * side == n else None
        self.config = config

    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """PIL images -> (B, 3, H, W) float32 by the VLM's image processor."""
        images = [im if im.mode == "RGB" else im.convert("RGB") for im in images]
        out = self.processor.image_processor(images=images, return_tensors="pt")
        return out["pixel_values"].float()

    def forward(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        """(B, 3, H, W) -> {layer: (B, n_image_tokens, text hidden size)}."""
        b = batch.shape[0]
        backbone = getattr(self.model, "model", self.model)  # LlavaModel: no LM head needed
        out = backbone(
            input_ids=self.input_ids.expand(b, -1),
            attention_mask=self.attention_mask.expand(b, -1),
            pixel_values=batch,
            output_hidden_states=True,
        )
        hidden = out.hidden_states
        return self._finish({name: hidden[int(name)][:, self.positions] for name in self.layers})

    def native_grid(self, layer: str) -> tuple[int, int] | None:
        return self._grid_in

    def _identity(self) -> dict[str, Any]:
        c = self.config
        return {
            "teacher": "hf-vlm",
            "model_type": c.model_type,
            "architecture": type(self.model).__name__,
            "text_hidden_size": int(c.text_config.hidden_size),
            "text_layers": int(c.text_config.num_hidden_layers),
            "vision_feature_layer": _jsonable(c.vision_feature_layer),
            "vision_feature_select_strategy": c.vision_feature_select_strategy,
        }

    def _preprocessing(self) -> dict[str, Any]:
        return {
            "image_processor": _jsonable(self.processor.image_processor.to_dict()),
            "prompt": self.prompt,
            "input_ids": self.input_ids[0].tolist(),
        }

    def _module(self) -> torch.nn.Module:
        return self.model
