"""LoRA vs full fine-tuning: trainable parameters of real-size students, counted as
`featurecache train` trains them.

Each architecture is built from its transformers config on the meta device (shapes only: no
weights, no memory, no download) and split as the student classes split it: an `hf-vlm:` student
is the VLM's base model (LM head dropped) + the 7-D action head; `hf-pi0:` is the whole
PI0ForConditionalGeneration, whose action/state/time projections train in full under LoRA.
LoRA counts come from the same target rule and the same r x (in + out) per adapted layer that
`apply_lora` injects (a test checks the formula against peft on tiny models). The paper's
alignment projector (frozen at its seeded init by default) is listed beside, for a 1024-wide
teacher.

    python -m featurecache.benchmarks.lora [--quick] [--json FILE]
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from featurecache.benchmarks import harness
from featurecache.benchmarks.harness import Result, record, report, result

RANK = 32  # the paper's
TEACHER_DIM = 1024  # C-RADIOv3-L, the paper's teacher
DEVICE = "meta device (shapes only)"


def _architectures(quick: bool) -> dict[str, Callable[[], Any]]:
    """name -> a builder of the model (called under torch.device("meta"))."""
    import transformers as tf

    archs: dict[str, Callable[[], Any]] = {
        "hf-pi0: pi0 (PI0Config defaults: PaliGemma 3B + 300M expert)": lambda: (
            tf.PI0ForConditionalGeneration(tf.PI0Config())
        ),
        "hf-vlm: LLaVA-1.5-7B shape (LlavaConfig defaults)": lambda: (
            tf.AutoModelForImageTextToText.from_config(tf.LlavaConfig())
        ),
        "hf-vlm: PaliGemma-3B shape (PaliGemmaConfig defaults)": lambda: (
            tf.AutoModelForImageTextToText.from_config(tf.PaliGemmaConfig())
        ),
    }
    if not quick:
        archs["hf-vlm: Idefics3 shape (Idefics3Config defaults)"] = lambda: (
            tf.AutoModelForImageTextToText.from_config(tf.Idefics3Config())
        )
    return archs


def _count(module: Any) -> int:
    return sum(p.numel() for p in module.parameters())


def student_counts(model: Any, rank: int = RANK) -> dict[str, dict[str, int]]:
    """{"full", "lora all-linear", "lora language-model"} -> {trainable, total} for the student
    built on `model` (a PI0ForConditionalGeneration or a ...ForConditionalGeneration VLM)."""
    import torch

    from featurecache.pipelines.training.students.base import action_head
    from featurecache.pipelines.training.students.hf_vlm import language_model_prefixes
    from featurecache.pipelines.training.students.lora import (
        adapter_parameters,
        lora_target_names,
    )
    from featurecache.pipelines.training.students.pi0 import HFPi0

    if type(model).__name__ == "PI0ForConditionalGeneration":
        base, head = model, 0
        prefixes, full_train = HFPi0.lora_language_prefixes, HFPi0.lora_full_train
    else:
        base = model.model  # the student drops the LM head
        with torch.device("meta"):
            head = _count(action_head(model.config.text_config.hidden_size))
        prefixes, full_train = language_model_prefixes(base), ()
    total = _count(base) + head
    modules = dict(base.named_modules())
    in_full = sum(_count(modules[name]) for name in full_train)
    out = {"full": {"trainable": total, "total": total}}
    for targets in ("all-linear", "language-model"):
        names = lora_target_names(base, targets, language_prefixes=prefixes, full_train=full_train)
        adapters = adapter_parameters(base, names, rank)
        out[f"lora {targets}"] = {"trainable": adapters + head + in_full, "total": total + adapters}
    return out


def _projector_parameters(width: int) -> int:
    import torch

    from featurecache.pipelines.training.students.projector import (
        DEFAULT_PROJECTOR_HIDDEN,
        AlignmentProjector,
    )

    with torch.device("meta"):
        return _count(AlignmentProjector(width, TEACHER_DIM, DEFAULT_PROJECTOR_HIDDEN))


def run(json_path: str | None = None, quick: bool = False) -> list[Result]:
    """Count every architecture; print the table, write JSON, return the rows."""
    import torch

    rows: list[Result] = []
    for name, build in _architectures(quick).items():
        with torch.device("meta"):
            model = build()
        counts = student_counts(model)
        config = getattr(model.config, "vlm_config", model.config)
        projector = _projector_parameters(int(config.text_config.hidden_size))
        full = counts["full"]["trainable"]
        for mode, c in counts.items():
            rows.append(
                result(
                    name, f"{mode} r{RANK}" if mode != "full" else mode,
                    [c["trainable"] / 1e6], "M trainable", DEVICE,
                    total_m=round(c["total"] / 1e6, 1),
                    trainable_pct=round(100 * c["trainable"] / c["total"], 2),
                    vs_full_x=round(full / c["trainable"], 1),
                    projector_m=round(projector / 1e6, 1),
                )
            )  # fmt: skip
        del model
    table = report(rows, "LoRA vs full fine-tuning: trainable parameters", json_path)
    if not quick:
        note = (
            f"Counts, not timings: each student built from its transformers config on the meta "
            f"device. LoRA rank {RANK} (alpha min(r, 16)); all-linear = every linear layer of the "
            f"pretrained model (vision tower, connector, language model; as released), "
            f"language-model = the language model's (pi0: both Gemma stacks). Trainable under "
            f"LoRA: adapters + the 7-D action head (hf-vlm) or pi0's action/state/time "
            f"projections. projector_m: the paper's alignment projector for a {TEACHER_DIM}-wide "
            f"teacher (frozen by default; --train-projector adds it to the trainable count)."
        )
        record("lora", table, note)
    return rows


if __name__ == "__main__":
    harness.main(run, __doc__)
