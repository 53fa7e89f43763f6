"""`hf-vlm:PATH` students (alias `hf-llava:`): every supported grid family, against a direct
forward of the same transformers model through its own processor."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from featurecache.errors import FeatureCacheError
from featurecache.pipelines.model_loading import IncompleteWeightsError
from featurecache.pipelines.training.students import load_student, parse_student_spec
from featurecache.pipelines.vlm import UnsupportedVLMError, build_prompt, load_vlm

from ._train_helpers import one_thread

GRID_FAMILIES = ("llava", "qwen2_vl", "qwen2_5_vl", "paligemma", "idefics3", "smolvlm")
TEXTS = ["put the red cube on the plate", "What is on the table?"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    yield from one_thread()


def _direct(path, images: torch.Tensor, texts: list[str], layer: int) -> torch.Tensor:
    """The oracle: the family's processor and model called directly on the same uint8 frames;
    hidden_states[layer] where input_ids holds the image token -> (B, T, d)."""
    vlm = load_vlm(path)
    if vlm.family.model_type in ("idefics3", "smolvlm"):
        vlm.processor.image_processor.do_image_splitting = False  # one tile, as the student
    frames = [
        Image.fromarray((im.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy())
        for im in images
    ]
    nested = vlm.family.nested_images
    inputs = vlm.processor(
        text=[build_prompt(vlm, t) for t in texts],
        images=[[f] for f in frames] if nested else frames,
        padding=True,
        return_tensors="pt",
    )
    inputs = {k: v for k, v in inputs.items() if k != "labels"}
    with torch.no_grad():
        hidden = vlm.model.model(**inputs, output_hidden_states=True).hidden_states[layer]
    is_image = inputs["input_ids"] == vlm.image_token_id
    return hidden[is_image].view(len(texts), -1, hidden.shape[-1])


@pytest.mark.parametrize("family", GRID_FAMILIES)
def test_visual_tokens_are_the_models_image_positions(family, tiny_vlm_paths) -> None:
    path = tiny_vlm_paths[family]
    s = load_student(f"hf-vlm:{path}").eval()
    assert s.hidden_size == 32 and s.num_layers == 2
    side = s.image_size
    images = torch.from_numpy(
        np.random.default_rng(0).integers(0, 256, (2, 3, side, side)).astype(np.float32) / 255
    )
    with torch.no_grad():
        out = s(images, TEXTS, 1)
    assert out.actions.shape == (2, 7) and out.actions.dtype == torch.float32
    assert out.visual.shape == (2, s.num_visual_tokens, 32)
    torch.testing.assert_close(out.visual, _direct(path, images, TEXTS, 1), rtol=1e-5, atol=1e-5)
    # trainable end to end: the action loss reaches the vision tower
    s.train()
    s(images, TEXTS, 1).actions.sum().backward()
    assert s.head[0].weight.grad is not None
    vision = [p.grad for n, p in s.backbone.named_parameters() if "vision" in n or "visual" in n]
    assert any(g is not None and g.abs().sum() > 0 for g in vision)


def test_grids_follow_the_family(tiny_vlm_paths) -> None:
    grids = {f: load_student(f"hf-vlm:{tiny_vlm_paths[f]}").visual_grid for f in GRID_FAMILIES}
    # CLIP / SigLIP 32 px patch 8 -> 4x4; Qwen 64 px, patch 8, merge 2 -> 4x4;
    # Idefics3 / SmolVLM one 32 px tile, patch 8, pixel shuffle 2 -> 2x2
    assert grids == {
        "llava": (4, 4), "qwen2_vl": (4, 4), "qwen2_5_vl": (4, 4), "paligemma": (4, 4),
        "idefics3": (2, 2), "smolvlm": (2, 2),
    }  # fmt: skip
    qwen = load_student(f"hf-vlm:{tiny_vlm_paths['qwen2_vl']}", image_size=32)
    assert qwen.visual_grid == (2, 2)


def test_hf_llava_is_an_alias(tiny_vlm_paths) -> None:
    assert parse_student_spec("hf-llava:/x") == ("hf-vlm", "/x")
    assert parse_student_spec("hf-vlm:/x") == ("hf-vlm", "/x")
    s = load_student(f"hf-llava:{tiny_vlm_paths['llava']}")
    assert s.visual_grid == (4, 4) and s.family.model_type == "llava"


def test_refusals(tiny_vlm_paths, tmp_path) -> None:
    with pytest.raises(UnsupportedVLMError, match=r"LLaVA-OneVision.*one grid"):
        load_student(f"hf-vlm:{tiny_vlm_paths['llava_onevision']}")
    with pytest.raises(FeatureCacheError, match=re.escape(str(tmp_path))):
        load_student(f"hf-vlm:{tmp_path}")
    with pytest.raises(FeatureCacheError, match=r"Expected hf-vlm options.*depth"):
        load_student(f"hf-vlm:{tiny_vlm_paths['llava']}", depth=3)
    with pytest.raises(FeatureCacheError, match="--student"):
        parse_student_spec("hf-vlm:")


def test_missing_weights_are_refused_unless_allowed(tiny_vlm_paths, tmp_path) -> None:
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    broken.mkdir()
    for f in tiny_vlm_paths["paligemma"].iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    weights = load_file(str(broken / "model.safetensors"))
    dropped = next(k for k in weights if "language_model" in k and "q_proj" in k)
    del weights[dropped]
    save_file(weights, str(broken / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(IncompleteWeightsError, match="1 missing"):
        load_student(f"hf-vlm:{broken}")
    s = load_student(f"hf-vlm:{broken}", allow_random_weights=True)
    assert s.visual_grid == (4, 4)
    assert json.loads((broken / "config.json").read_text())["model_type"] == "paligemma"
