"""`tiny-vla`: a small vision-language-action model built from transformers parts, random init.

    image (B, 3, S, S) -> ViTModel (patch 16) -> patch tokens (B, (S/16)^2, d_vis)   # CLS dropped
                       -> Linear -> GELU -> Linear (the VLM's own vision->LLM projector)
    sequence = [BOS, visual tokens..., instruction bytes..., EOS]                     # (B, L, d)
    LlamaModel (causal) -> hidden_states[k] at positions 1..T = the aligned visual tokens
                        -> final hidden state at the last real token -> MLP -> 7-D action

It is the paper's OpenVLA-7B in miniature: same token layout (BOS at 0, the visual patch tokens
at 1..T, text after), same aligned-layer convention (`hidden_states[k]`, the middle by default).
At the default 112 px with patch 16 the grid is 7x7 = 49 tokens, the same grid as the
`efficientnet-lite0` teacher's stride-16 blocks at 112 px; 224 px gives 14x14.
Defaults are sized so a few hundred steps at batch 16 take about a minute on 2 CPU cores.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from featurecache.pipelines.training.students.base import (
    ACTION_DIM,
    ByteTokenizer,
    Student,
    StudentOutput,
    action_head,
    last_token_states,
)

TINY_VLA_DEFAULTS: dict[str, Any] = {
    "image_size": 112,
    "patch_size": 16,
    "vision_hidden": 128,
    "vision_layers": 2,
    "vision_heads": 4,
    "hidden_size": 192,
    "num_layers": 4,
    "num_heads": 4,
    "max_text_bytes": 96,
}


class TinyVLA(Student):
    """A ViT encoder + MLP projector + Llama-style decoder + action head (see module docstring)."""

    def __init__(self, *, seed: int = 0, **options: Any) -> None:
        super().__init__()
        unknown = set(options) - set(TINY_VLA_DEFAULTS)
        if unknown:
            raise ValueError(
                f"Unknown tiny-vla option(s) {sorted(unknown)}; expected some of "
                f"{sorted(TINY_VLA_DEFAULTS)}."
            )
        o = {**TINY_VLA_DEFAULTS, **options}
        if o["image_size"] % o["patch_size"]:
            raise ValueError(
                f"tiny-vla's `image_size` should be a multiple of patch_size {o['patch_size']}. "
                f"Found {o['image_size']}."
            )
        from transformers import LlamaConfig, LlamaModel, ViTConfig, ViTModel

        self._options = o
        self.spec = "tiny-vla"
        self.image_size = o["image_size"]
        side = o["image_size"] // o["patch_size"]
        self.visual_grid = (side, side)
        self.hidden_size = o["hidden_size"]
        self.num_layers = o["num_layers"]
        self.default_projector_hidden = 256
        self.tokenizer = ByteTokenizer(max_length=o["max_text_bytes"])
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.vision = ViTModel(
                ViTConfig(
                    image_size=o["image_size"],
                    patch_size=o["patch_size"],
                    hidden_size=o["vision_hidden"],
                    num_hidden_layers=o["vision_layers"],
                    num_attention_heads=o["vision_heads"],
                    intermediate_size=4 * o["vision_hidden"],
                ),
                add_pooling_layer=False,
            )
            self.vision_proj = nn.Sequential(
                nn.Linear(o["vision_hidden"], o["hidden_size"]),
                nn.GELU(),
                nn.Linear(o["hidden_size"], o["hidden_size"]),
            )
            self.decoder = LlamaModel(
                LlamaConfig(
                    vocab_size=ByteTokenizer.vocab_size,
                    hidden_size=o["hidden_size"],
                    num_hidden_layers=o["num_layers"],
                    num_attention_heads=o["num_heads"],
                    num_key_value_heads=o["num_heads"],
                    intermediate_size=4 * o["hidden_size"],
                    max_position_embeddings=1 + side * side + o["max_text_bytes"] + 8,
                    pad_token_id=ByteTokenizer.PAD,
                    bos_token_id=ByteTokenizer.BOS,
                    eos_token_id=ByteTokenizer.EOS,
                )
            )
            self.head = action_head(o["hidden_size"], ACTION_DIM)

    def options(self) -> dict[str, Any]:
        return dict(self._options)

    def forward(
        self, images: torch.Tensor, instructions: list[str], align_layer: int
    ) -> StudentOutput:
        b, t = images.shape[0], self.num_visual_tokens
        pixels = (images - 0.5) / 0.5  # [0, 1] -> [-1, 1], ViT's usual normalisation
        patches = self.vision(pixel_values=pixels).last_hidden_state[:, 1:]  # (B, T, d_vis)
        visual = self.vision_proj(patches)  # (B, T, d)
        ids, text_mask = self.tokenizer.batch(instructions)
        ids, text_mask = ids.to(images.device), text_mask.to(images.device)
        bos = torch.full((b, 1), ByteTokenizer.BOS, dtype=torch.long, device=images.device)
        embed = self.decoder.get_input_embeddings()
        inputs = torch.cat([embed(bos), visual, embed(ids)], dim=1)  # (B, 1 + T + L, d)
        mask = torch.cat(
            [torch.ones((b, 1 + t), dtype=torch.long, device=images.device), text_mask], 1
        )
        out = self.decoder(inputs_embeds=inputs, attention_mask=mask, output_hidden_states=True)
        aligned = out.hidden_states[align_layer][:, 1 : 1 + t]  # (B, T, d)
        actions = self.head(last_token_states(out.last_hidden_state, mask))  # (B, 7)
        return StudentOutput(actions=actions.float(), visual=aligned)
