"""Where the teacher's tokens come from, and how they meet the student's.

A `TargetSpec` names the teacher layer the projector maps to (from an open cache or a resident
teacher); `check_targets_fit` refuses a layer whose token grid cannot meet the student's before
the first step; `batch_targets` gives one batch's targets shaped like the projected student
tokens, as stored where possible (int8, whose per-token scales cancel in the cosine, or fp16);
`alignment_loss` is the fused loss with lambda passed as its weight.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from featurecache.errors import ShapeMismatchError, UnknownLayerError
from featurecache.kernels import cosine_alignment_loss
from featurecache.pipelines.resample import resample_tokens
from featurecache.pipelines.training.stream import Batch
from featurecache.pipelines.training.students import Student


@dataclass(slots=True)
class TargetSpec:
    """The teacher layer the projector maps to: name, token count, width, grid (or None)."""

    layer: str
    tokens: int
    dim: int
    grid: tuple[int, int] | None
    fingerprint: dict[str, Any]


def cache_target_spec(cache: Any, layer: str | None) -> TargetSpec:
    """The layer of an open cache to align to (its only layer when `layer` is None)."""
    names = [spec.name for spec in cache.spec.layers]
    if layer is None:
        if len(names) != 1:
            raise UnknownLayerError(
                f"Expected --teacher-layer to pick one of the cache's layers {names}, got none."
            )
        layer = names[0]
    if layer not in names:
        raise UnknownLayerError(
            f"Expected --teacher-layer to be one of the cache's layers {names}, got {layer!r}."
        )
    spec = cache.spec.layer(layer)
    grid = tuple(spec.grid) if spec.grid else None
    return TargetSpec(layer, spec.tokens, spec.dim, grid, dict(cache.spec.fingerprint))


def teacher_target_spec(teacher: Any) -> TargetSpec:
    """The one layer a resident teacher was loaded with."""
    (spec,) = teacher.layer_specs()
    grid = tuple(spec.grid) if spec.grid else None
    return TargetSpec(spec.name, spec.tokens, spec.dim, grid, teacher.fingerprint())


def check_targets_fit(target: TargetSpec, student: Student, resample: bool) -> None:
    """Refuse (before the first step) a target layer whose tokens cannot meet the student's."""
    want = student.num_visual_tokens
    if target.tokens == want:
        return
    rows, cols = student.visual_grid
    if not resample:
        raise ShapeMismatchError(
            f"Expected teacher layer {target.layer!r} with {want} tokens (the student's "
            f"{rows}x{cols} visual grid), got {target.tokens} tokens (grid {target.grid}). "
            f"Pass --resample to resize the target grid bilinearly, or build the cache at an "
            f"image size that gives a {rows}x{cols} grid."
        )
    if target.grid is None or target.grid[0] * target.grid[1] != target.tokens:
        raise ShapeMismatchError(
            f"Expected teacher layer {target.layer!r} to have a token grid for --resample, got "
            f"grid {target.grid} for {target.tokens} tokens."
        )


def dequantize(values: torch.Tensor, scales: torch.Tensor | None) -> torch.Tensor:
    """Stored targets -> float32 (B, T, D): int8 * per-token scale (B, T), or fp16 upcast."""
    if scales is None:
        return values.float()
    return values.float() * scales.float().unsqueeze(-1)


def batch_targets(
    batch: Batch,
    teacher: Any,
    target: TargetSpec,
    student: Student,
    resample: bool,
    device: torch.device,
) -> torch.Tensor:
    """The batch's teacher tokens on `device`, shaped like the projected student tokens.

    Cached: as stored (int8, whose per-token scales cancel in the cosine, or fp16), unless the
    grid must be resampled (then dequantized to float32 first). Resident: the teacher's forward.
    """
    if teacher is not None:
        with torch.inference_mode():
            values = teacher(batch.images_pil)[target.layer]  # (B, T, D) float32
        values, scales = values.clone().to(device), None
    else:
        assert batch.target is not None
        values = batch.target.to(device, non_blocking=True)  # (B, T, D) int8 | float16
        scales = None if batch.scales is None else batch.scales.to(device)
    if target.tokens != student.num_visual_tokens and resample:
        assert target.grid is not None
        return resample_tokens(dequantize(values, scales), target.grid, student.visual_grid)
    return values


def alignment_loss(projected: torch.Tensor, goal: torch.Tensor, weight: float) -> torch.Tensor:
    """weight * (1 - cos), averaged over tokens: featurecache.kernels (Triton on GPU, torch on
    CPU). projected (B, T, D) float; goal (B, T, D) int8 | float16 | float32, as stored."""
    if goal.dtype != torch.int8 and goal.dtype != projected.dtype:
        goal = goal.to(projected.dtype)
    return cosine_alignment_loss(projected, goal, weight=weight)
