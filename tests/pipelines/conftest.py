"""Shared fixtures of the pipelines tests (owned by the build area; the training tests reuse them).

- `sample_data_dir`: a train split of 48 frames (4 episodes of 12), 64x64 px, in 3 shards of 16.
- `sample_splits`: {split: folder} for all four splits, 24 frames each, 64x64 px, shards of 12.
- `tiny_vit_path`: a tiny random ViT (transformers) with its image processor, saved to a folder.
- `tiny_vit_noproc_path`: the same ViT without an image processor (default preprocessing).
- `tiny_llava_path`: a tiny random LLaVA (CLIP vision tower 32 px / patch 8 -> 16 image tokens,
  Llama 2 layers, hidden 32) with a WordLevel tokenizer and a LlavaProcessor, saved to a folder.
- `save_tiny_vit(out, with_processor=True)`, `save_tiny_llava(out)`: the builders, importable
  only as fixtures' helpers (pytest runs with --import-mode=importlib).
- `tiny_vlm_paths`: {model_type: folder} of a tiny random VLM of every supported family (LLaVA,
  LLaVA-OneVision, Qwen2-VL, Qwen2.5-VL, PaliGemma, Idefics3, SmolVLM), see `tiny_vlms.py`.
- `ray_temp_dir`: a short temp dir for `ray.init(_temp_dir=...)` (Unix socket paths are short).
All are session-scoped and built once; treat them as read-only.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from featurecache.pipelines.demo.sample_data import SPLITS, write_sample_data

from .tiny_vlms import FAMILIES, save_tiny_vlm


@pytest.fixture(scope="session")
def sample_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A train split: 48 frames (4 episodes x 12), 64x64 px, shards frames-00000{0,1,2}.tar."""
    out = tmp_path_factory.mktemp("sample") / "train"
    write_sample_data(out, frames=48, shard_size=16, image_size=64, seed=0, split="train")
    return out


@pytest.fixture(scope="session")
def sample_splits(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """All four splits, 24 frames each (2 episodes), 64x64 px, 2 shards of 12 per split."""
    root = tmp_path_factory.mktemp("splits")
    out = {}
    for split in SPLITS:
        out[split] = root / split
        write_sample_data(out[split], frames=24, shard_size=12, image_size=64, split=split)
    return out


@pytest.fixture()
def ray_temp_dir() -> Iterator[str]:
    """A short, private temp dir for one test's Ray session (removed afterwards)."""
    path = tempfile.mkdtemp(prefix="fcray", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def save_tiny_vit(out: Path, *, with_processor: bool = True) -> Path:
    """A tiny random ViT (32 px, patch 8 -> 4x4 grid + CLS, hidden 32, 4 layers), saved to `out`
    with a ViTImageProcessor (resize to 32 px, mean = std = 0.5) unless `with_processor=False`."""
    import torch
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    torch.manual_seed(0)
    config = ViTConfig(
        image_size=32,
        patch_size=8,
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=2,
        intermediate_size=64,
    )
    ViTModel(config, add_pooling_layer=False).save_pretrained(out)
    if with_processor:
        ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(out)
    return out


def save_tiny_llava(out: Path) -> Path:
    """A tiny random LLaVA: CLIP vision tower (32 px, patch 8 -> 16 image tokens after dropping
    CLS), Llama text model (hidden 32, 2 layers), a WordLevel tokenizer and a LlavaProcessor."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        PreTrainedTokenizerFast,
    )

    words = [
        "<unk>",
        "<pad>",
        "<s>",
        "</s>",
        "<image>",
        "USER:",
        "ASSISTANT:",
        "What",
        "is",
        "on",
        "the",
        "table?",
        "put",
        "red",
        "cube",
        "plate",
    ]
    vocab = {w: i for i, w in enumerate(words)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        extra_special_tokens={"image_token": "<image>"},
    )
    vision = CLIPVisionConfig(
        image_size=32,
        patch_size=8,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        projection_dim=32,
    )
    text = LlamaConfig(
        vocab_size=len(words),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=1,
        bos_token_id=2,
        eos_token_id=3,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=vocab["<image>"],
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )
    torch.manual_seed(0)
    LlavaForConditionalGeneration(config).save_pretrained(out)
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=8,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        image_token="<image>",
    )
    processor.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_vit_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random ViT with its image processor (see `save_tiny_vit`)."""
    return save_tiny_vit(tmp_path_factory.mktemp("tiny-vit"))


@pytest.fixture(scope="session")
def tiny_llava_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random LLaVA with tokenizer and processor (see `save_tiny_llava`)."""
    return save_tiny_llava(tmp_path_factory.mktemp("tiny-llava"))


@pytest.fixture(scope="session")
def tiny_vit_noproc_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny ViT without an image processor (the teacher's default preprocessing applies)."""
    return save_tiny_vit(tmp_path_factory.mktemp("tiny-vit-noproc"), with_processor=False)


@pytest.fixture(scope="session")
def tiny_vlm_paths(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """{model_type: folder}: a tiny random saved VLM of every supported family (`tiny_vlms.py`)."""
    root = tmp_path_factory.mktemp("tiny-vlms")
    return {family: save_tiny_vlm(family, root / family) for family in FAMILIES}
