"""LoRA adapters (peft) for the pretrained part of an HF student, as in the paper's recipe.

The released code (BlindVLA `finetune_align.py`, after OpenVLA's `finetune.py`) wraps the VLA with

    LoraConfig(r=32, lora_alpha=min(32, 16), lora_dropout=0.0, target_modules="all-linear",
               init_lora_weights="gaussian")

so our defaults are rank 32, alpha min(rank, 16), dropout 0, every linear layer of the pretrained
model (vision tower, vision->language connector, language model), Gaussian init (lora_B = 0, so
step 0 computes exactly the pretrained function). `targets="language-model"` restricts the
adapters to the language model's linear layers (both Gemma stacks for pi0), and a comma list
(`q_proj,v_proj`) picks layers by name as peft does (a layer whose name is, or ends in, `.entry`).

    student = load_student("hf-vlm:/ckpt", lora=LoraSettings(rank=32))   # apply_lora inside
    trainable = checkpoint_tensors(model)      # what a LoRA run's checkpoint holds

Which parameters train with LoRA on: the adapters, the student's own new modules (the action
head, which live outside the pretrained model), the modules the student names in
`lora_full_train` (pi0's action/state/time projections) and the alignment projector when
`--train-projector`. Everything pretrained stays frozen. A LoRA run's checkpoint therefore holds
only those trainable tensors: the frozen base is reloaded from the student's PATH (honest
loading: every weight must load) and a frozen projector is rebuilt from its seed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from featurecache.errors import FeatureCacheError, OptionError
from featurecache.pipelines.training.config import (  # torch-free, for the CLI
    DEFAULT_LORA_TARGETS,
    LORA_TARGET_PRESETS,
    LoraSettings,
)

__all__ = [
    "DEFAULT_LORA_TARGETS",
    "LORA_TARGET_PRESETS",
    "LoraSettings",
    "ParameterCounts",
    "adapter_parameters",
    "apply_lora",
    "checkpoint_tensors",
    "expected_checkpoint_names",
    "lora_target_names",
    "parameter_counts",
]

SHOWN_NAMES = 8  # layer-name suffixes listed in an error message


@dataclass(frozen=True, slots=True)
class ParameterCounts:
    """trainable / total parameter counts of a module (tied tensors counted once)."""

    trainable: int
    total: int

    @property
    def fraction(self) -> float:
        return self.trainable / max(self.total, 1)


def parameter_counts(module: nn.Module) -> ParameterCounts:
    """Count `module`'s parameters (each tensor once, however often it is shared)."""
    seen: dict[int, nn.Parameter] = {}
    for p in module.parameters():
        seen.setdefault(id(p), p)
    total = sum(p.numel() for p in seen.values())
    return ParameterCounts(sum(p.numel() for p in seen.values() if p.requires_grad), total)


def lora_target_names(
    base: nn.Module,
    targets: str,
    *,
    language_prefixes: Sequence[str] = (),
    full_train: Sequence[str] = (),
    owner: str = "the student",
) -> list[str]:
    """Names (relative to `base`) of the nn.Linear layers that get adapters.

    language_prefixes: name prefixes of the language model inside `base` (for `language-model`).
    full_train: modules of `base` trained in full instead (never adapted).
    Raises OptionError when a name entry matches no linear layer, or nothing is selected.
    """
    linear = [
        name
        for name, module in base.named_modules()
        if isinstance(module, nn.Linear) and not _under(name, full_train)
    ]
    if targets == "all-linear":
        chosen = linear
    elif targets == "language-model":
        if not language_prefixes:
            raise OptionError(
                f"Expected --lora-targets all-linear or layer names for {owner}, got "
                "language-model (this student names no language model to restrict to)."
            )
        chosen = [n for n in linear if _under(n, language_prefixes)]
    else:
        entries = [e.strip() for e in targets.split(",") if e.strip()]
        chosen = []
        for entry in entries:
            hits = [n for n in linear if n == entry or n.endswith("." + entry)]
            if not hits:
                suffixes = sorted({n.rsplit(".", 1)[-1] for n in linear})
                raise OptionError(
                    f"Expected --lora-targets entry {entry!r} to name linear layers of {owner}, "
                    f"got no match (its linear layers end in: "
                    f"{', '.join(suffixes[:SHOWN_NAMES])}"
                    f"{', ...' if len(suffixes) > SHOWN_NAMES else ''}; or use "
                    f"{' / '.join(LORA_TARGET_PRESETS)})."
                )
            chosen += [n for n in hits if n not in chosen]
    if not chosen:
        raise OptionError(
            f"Expected --lora-targets {targets!r} to select linear layers of {owner}, got none."
        )
    return chosen


def adapter_parameters(base: nn.Module, names: Sequence[str], rank: int) -> int:
    """Parameters LoRA of `rank` adds on the named nn.Linear layers of `base`: r x (in + out)
    each (A: r x in, B: out x r). Works on the meta device (shapes only)."""
    modules = dict(base.named_modules())
    return sum(rank * (modules[n].in_features + modules[n].out_features) for n in names)


def apply_lora(student: nn.Module, settings: LoraSettings, *, seed: int = 0) -> list[str]:
    """Freeze the student's pretrained model and inject LoRA adapters into it (in place).

    The student names its pretrained module with `lora_base` (an attribute name), the language
    model's prefixes inside it with `lora_language_prefixes`, and modules to train in full with
    `lora_full_train`. Adapter init is seeded by `seed` (identical on every rank). Sets
    `student.lora` to `settings`; returns the adapted layer names (relative to the base).
    """
    from peft import LoraConfig, inject_adapter_in_model

    spec = getattr(student, "spec", type(student).__name__)
    base_name = getattr(student, "lora_base", None)
    if not base_name:
        raise OptionError(
            f"Expected --lora-rank only with a pretrained HF student (hf-vlm:PATH, hf-pi0:PATH), "
            f"got student {spec!r}, which has no pretrained model to adapt."
        )
    if getattr(student, "lora", None) is not None:
        raise FeatureCacheError(f"Expected a student without adapters, got {spec!r} with LoRA.")
    base: nn.Module = getattr(student, base_name)
    full_train = tuple(getattr(student, "lora_full_train", ()))
    names = lora_target_names(
        base,
        settings.targets,
        language_prefixes=tuple(getattr(student, "lora_language_prefixes", ())),
        full_train=full_train,
        owner=spec,
    )
    config = LoraConfig(
        r=settings.rank,
        lora_alpha=settings.scale_alpha,
        lora_dropout=settings.dropout,
        target_modules=names,
        init_lora_weights="gaussian",
    )
    base.requires_grad_(False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        inject_adapter_in_model(config, base)
    for name, module in base.named_modules():
        if name and _under(name, full_train):
            module.requires_grad_(True)
    student.lora = settings
    return names


def checkpoint_tensors(model: nn.Module, *, adapters_only: bool) -> dict[str, torch.Tensor]:
    """The tensors a checkpoint of `model` holds, detached CPU copies keyed as in state_dict.

    adapters_only (a LoRA run): the trainable parameters only (adapters, head, trainable
    projector); the frozen rest is rebuilt from the base checkpoint and the seed. Otherwise the
    whole state_dict."""
    if not adapters_only:
        items = model.state_dict().items()
    else:
        items = ((n, p) for n, p in model.named_parameters() if p.requires_grad)
    return {name: t.detach().cpu().clone().contiguous() for name, t in items}


def expected_checkpoint_names(model: nn.Module, *, adapters_only: bool) -> set[str]:
    """The names `checkpoint_tensors(model, adapters_only=...)` writes (what a load must find)."""
    if not adapters_only:
        return set(model.state_dict())
    return {n for n, p in model.named_parameters() if p.requires_grad}


def _under(name: str, prefixes: Sequence[str]) -> bool:
    """Whether module `name` is one of `prefixes` or inside one (`a.b` is under `a`)."""
    return any(name == p.rstrip(".") or name.startswith(p.rstrip(".") + ".") for p in prefixes)
