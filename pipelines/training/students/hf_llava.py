"""`hf-llava:PATH`: transformers' LlavaForConditionalGeneration from a local checkpoint, with an
action head on the final hidden state.

    sequence = [BOS?, <image> x T, instruction tokens...]   # T = the vision tower's patch count
    LlavaModel -> hidden_states[k] at the <image> positions = the aligned visual tokens (B, T, d)
               -> final hidden state at the last real token -> MLP -> 7-D action

The image-token positions are found from `config.image_token_id` (`image_token_index` in older
configs), never assumed. The language-model head is dropped (actions, not text, are predicted).
Remote code is never run unless `trust_remote_code=True` is asked for.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from featurecache.pipelines.training.students.base import (
    ACTION_DIM,
    Student,
    StudentOutput,
    action_head,
    last_token_states,
)


class HFLlava(Student):
    """A LLaVA-style VLM from `path` turned into a VLA (see module docstring)."""

    def __init__(
        self,
        path: str,
        *,
        seed: int = 0,
        dtype: str = "float32",
        trust_remote_code: bool = False,
    ) -> None:
        super().__init__()
        from transformers import AutoTokenizer, LlavaForConditionalGeneration

        root = Path(path)
        if not (root / "config.json").is_file():
            raise FileNotFoundError(
                f"hf-llava:PATH should name a local checkpoint folder with config.json. "
                f"Found no {root / 'config.json'}."
            )
        full = LlavaForConditionalGeneration.from_pretrained(
            str(root), dtype=getattr(torch, dtype), trust_remote_code=trust_remote_code
        )
        self.llava = full.model  # LlavaModel: vision tower + projector + language model
        del full
        self.tokenizer = AutoTokenizer.from_pretrained(
            str(root), trust_remote_code=trust_remote_code
        )
        cfg = self.llava.config
        token_id = getattr(cfg, "image_token_id", None)
        if token_id is None:
            token_id = getattr(cfg, "image_token_index", None)
        if token_id is None:
            raise ValueError(
                f"The Llava config at {root} should define image_token_id (or "
                f"image_token_index). Found neither."
            )
        self.image_token_id = int(token_id)
        vcfg, tcfg = cfg.vision_config, cfg.text_config
        side = vcfg.image_size // vcfg.patch_size
        self._extra_cls = 1 if cfg.vision_feature_select_strategy == "full" else 0
        if self._extra_cls:
            raise ValueError(
                "hf-llava expects vision_feature_select_strategy 'default' (patch tokens only, a "
                "square grid the teacher grid can match). Found 'full'."
            )
        self._path, self._dtype, self._trust = str(root), dtype, trust_remote_code
        self.spec = f"hf-llava:{root}"
        self.image_size = int(vcfg.image_size)
        self.visual_grid = (side, side)
        self.hidden_size = int(tcfg.hidden_size)
        self.num_layers = int(tcfg.num_hidden_layers)
        self.default_projector_hidden = 2048
        mean, std = [0.5, 0.5, 0.5], [0.5, 0.5, 0.5]
        pre = root / "preprocessor_config.json"
        if pre.is_file():
            meta = json.loads(pre.read_text())
            mean, std = meta.get("image_mean", mean), meta.get("image_std", std)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.head = action_head(self.hidden_size, ACTION_DIM).to(getattr(torch, dtype))

    def options(self) -> dict[str, Any]:
        return {"dtype": self._dtype, "trust_remote_code": self._trust}

    def _prompt_ids(self, instructions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded [BOS?, <image> x T, text...] ids (B, L) and mask (B, L)."""
        bos = self.tokenizer.bos_token_id
        head = ([bos] if bos is not None else []) + [self.image_token_id] * self.num_visual_tokens
        rows = [
            head + self.tokenizer(text, add_special_tokens=False)["input_ids"]
            for text in instructions
        ]
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        length = max(len(r) for r in rows)
        ids = torch.full((len(rows), length), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), length), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = 1
        return ids, mask

    def forward(
        self, images: torch.Tensor, instructions: list[str], align_layer: int
    ) -> StudentOutput:
        ids, mask = self._prompt_ids(instructions)
        ids, mask = ids.to(images.device), mask.to(images.device)
        pixels = ((images - self.mean) / self.std).to(self.head[0].weight.dtype)
        out = self.llava(
            input_ids=ids, pixel_values=pixels, attention_mask=mask, output_hidden_states=True
        )
        is_image = ids == self.image_token_id  # (B, L)
        b, d = ids.shape[0], self.hidden_size
        aligned = out.hidden_states[align_layer][is_image].view(b, self.num_visual_tokens, d)
        actions = self.head(last_token_states(out.last_hidden_state, mask))
        return StudentOutput(actions=actions.float(), visual=aligned)
