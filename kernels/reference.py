"""Pure torch reference of the cosine alignment loss: the oracle for tests and benchmarks.

    loss = weight * sum_i m_i * (1 - cos(s_i, c * t_i)) / max(sum_i m_i, 1)
    cos(s, t) = <s / max(|s|, eps), t / max(|t|, eps)>,   eps = EPS = 1e-12

Rows are the last dimension of `student` and `target`; `m_i` is the mask (1 for every row when
no mask is given); `c` is the optional per-channel scale (D,) of an int8c target (1 without one):
the target row the loss sees is `c * t_i`, elementwise. Each norm is clamped on its own, exactly
as `torch.nn.functional.normalize` does with its default eps (1e-12), so a zero row has cosine 0
(loss 1) instead of NaN.

Gradients, and the rows where the clamp is active:
- a student row with |s_i| >= eps gets the exact gradient of the loss above;
- a student row with |s_i| < eps (a zero row: a zero-initialised projector output, padding
  without a mask) gets a gradient of exactly zero, in every dtype and every implementation. The
  clamped function's own derivative there is -c_i t_hat / eps (about 1e12 * weight / rows), which
  overflows fp16 to inf and poisons a whole step; zero is the defined value instead. Its loss
  term is still counted (loss ~1). Consequence: a projector whose output layer starts at exactly
  zero gets no alignment gradient through it; initialise it with non-zero weights;
- a zero *target* row gets loss 1 and contributes no gradient (mask it if it is padding);
- the gradient is stored in the student's dtype saturated to its finite range (only fp16 can get
  there: a row with |s_i| below about weight / (rows * 65504)); inf never comes out of the loss.
  The backward's multiplication by grad_output follows torch's usual rules (a GradScaler's scale
  may overflow fp16 there, which is how it detects overflow).
Sums are accumulated in fp32 (fp64 for fp64 students): rows with |s| or |t| beyond ~1e19 in fp32
overflow the sum of squares.

Two entry points:
- `cosine_alignment_loss_reference`: autograd through plain torch ops (gradients flow to every
  input that requires them: target and channel scale included; student rows with |s| < eps are
  detached). Slow and memory hungry; the oracle.
- `cosine_alignment_loss_and_grad_reference`: the same loss with the student gradient written in
  closed form (the kernel's maths in torch ops); the CPU implementation of the custom op.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

EPS = 1e-12  # the clamp on each row norm; F.normalize's default

_STUDENT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_TARGET_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.int8, torch.float64)
# dS is stored saturated to these finite ranges (fp32/fp64 cannot overflow from the maths above)
SATURATE: dict[torch.dtype, float] = {
    torch.float16: torch.finfo(torch.float16).max,
    torch.bfloat16: torch.finfo(torch.bfloat16).max,
}


def check_inputs(
    student: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor | None,
    channel_scale: torch.Tensor | None = None,
) -> None:
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
    if channel_scale is not None:
        d = student.shape[-1]
        if channel_scale.shape != (d,) or not channel_scale.dtype.is_floating_point:
            raise ValueError(
                f"Expected `channel_scale` of shape ({d},) and a float dtype (the int8c cache's "
                f"per-channel scale of this layer), got {channel_scale.dtype} "
                f"{tuple(channel_scale.shape)}."
            )
        if channel_scale.device != student.device:
            raise ValueError(
                f"Expected `channel_scale` on the student's device {student.device}, got "
                f"{channel_scale.device}."
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


def _scaled_target(
    target: torch.Tensor, channel_scale: torch.Tensor | None, acc: torch.dtype
) -> torch.Tensor:
    """The target rows the loss compares with: target * channel_scale (..., D), in `acc`."""
    t = target.to(acc)
    return t if channel_scale is None else t * channel_scale.to(acc)


def cosine_alignment_loss_reference(
    student: torch.Tensor,
    target: torch.Tensor,
    *,
    channel_scale: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    weight: float = 1.0,
) -> torch.Tensor:
    """The cosine alignment loss in plain torch ops, differentiable through autograd.

    student: (..., D) float32/float16/bfloat16 (float64 accepted for checks).
    target: (..., D), same shape; float32/float16/bfloat16, or int8 (a per-row scale cancels in
        the cosine, so quantized rows are used as they are).
    channel_scale: optional (D,) float: the target row is `channel_scale * target` (int8c).
    mask: optional (...) bool, or float weights per row; treated as a constant.
    weight: the loss weight (lambda).
    Returns a 0-d tensor, float32 (float64 for float64 students). Student rows with |s| < eps get
    a zero gradient (module docstring).
    """
    check_inputs(student, target, mask, channel_scale)
    acc = _acc_dtype(student)
    small = torch.linalg.vector_norm(student.detach().to(acc), dim=-1, keepdim=True) < EPS
    s = torch.where(small, student.detach(), student)  # (..., D): no gradient below eps
    s_hat = F.normalize(s.to(acc), dim=-1, eps=EPS)  # (..., D)
    t_hat = F.normalize(_scaled_target(target, channel_scale, acc), dim=-1, eps=EPS)
    cos = (s_hat * t_hat).sum(-1)  # (...)
    m, count = _row_weights(student, mask, acc)
    return weight * (m * (1.0 - cos)).sum() / count


def cosine_alignment_loss_and_grad_reference(
    student: torch.Tensor,
    target: torch.Tensor,
    *,
    channel_scale: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    weight: float = 1.0,
    needs_grad: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The loss and d loss / d student in closed form, without autograd.

    With t_i the (channel-scaled) target row and |x|' = max(|x|, eps):
    d/ds_i [1 - cos] = [|s_i| >= eps] (-t_i / (|s_i|' |t_i|') + cos_i s_i / |s_i|'^2),
    scaled by weight * m_i / max(sum m, 1), saturated to the student dtype's finite range.
    Returns (loss: 0-d float32 (float64 for float64 students), grad: the student's shape and
    dtype, or None when `needs_grad` is False).
    """
    check_inputs(student, target, mask, channel_scale)
    acc = _acc_dtype(student)
    s = student.to(acc)  # (..., D)
    t = _scaled_target(target, channel_scale, acc)  # (..., D)
    s_norm = torch.linalg.vector_norm(s, dim=-1)  # (...)
    sn = s_norm.clamp_min(EPS)
    tn = torch.linalg.vector_norm(t, dim=-1).clamp_min(EPS)
    cos = (s * t).sum(-1) / (sn * tn)  # (...)
    m, count = _row_weights(student, mask, acc)
    scale = weight / count  # 0-d, on the device: no host sync
    loss = (m * (1.0 - cos)).sum() * scale
    if not needs_grad:
        return loss, None
    c = torch.where(s_norm >= EPS, scale * m, torch.zeros_like(m))  # (...) zero below eps
    a = -c / (sn * tn)  # coefficient of t_i
    b = c * cos / (sn * sn)  # coefficient of s_i
    grad = a.unsqueeze(-1) * t + b.unsqueeze(-1) * s
    if student.dtype in SATURATE:
        limit = SATURATE[student.dtype]
        grad = grad.clamp(-limit, limit)
    return loss, grad.to(student.dtype)
