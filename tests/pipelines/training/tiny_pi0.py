"""A tiny random pi0 (transformers' PI0ForConditionalGeneration: PaliGemma VLM + Gemma action
expert, hidden <= 64, 2 layers each, 32 px images with patch 8 = a 4x4 grid), saved WITH its
weights and a word-level tokenizer like a hub checkpoint (nothing downloaded).
`save_tiny_pi0(out)`; import relatively (`from .tiny_pi0 import save_tiny_pi0`)."""

from __future__ import annotations

from pathlib import Path

import torch

__all__ = ["TINY_PI0", "save_tiny_pi0"]

WORDS = ("put", "pick", "the", "red", "green", "blue", "cube", "sphere", "on", "plate", "up")
TINY_PI0 = {"image_size": 32, "patch_size": 8, "chunk_size": 4, "max_state_dim": 8}


def save_tiny_pi0(out: str | Path, *, seed: int = 0, image_size: int = 32) -> Path:
    """Build the tiny random pi0 and save it, with its tokenizer, to `out`."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PI0Config, PI0ForConditionalGeneration, PreTrainedTokenizerFast

    vocab: dict[str, int] = {}
    for word in ["<pad>", "<bos>", "<eos>", "<unk>", "<image>", *WORDS]:
        vocab.setdefault(word, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>",
        unk_token="<unk>", additional_special_tokens=["<image>"],
    )  # fmt: skip
    config = PI0Config(
        vlm_config={
            "model_type": "paligemma",
            "text_config": {
                "model_type": "gemma", "hidden_size": 64, "num_hidden_layers": 2,
                "intermediate_size": 128, "num_attention_heads": 2, "num_key_value_heads": 1,
                "head_dim": 32, "vocab_size": len(vocab),
            },
            "vision_config": {
                "model_type": "siglip_vision_model", "hidden_size": 32, "intermediate_size": 64,
                "patch_size": TINY_PI0["patch_size"], "image_size": image_size,
                "num_hidden_layers": 2, "num_attention_heads": 2, "vision_use_head": False,
            },
            "projection_dim": 64,
            "image_token_id": vocab["<image>"],
        },
        dit_config={
            "model_type": "gemma", "hidden_size": 32, "num_hidden_layers": 2,
            "intermediate_size": 64, "num_attention_heads": 2, "num_key_value_heads": 1,
            "head_dim": 32,
        },
        chunk_size=TINY_PI0["chunk_size"],
        max_state_dim=TINY_PI0["max_state_dim"],
        max_action_dim=TINY_PI0["max_state_dim"],
    )  # fmt: skip
    torch.manual_seed(seed)
    out = Path(out)
    PI0ForConditionalGeneration(config).save_pretrained(out)
    fast.save_pretrained(out)
    return out
