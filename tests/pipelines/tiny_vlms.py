"""Tiny random VLMs of every supported family, built from their real transformers configs and
saved WITH their weights, tokenizer and processor (no download): for the hf-vlm teacher and
student tests. Import relatively (`from ..tiny_vlms import save_tiny_vlm`).

Every model: text hidden 32, 2 decoder layers; vision hidden 32, 2 layers, 32 px tiles, patch 8.
A word-level tokenizer knows the few words of `WORDS` plus each family's special tokens.
`save_tiny_vlm(family, out)` writes config.json, model.safetensors, the tokenizer and the
processor files; `FAMILIES` lists the model_types it builds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

__all__ = ["FAMILIES", "WORDS", "save_tiny_vlm"]

WORDS = ("What", "is", "on", "the", "table?", "put", "red", "cube", "plate", "USER:")
FAMILIES = (
    "llava",
    "llava_onevision",
    "qwen2_vl",
    "qwen2_5_vl",
    "paligemma",
    "idefics3",
    "smolvlm",
)
# A chat template of the ChatML kind, enough for one user turn of images and text.
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% else %}{{ c['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _tokenizer(special: list[str]) -> Any:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab: dict[str, int] = {}
    for word in ["<unk>", "<pad>", "<s>", "</s>", *special, *WORDS]:
        vocab.setdefault(word, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        additional_special_tokens=list(special),
    )


def _text(kind: str, vocab: int, **extra: Any) -> Any:
    import transformers

    cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config}[kind]
    return cls(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=1,
        bos_token_id=2,
        eos_token_id=3,
        **extra,
    )


_VISION = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "image_size": 32,
    "patch_size": 8,
}


def save_tiny_vlm(family: str, out: Path, *, seed: int = 0) -> Path:
    """Build the tiny random `family` VLM and save it, with tokenizer and processor, to `out`."""
    import transformers as tf

    from featurecache.pipelines.vlm import image_only_processor_class

    torch.manual_seed(seed)
    out = Path(out)
    if family == "llava":
        tok = _tokenizer(["<image>"])
        ids = tok.convert_tokens_to_ids
        config = tf.LlavaConfig(
            vision_config=tf.CLIPVisionConfig(**_VISION, projection_dim=32),
            text_config=_text("llama", len(tok)),
            image_token_id=ids("<image>"),
            vision_feature_layer=-1,
            vision_feature_select_strategy="default",
        )
        processor = tf.LlavaProcessor(
            image_processor=tf.CLIPImageProcessor(
                size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
            ),
            tokenizer=tok,
            patch_size=8,
            vision_feature_select_strategy="default",
            num_additional_image_tokens=1,
            image_token="<image>",
        )
    elif family == "llava_onevision":
        tok = _tokenizer(["<image>", "<video>", "<|im_start|>", "<|im_end|>"])
        ids = tok.convert_tokens_to_ids
        pinpoints = [[32, 32], [32, 64], [64, 32], [64, 64]]
        config = tf.LlavaOnevisionConfig(
            vision_config=tf.SiglipVisionConfig(**_VISION),
            text_config=_text("qwen2", len(tok)),
            image_token_index=ids("<image>"),
            video_token_index=ids("<video>"),
            image_grid_pinpoints=pinpoints,
            vision_feature_select_strategy="full",
            vision_feature_layer=-1,
        )
        processor = image_only_processor_class(tf.LlavaOnevisionProcessor)(
            image_processor=tf.LlavaOnevisionImageProcessor(
                size={"height": 32, "width": 32}, image_grid_pinpoints=pinpoints
            ),
            tokenizer=tok,
            num_image_tokens=16,
            vision_feature_select_strategy="full",
            image_token="<image>",
            video_token="<video>",
        )
    elif family in ("qwen2_vl", "qwen2_5_vl"):
        special = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
        tok = _tokenizer([*special, "<|im_start|>", "<|im_end|>"])
        ids = tok.convert_tokens_to_ids
        text = {
            "vocab_size": len(tok),
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 2,
            "max_position_embeddings": 256,
            "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]},  # sums to head_dim/2
            "pad_token_id": 1,
            "bos_token_id": 2,
            "eos_token_id": 3,
        }
        tokens = {
            "image_token_id": ids("<|image_pad|>"),
            "video_token_id": ids("<|video_pad|>"),
            "vision_start_token_id": ids("<|vision_start|>"),
            "vision_end_token_id": ids("<|vision_end|>"),
        }
        if family == "qwen2_vl":
            vision = {
                "depth": 2,
                "embed_dim": 32,
                "hidden_size": 32,
                "num_heads": 2,
                "mlp_ratio": 2,
                "patch_size": 8,
                "spatial_merge_size": 2,
                "temporal_patch_size": 2,
            }
            config = tf.Qwen2VLConfig(text_config=text, vision_config=vision, **tokens)
            cls = tf.Qwen2VLProcessor
        else:
            vision = {
                "depth": 2,
                "hidden_size": 32,
                "intermediate_size": 64,
                "out_hidden_size": 32,
                "num_heads": 2,
                "patch_size": 8,
                "spatial_merge_size": 2,
                "temporal_patch_size": 2,
                "window_size": 32,
                "fullatt_block_indexes": [1],
            }
            config = tf.Qwen2_5_VLConfig(text_config=text, vision_config=vision, **tokens)
            cls = tf.Qwen2_5_VLProcessor
        processor = image_only_processor_class(cls)(
            image_processor=tf.Qwen2VLImageProcessor(
                min_pixels=32 * 32, max_pixels=64 * 64, patch_size=8, merge_size=2
            ),
            tokenizer=tok,
            chat_template=CHATML,
        )
    elif family == "paligemma":
        tok = _tokenizer(["<image>"])
        ids = tok.convert_tokens_to_ids
        config = tf.PaliGemmaConfig(
            vision_config=tf.SiglipVisionConfig(**_VISION, projection_dim=32),
            text_config=tf.GemmaConfig(
                vocab_size=len(tok),
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=2,
                num_key_value_heads=2,
                head_dim=16,
                max_position_embeddings=256,
                pad_token_id=1,
                bos_token_id=2,
                eos_token_id=3,
            ),
            image_token_index=ids("<image>"),
            projection_dim=32,
        )
        image_processor = tf.SiglipImageProcessor(size={"height": 32, "width": 32})
        image_processor.image_seq_length = 16
        processor = tf.PaliGemmaProcessor(image_processor=image_processor, tokenizer=tok)
    elif family in ("idefics3", "smolvlm"):
        grid_tokens = [f"<row_{r}_col_{c}>" for r in range(1, 5) for c in range(1, 5)]
        special = ["<image>", "<fake_token_around_image>", "<global-img>", "<end_of_utterance>"]
        tok = _tokenizer([*special, *grid_tokens, "User:", "Assistant:"])
        ids = tok.convert_tokens_to_ids
        vision = {**_VISION}
        text = _text("llama", len(tok))
        if family == "idefics3":
            config = tf.Idefics3Config(
                vision_config=vision,
                text_config=text,
                image_token_id=ids("<image>"),
                scale_factor=2,
            )
            image_processor = tf.Idefics3ImageProcessor(
                size={"longest_edge": 64}, max_image_size={"longest_edge": 32}
            )
            cls = tf.Idefics3Processor
        else:
            config = tf.SmolVLMConfig(
                vision_config=vision,
                text_config=text,
                image_token_id=ids("<image>"),
                scale_factor=2,
            )
            image_processor = tf.SmolVLMImageProcessor(
                size={"longest_edge": 64}, max_image_size={"longest_edge": 32}
            )
            cls = image_only_processor_class(tf.SmolVLMProcessor)
        parts = {} if family == "idefics3" else {"video_processor": None}  # SmolVLM's: none
        processor = cls(image_processor=image_processor, tokenizer=tok, image_seq_len=4, **parts)
    else:
        raise ValueError(f"no tiny builder for {family!r}")
    model = tf.AutoModelForImageTextToText.from_config(config)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out
