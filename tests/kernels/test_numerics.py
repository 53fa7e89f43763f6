"""Numerics of the fused loss: finite gradients at the edges of each dtype's range (zero rows,
1e-20, rows whose dS overflows fp16, 1e4 rows) and the int8c channel scale, on both CPU paths
(the `cpu_path` fixture), against fp64 autograd of the reference (tests/kernels/_oracle.py)."""

from __future__ import annotations

import pytest
import torch

from featurecache.kernels import cosine_alignment as ca
from featurecache.kernels import cosine_alignment_loss, cosine_alignment_loss_reference
from featurecache.kernels import reference as ref_mod

from ._oracle import (
    EDGE_ROWS,
    GRAD_TOL,
    LOSS_TOL,
    STUDENT_DTYPES,
    assert_close,
    fused,
    make_target,
    oracle,
)


@pytest.mark.parametrize("sdtype", STUDENT_DTYPES, ids=str)
def test_zero_vectors(cpu_path, sdtype) -> None:
    """Zero target rows: loss 1, no gradient. Zero student rows: loss 1, gradient exactly 0 (the
    defined value below eps), the other rows as the fp64 oracle. No NaN, no inf."""
    gen = torch.Generator().manual_seed(5)
    student = torch.randn(5, 16, generator=gen)
    target = torch.randn(5, 16, generator=gen)
    target[1] = 0.0
    student[2] = 0.0
    student[3] = 0.0
    target[3] = 0.0
    student, target = student.to(sdtype), target.to(sdtype)
    loss, grad = fused(student, target, weight=2.0)
    want_loss, want_grad, term = oracle(student, target, weight=2.0)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    torch.testing.assert_close(loss.double(), want_loss, rtol=LOSS_TOL, atol=LOSS_TOL)
    assert torch.count_nonzero(grad[1:4]) == 0 and torch.count_nonzero(want_grad[1:4]) == 0
    assert_close(loss, grad, want_loss, want_grad, term, sdtype)


@pytest.mark.parametrize("with_cscale", [False, True], ids=["plain", "channel-scale"])
@pytest.mark.parametrize("masked", [False, True], ids=["no-mask", "mask"])
@pytest.mark.parametrize("sdtype", STUDENT_DTYPES, ids=str)
def test_finite_gradients_at_range_edges(cpu_path, sdtype, masked, with_cscale) -> None:
    """Every edge row in one batch (one row of each kind, among ordinary rows), int8 targets:
    the gradient is finite everywhere, exactly 0 for rows below eps, the fp64 oracle elsewhere
    (saturated to the dtype's range where the exact value does not fit)."""
    gen = torch.Generator().manual_seed(16)
    student = torch.randn(2, 6, 40, generator=gen)
    for i, value in enumerate(EDGE_ROWS.values()):
        student[0, i] = torch.randn(40, generator=gen).sign() * value
    student = student.to(sdtype)
    target = torch.randint(-127, 128, (2, 6, 40), dtype=torch.int8, generator=gen)
    mask = torch.rand(2, 6, generator=gen) > 0.3 if masked else None
    if mask is not None:
        mask[0, :4] = True  # the edge rows count
    cscale = torch.rand(40, generator=gen) * 20 + 0.5 if with_cscale else None
    loss, grad = fused(student, target, mask, weight=20.0, channel_scale=cscale)
    want_loss, want_grad, _ = oracle(student, target, mask, weight=20.0, channel_scale=cscale)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    torch.testing.assert_close(loss.double(), want_loss, rtol=LOSS_TOL, atol=20 * LOSS_TOL)
    norms = torch.linalg.vector_norm(student.double(), dim=-1)
    below = norms < ref_mod.EPS
    assert below[0, :2].all() and not below[0, 2:].any()  # zero and 1e-20 rows are below eps
    assert torch.count_nonzero(grad[below]) == 0
    limit = ref_mod.SATURATE.get(sdtype, float("inf"))
    want = want_grad.clamp(-limit, limit)
    tol = GRAD_TOL[sdtype]
    for idx in torch.nonzero(~below).tolist():
        row, want_row = grad[tuple(idx)].double(), want[tuple(idx)]
        scale = want_row.abs().max().item()
        # fp16 stores the huge row's dS (~1e-6) as subnormals: absolute spacing 2**-24
        atol = tol * scale + (2.0**-24 if sdtype == torch.float16 else 0.0)
        torch.testing.assert_close(row, want_row, rtol=tol, atol=atol, msg=f"row {idx}")
    if sdtype == torch.float16:  # the 2e-7 row's exact dS is beyond fp16: it saturates
        assert want_grad[0, 2].abs().max() > limit and grad[0, 2].abs().max() == limit


@pytest.mark.parametrize("shape", [((33,), 64), ((3, 11), 1000), ((3,), 4097)], ids=str)
@pytest.mark.parametrize("tdtype", [torch.int8, torch.bfloat16], ids=str)
@pytest.mark.parametrize("sdtype", STUDENT_DTYPES, ids=str)
def test_channel_scale_matches_reference(cpu_path, sdtype, tdtype, shape) -> None:
    lead, d = shape
    gen = torch.Generator().manual_seed(d)
    student = torch.randn((*lead, d), generator=gen).to(sdtype)
    target = make_target((*lead, d), tdtype, gen)
    cscale = torch.rand(d, generator=gen) * 30 + 1  # int8c-like: >= 1, a few large
    mask = torch.rand(lead, generator=gen) > 0.25
    want = oracle(student, target, mask, weight=0.3, channel_scale=cscale)
    assert_close(*fused(student, target, mask, weight=0.3, channel_scale=cscale), *want, sdtype)


@pytest.mark.parametrize("sdtype", STUDENT_DTYPES, ids=str)
def test_channel_scale_wide_rows(monkeypatch, sdtype) -> None:
    """The channel scale in the two-pass D-tiled path (several tiles, a ragged last one)."""
    monkeypatch.setattr(ca, "_MAX_ONE_TILE_D", 256)
    gen = torch.Generator().manual_seed(17)
    student = torch.randn(5, 1000, generator=gen).to(sdtype)
    target = torch.randint(-127, 128, (5, 1000), dtype=torch.int8, generator=gen)
    cscale = torch.rand(1000, generator=gen).double() * 9 + 1  # fp64 vector: cast in the op
    got = fused(student, target, channel_scale=cscale)
    assert_close(*got, *oracle(student, target, channel_scale=cscale), sdtype)


def test_int8c_target_equals_dequantized(cpu_path) -> None:
    """int8 rows with a per-row scale and a channel scale give the loss of their dequantized
    fp32 rows (the per-row scale cancels, the channel scale is applied in the pass)."""
    gen = torch.Generator().manual_seed(18)
    student = torch.randn(2, 9, 200, generator=gen)
    values = torch.randint(-127, 128, (2, 9, 200), dtype=torch.int8, generator=gen)
    scales = torch.rand(2, 9, 1, generator=gen) * 0.1 + 1e-3
    cscale = torch.rand(200, generator=gen) * 50 + 1
    dequantized = values.float() * scales * cscale
    loss_q, grad_q = fused(student, values, weight=0.2, channel_scale=cscale)
    loss_f, grad_f = fused(student, dequantized, weight=0.2)
    torch.testing.assert_close(loss_q, loss_f, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad_q, grad_f, rtol=1e-5, atol=1e-5 * grad_f.abs().max().item())


@pytest.mark.parametrize(
    ("cscale", "message"),
    [
        (torch.ones(5), r"`channel_scale` of shape \(4,\)"),
        (torch.ones(1, 4), r"`channel_scale` of shape \(4,\)"),
        (torch.ones(4, dtype=torch.int32), "a float dtype"),
        (torch.ones(4, requires_grad=True), r"channel_scale\.requires_grad=True"),
    ],
)
def test_channel_scale_errors(cscale, message) -> None:
    with pytest.raises(ValueError, match=message):
        cosine_alignment_loss(torch.randn(2, 4), torch.randn(2, 4), channel_scale=cscale)


def test_gradcheck_reference_channel_scale() -> None:
    """The autograd reference differentiates the channel scale too (fp64 gradcheck)."""
    gen = torch.Generator().manual_seed(19)
    student = torch.randn(3, 7, dtype=torch.float64, generator=gen, requires_grad=True)
    target = torch.randn(3, 7, dtype=torch.float64, generator=gen)
    cscale = torch.rand(7, dtype=torch.float64, generator=gen).add(0.5).requires_grad_()
    f = lambda s, c: cosine_alignment_loss_reference(s, target, channel_scale=c, weight=0.3)
    assert torch.autograd.gradcheck(f, (student, cscale))
