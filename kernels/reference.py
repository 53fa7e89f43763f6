"""Pure torch reference of the cosine alignment loss: the oracle for tests and benchmarks.

    loss = weight * sum_i m_i * (1 - cos(s_i, t_i)) / max(sum_i m_i, 1)
    cos(s, t) = <s / max(|s|, eps), t / max(|t|, eps)>,   eps = EPS = 1e-12

Rows are the last dimension of `student` and `target`; `m_i` is the mask (1 for every row when
no mask is given). Each norm is clamped on its own, exactly as `torch.nn.functional.normalize`
does with its default eps (1e-12), so a zero row has cosine 0 (loss 1) instead of NaN.

Consequences of that clamp worth knowing:
- a zero *target* row gets loss 1 and contributes no gradient (mask it if it is padding);
- a zero *student* row gets the gradient autograd gives through F.normalize, -t_hat / eps,
  scaled by weight / count: finite in fp32 and bf16, but beyond fp16's range (it saturates to inf
  when stored as fp16). Student rows are projector outputs, which are never exactly zero.

Two entry points:
- `cosine_alignment_loss_reference`: autograd through plain torch ops (gradients flow to every
  input that requires them, target included). Slow and memory hungry; the oracle.
- `cosine_alignment_loss_and_grad_reference`: the same loss with the student gradient written in
  closed form (the kernel's maths in torch ops); the CPU implementation of the custom op.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

EPS = 1e-12  # the clamp on each row norm; F.normalize's default

_STUDENT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_TARGET_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.int8, torch.float64)


def check_inputs(student: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None) -> None:
    """Raise ValueError when the inputs break the loss's contract (shapes, dtypes, devices)."""
    if student.dtype not in _STUDENT_DTYPES:
        raise ValueError(
            f"Expected `student` of dtype float32, float16 or bfloat16, got {student.dtype}."
        )
    if target.dtype not in _TARGET_DTYPES:
        raise ValueError(
            f"Expected `target` of dtype float32, float16, bfloat16 or int8, got {target.dtype}."
        )
    if student.dim() == 0:
        raise ValueError("Expected `student` of shape (..., D) with D >= 1, got a 0-d tensor.")
    if target.shape != student.shape:
        raise ValueError(
            f"Expected `target` of the student's shape {tuple(student.shape)}, "
            f"got {tuple(target.shape)}."
        )
    if target.device != student.device:
        raise ValueError(
            f"Expected `target` on the student's device {student.device}, got {target.device}."
        )
    if mask is not None:
        if mask.shape != student.shape[:-1]:
            raise ValueError(
                f"Expected `mask` of shape {tuple(student.shape[:-1])} (one value per row), "
                f"got {tuple(mask.shape)}."
            )
        if mask.dtype != torch.bool and not mask.dtype.is_floating_point:
            raise ValueError(f"Expected `mask` of dtype bool or floating point, got {mask.dtype}.")
        if mask.device != student.device:
            raise ValueError(
                f"Expected `mask` on the student's device {student.device}, got {mask.device}."
            )


def _acc_dtype(student: torch.Tensor) -> torch.dtype:
    """fp32 for fp32/fp16/bf16 students, fp64 for fp64 (used by gradcheck)."""
    return torch.float64 if student.dtype == torch.float64 else torch.float32


def _row_weights(
    student: torch.Tensor, mask: torch.Tensor | None, acc: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """(m: (...) per-row weights in `acc`, count: 0-d max(sum m, 1)), computed on the device."""
    if mask is None:
        m = torch.ones(student.shape[:-1], dtype=acc, device=student.device)
    else:
        m = mask.detach().to(acc)
    return m, m.sum().clamp_min(1.0)


def cosine_alignment_loss_reference(
    student: torch.Tensor,
    target: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    weight: float = 1.0,
) -> torch.Tensor:
    """The cosine alignment loss in plain torch ops, differentiable through autograd.

    student: (..., D) float32/float16/bfloat16 (float64 accepted for checks).
    target: (..., D), same shape; float32/float16/bfloat16, or int8 (a per-row scale cancels in
        the cosine, so quantized rows are used as they are).
    mask: optional (...) bool, or float weights per row; treated as a constant.
    weight: the loss weight (lambda).
    Returns a 0-d tensor, float32 (float64 for float64 students).
    """
    check_inputs(student, target, mask)
    acc = _acc_dtype(student)
    s_hat = F.normalize(student.to(acc), dim=-1, eps=EPS)  # (..., D)
    t_hat = F.normalize(target.to(acc), dim=-1, eps=EPS)  # (..., D)
    cos = (s_hat * t_hat).sum(-1)  # (...)
    m, count = _row_weights(student, mask, acc)
    return weight * (m * (1.0 - cos)).sum() / count


def cosine_alignment_loss_and_grad_reference(
    student: torch.Tensor,
    target: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    weight: float = 1.0,
    needs_grad: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The loss and d loss / d student in closed form, without autograd.

    d/ds_i [1 - cos] = -t_i / (|s_i|' |t_i|') + [|s_i| >= eps] cos_i s_i / |s_i|'^2,
    with |x|' = max(|x|, eps); scaled by weight * m_i / max(sum m, 1).
    Returns (loss: 0-d float32 (float64 for float64 students), grad: the student's shape and
    dtype, or None when `needs_grad` is False).
    """
    check_inputs(student, target, mask)
    acc = _acc_dtype(student)
    s = student.to(acc)  # (..., D)
    t = target.to(acc)  # (..., D)
    s_norm = torch.linalg.vector_norm(s, dim=-1)  # (...)
    sn = s_norm.clamp_min(EPS)
    tn = torch.linalg.vector_norm(t, dim=-1).clamp_min(EPS)
    cos = (s * t).sum(-1) / (sn * tn)  # (...)
    m, count = _row_weights(student, mask, acc)
    scale = weight / count  # 0-d, on the device: no host sync
    loss = (m * (1.0 - cos)).sum() * scale
    if not needs_grad:
        return loss, None
    a = -(scale * m) / (sn * tn)  # coefficient of t_i
    b = torch.where(s_norm >= EPS, scale * m * cos / (sn * sn), torch.zeros_like(cos))
    grad = a.unsqueeze(-1) * t + b.unsqueeze(-1) * s
    return loss, grad.to(student.dtype)
