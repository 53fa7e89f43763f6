"""Shared oracle and tolerances of the kernel tests (imported by the test modules).

The oracle runs the autograd reference in fp64 on the same already-rounded inputs, so input
rounding is not an error source; the tolerance table below bounds what remains.
"""

from __future__ import annotations

import torch

from featurecache.kernels import cosine_alignment_loss, cosine_alignment_loss_reference
from featurecache.kernels import reference as ref_mod

# Student dtype -> tolerance on dS, relative to max |dS| (also used as rtol).
# dS is computed in fp32 and rounded once to the student dtype on store, so the error is the
# dtype's unit roundoff u (half an ulp) plus the fp32 accumulation over D (<= ~sqrt(D) * 6e-8
# typical, D * 6e-8 worst case = 2.4e-4 relative at D = 4097, far below the bf16/fp16 bounds).
#   fp32: u = 6e-8; 1e-5 leaves room for the fp32 accumulation over D = 4097.
#   fp16: u = 2^-11 = 4.9e-4; 1e-3 = 2u.
#   bf16: u = 2^-8 = 3.9e-3; 8e-3 = 2u.
GRAD_TOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}
# The loss is accumulated and returned in fp32 for every student dtype: only fp32 summation error
# over D (per-row cosine) and over rows (the mean); 1e-5 absolute on a loss of order 1.
LOSS_TOL = 1e-5

STUDENT_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TARGET_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.int8]


def make_target(shape: tuple[int, ...], dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    if dtype == torch.int8:
        return torch.randint(-127, 128, shape, dtype=torch.int8, generator=gen)
    return torch.randn(shape, generator=gen).to(dtype)


def oracle(student, target, mask=None, weight=1.0, grad_output=1.0, channel_scale=None):
    """(loss, dS, term) by autograd of the reference in fp64 on the same (rounded) inputs.

    `term` bounds the size of the two terms whose sum is dS (|c_i t_i / (|s_i| |t_i|)|, and the
    same for s_i): dS can cancel to ~0 (at D = 1 it is exactly 0), so errors are measured
    relative to the terms, not to the result. Rows with |s_i| < eps (gradient 0) add nothing."""
    s = student.detach().double().requires_grad_()
    m = None if mask is None else (mask if mask.dtype == torch.bool else mask.double())
    cs = None if channel_scale is None else channel_scale.double()
    loss = cosine_alignment_loss_reference(
        s, target.double(), channel_scale=cs, mask=m, weight=weight
    )
    loss.backward(torch.tensor(grad_output, dtype=torch.float64))
    rows = s.detach().reshape(-1, s.shape[-1])
    mw = torch.ones(rows.shape[0]) if m is None else m.reshape(-1).double()
    norm = torch.linalg.vector_norm(rows, dim=-1)
    inv_norm = torch.where(norm >= ref_mod.EPS, 1.0 / norm.clamp_min(ref_mod.EPS), 0.0)
    term = abs(weight * grad_output) * (mw.abs() * inv_norm).max() / mw.sum().clamp_min(1.0)
    return loss.detach(), s.grad, float(term) if rows.numel() else 0.0


def fused(student, target, mask=None, weight=1.0, grad_output=1.0, channel_scale=None):
    s = student.detach().clone().requires_grad_()
    loss = cosine_alignment_loss(s, target, channel_scale=channel_scale, mask=mask, weight=weight)
    loss.backward(torch.tensor(grad_output, dtype=loss.dtype))
    return loss.detach(), s.grad


def assert_close(loss, grad, want_loss, want_grad, term, dtype) -> None:
    assert loss.dtype == torch.float32
    assert grad.dtype == dtype
    assert not torch.isnan(loss) and not torch.isnan(grad).any()
    torch.testing.assert_close(loss.double(), want_loss, rtol=LOSS_TOL, atol=LOSS_TOL)
    tol = GRAD_TOL[dtype]
    scale = max(want_grad.abs().max().item(), term)
    torch.testing.assert_close(grad.double(), want_grad, rtol=tol, atol=tol * scale)


# Rows at the edges of the numeric range, per student dtype: exact zeros, 1e-20 (|s| < eps: zero
# in fp16 after rounding, tiny but non-zero in fp32/bf16), 2e-7 (above eps; with weight 20 over
# 12 rows its dS ~ 2e5 exceeds fp16's 65504 and saturates), 1e4 (|s|^2 ~ 1e9 overflows fp16 but
# not the fp32 accumulation).
EDGE_ROWS = {"zero": 0.0, "tiny": 1e-20, "small": 2e-7, "huge": 1e4}
