"""LoRA (peft) on HF students: what is adapted, what trains, and that step 0 is the base model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from featurecache.errors import OptionError
from featurecache.pipelines.training.students import (
    LoraSettings,
    load_student,
    parameter_counts,
)
from featurecache.pipelines.training.students.lora import (
    checkpoint_tensors,
    expected_checkpoint_names,
    lora_target_names,
)

from ._train_helpers import one_thread
from .tiny_pi0 import save_tiny_pi0

TEXTS = ["put the red cube on the plate", "What is on the table?"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    yield from one_thread()


@pytest.fixture(scope="module")
def pi0_path(tmp_path_factory):
    return save_tiny_pi0(tmp_path_factory.mktemp("pi0") / "ckpt")


def test_settings_defaults_are_the_release() -> None:
    s = LoraSettings()
    assert (s.rank, s.scale_alpha, s.dropout, s.targets) == (32, 16.0, 0.0, "all-linear")
    assert LoraSettings(rank=8).scale_alpha == 8.0 and LoraSettings(alpha=64).scale_alpha == 64
    for bad, match in (
        ({"rank": 0}, "--lora-rank >= 1"),
        ({"alpha": 0}, "--lora-alpha > 0"),
        ({"dropout": 1.0}, r"--lora-dropout in \[0, 1\)"),
        ({"targets": " , "}, "--lora-targets"),
    ):
        with pytest.raises(OptionError, match=match):
            LoraSettings(**bad)


def test_target_names() -> None:
    base = nn.ModuleDict(
        {
            "vision": nn.ModuleDict({"q_proj": nn.Linear(2, 2), "conv": nn.Conv2d(1, 1, 1)}),
            "language_model": nn.ModuleDict({"q_proj": nn.Linear(2, 2), "up": nn.Linear(2, 2)}),
            "head": nn.Linear(2, 2),
        }
    )
    lm = ("language_model",)
    everything = ["vision.q_proj", "language_model.q_proj", "language_model.up", "head"]
    assert lora_target_names(base, "all-linear") == everything
    assert lora_target_names(base, "all-linear", full_train=("head",)) == everything[:3]
    assert lora_target_names(base, "language-model", language_prefixes=lm) == everything[1:3]
    assert lora_target_names(base, "q_proj") == ["vision.q_proj", "language_model.q_proj"]
    assert lora_target_names(base, "up, q_proj") == [
        "language_model.up", "vision.q_proj", "language_model.q_proj"
    ]  # fmt: skip
    with pytest.raises(OptionError, match=r"'k_proj'.*end in: head, q_proj, up"):
        lora_target_names(base, "q_proj,k_proj")
    with pytest.raises(OptionError, match="names no language model"):
        lora_target_names(base, "language-model")


def test_lora_starts_as_the_base_and_trains_only_adapters_and_head(tiny_vlm_paths) -> None:
    path = tiny_vlm_paths["qwen2_vl"]
    full = load_student(f"hf-vlm:{path}", seed=3).eval()
    lora = load_student(f"hf-vlm:{path}", seed=3, lora=LoraSettings(rank=4)).eval()
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        a, b = full(images, TEXTS, 1), lora(images, TEXTS, 1)
    torch.testing.assert_close(b.visual, a.visual)  # lora_B = 0 at init (Gaussian init)
    torch.testing.assert_close(b.actions, a.actions)
    trainable = {n for n, p in lora.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or n.startswith("head.") for n in trainable)
    assert any(n.startswith("head.") for n in trainable)
    adapted = {n.split(".lora_")[0] for n in trainable if "lora_" in n}
    linear = {"backbone." + n for n, m in full.backbone.named_modules() if isinstance(m, nn.Linear)}
    assert adapted == linear  # all-linear: vision tower, merger and language model
    counts, whole = parameter_counts(lora), parameter_counts(full)
    assert counts.trainable < whole.trainable == whole.total
    assert counts.total == whole.total + sum(
        p.numel() for n, p in lora.named_parameters() if "lora_" in n
    )
    # the checkpoint of a LoRA run holds exactly the trainable tensors
    saved = checkpoint_tensors(lora, adapters_only=True)
    assert set(saved) == trainable == expected_checkpoint_names(lora, adapters_only=True)
    # training moves the adapters, never the frozen base
    before = {n: p.detach().clone() for n, p in lora.named_parameters() if not p.requires_grad}
    opt = torch.optim.SGD([p for p in lora.parameters() if p.requires_grad], lr=0.1)
    lora.train()
    for _ in range(2):
        out = lora(images, TEXTS, 1)
        (out.actions.square().mean() + out.visual.square().mean()).backward()
        opt.step()
        opt.zero_grad()
    assert all(torch.equal(p, before[n]) for n, p in lora.named_parameters() if n in before)
    with torch.no_grad():
        assert not torch.allclose(lora.eval()(images, TEXTS, 1).visual, a.visual)


def test_language_model_targets_and_seeded_init(tiny_vlm_paths) -> None:
    path = tiny_vlm_paths["idefics3"]
    settings = LoraSettings(rank=2, targets="language-model")
    one = load_student(f"hf-vlm:{path}", seed=1, lora=settings)
    two = load_student(f"hf-vlm:{path}", seed=1, lora=settings)
    names = [n for n, p in one.named_parameters() if "lora_" in n]
    assert names and all(n.startswith("backbone.text_model.") for n in names)
    sd1, sd2 = one.state_dict(), two.state_dict()
    assert all(torch.equal(sd1[n], sd2[n]) for n in sd1)  # identical on every rank


def test_pi0_lora_keeps_its_action_projections_trainable(pi0_path) -> None:
    s = load_student(f"hf-pi0:{pi0_path}", lora=LoraSettings(rank=4))
    trainable = {n for n, p in s.named_parameters() if p.requires_grad}
    full = {n for n in trainable if "lora_" not in n}
    assert full and all(
        n.startswith(("pi0.embed_action_time.", "pi0.action_out_proj.")) for n in full
    )
    adapted = {n.split(".lora_")[0] for n in trainable if "lora_" in n}
    assert any(".dit." in n for n in adapted) and any(".vision_tower." in n for n in adapted)
    lm = load_student(f"hf-pi0:{pi0_path}", lora=LoraSettings(rank=4, targets="language-model"))
    adapted = {n.split(".lora_")[0] for n, p in lm.named_parameters() if "lora_" in n}
    assert adapted and all(
        n.startswith(("pi0.model.vlm.language_model.", "pi0.model.dit.")) for n in adapted
    )


def test_tiny_vla_refuses_lora() -> None:
    with pytest.raises(OptionError, match="pretrained HF student"):
        load_student("tiny-vla", lora=LoraSettings(rank=2), image_size=32)
