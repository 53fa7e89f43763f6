"""VLM families: image-token positions from the processor's own output, against the model's
own forward; refusals by name."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from featurecache.pipelines.vlm import (
    SUPPORTED_FAMILIES,
    ImageTokenCountError,
    UnsupportedVLMError,
    build_prompt,
    gather_tokens,
    image_token_grid,
    is_vlm_config,
    load_vlm,
    prepare_batch,
    vlm_family,
)

from .tiny_vlms import FAMILIES

transformers = pytest.importorskip("transformers")

# Image tokens of one 64x64 frame, worked out by hand from each family's rules:
# LLaVA / PaliGemma: (32 / 8)^2 patches; Qwen2(.5)-VL: 64x64 px -> 8x8 patches of 8 -> merge 2x2;
# Idefics3 / SmolVLM: 2x2 crops of 32 px + the global image, (32 / 8 / 2)^2 = 4 tokens each;
# LLaVA-OneVision: base 4x4 + any-res 2x2 crops -> an 8x8 grid + one newline token per row.
EXPECTED_TOKENS = {
    "llava": 16,
    "paligemma": 16,
    "qwen2_vl": 16,
    "qwen2_5_vl": 16,
    "idefics3": 5 * 4,
    "smolvlm": 5 * 4,
    "llava_onevision": 16 + 8 * 8 + 8,
}
EXPECTED_GRID = {"llava": (4, 4), "paligemma": (4, 4), "qwen2_vl": (4, 4), "qwen2_5_vl": (4, 4)}


@pytest.fixture(scope="module")
def frames() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)) for _ in range(2)]


def test_every_family_has_a_tiny_model() -> None:
    assert set(FAMILIES) == set(SUPPORTED_FAMILIES)


@pytest.mark.parametrize("family", FAMILIES)
def test_image_tokens_match_the_models_own_forward(
    family: str, tiny_vlm_paths: dict[str, Path], frames: list[Image.Image]
) -> None:
    torch.set_num_threads(1)
    path = tiny_vlm_paths[family]
    vlm = load_vlm(path)
    assert vlm.family.model_type == family
    prompts = [build_prompt(vlm, "put the red cube on the plate")] * len(frames)
    batch = prepare_batch(vlm, frames, prompts)
    n = EXPECTED_TOKENS[family]
    assert batch.image_positions.shape == (2, n)
    assert image_token_grid(vlm, batch) == EXPECTED_GRID.get(family)
    # Oracle: the full model (with its LM head) on the processor's output, positions by mask.
    model = transformers.AutoModelForImageTextToText.from_pretrained(path).eval()
    inputs = vlm.processor(
        text=prompts,
        images=[[f] for f in frames] if vlm.family.nested_images else frames,
        padding=True,
        return_tensors="pt",
    )
    inputs.pop("labels", None)
    mask = inputs["input_ids"] == model.config.image_token_id
    assert mask.sum(1).tolist() == [n, n]
    with torch.inference_mode():
        want = model(**inputs, output_hidden_states=True).hidden_states
        got = vlm.model.model(**batch.inputs, output_hidden_states=True).hidden_states
    assert len(got) == vlm.text_layers + 1
    for k in (0, vlm.text_layers):
        torch.testing.assert_close(
            gather_tokens(got[k], batch.image_positions), want[k][mask].view(2, n, -1)
        )


def test_text_positions_are_not_image_tokens(tiny_vlm_paths: dict[str, Path], frames) -> None:
    vlm = load_vlm(tiny_vlm_paths["qwen2_vl"])
    prompt = build_prompt(vlm, "What is on the table?")
    assert "<|vision_start|><|image_pad|><|vision_end|>" in prompt  # the chat template's
    batch = prepare_batch(vlm, frames[:1], [prompt])
    ids = batch.inputs["input_ids"][0]
    picked = set(batch.image_positions[0].tolist())
    others = [i for i in range(len(ids)) if i not in picked]
    assert (ids[batch.image_positions[0]] == vlm.image_token_id).all()
    assert (ids[others] != vlm.image_token_id).all()


def test_prompts_of_different_lengths_in_one_batch(tiny_vlm_paths: dict, frames) -> None:
    vlm = load_vlm(tiny_vlm_paths["llava"])
    prompts = [build_prompt(vlm, "put the red cube"), build_prompt(vlm, "What is on the table?")]
    batch = prepare_batch(vlm, frames, prompts)
    ids = batch.inputs["input_ids"]
    assert batch.image_positions.shape == (2, 16)
    for row in range(2):
        assert (ids[row, batch.image_positions[row]] == vlm.image_token_id).all()


def test_frames_of_two_sizes_are_refused(tiny_vlm_paths: dict, frames) -> None:
    vlm = load_vlm(tiny_vlm_paths["qwen2_vl"])
    prompt = build_prompt(vlm, "What is on the table?")
    with pytest.raises(ImageTokenCountError, match=r"\[16, 8\]"):
        prepare_batch(vlm, [frames[0], frames[1].resize((64, 32))], [prompt, prompt])


def test_unsupported_family_is_refused_by_name(tmp_path: Path) -> None:
    config = transformers.LlavaNextConfig()
    assert is_vlm_config(config)
    with pytest.raises(UnsupportedVLMError, match=r"LLaVA \(llava\).*got model_type 'llava_next'"):
        vlm_family(config)
    assert not is_vlm_config(transformers.ViTConfig())
    transformers.ViTConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2
    ).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedVLMError, match="hf:"):
        load_vlm(tmp_path)
