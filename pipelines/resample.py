"""Resampling of a token grid: the one function both wings use, `--grid` at build time (a teacher's
features resized before they are cached) and `--resample` at train time (cached targets resized
to the student's visual grid), so a cache built at a grid and a run resampled to it agree.

The filter is the separable triangle (bilinear) filter with pixel centres at (i + 0.5) (torch's
`align_corners=False`), widened by the scale factor when shrinking (antialiasing: every input
token contributes, rather than the four nearest to each output centre) and plain bilinear when
enlarging. It is what PIL's `Image.resize(..., BILINEAR)` computes, per axis: each output index i
of a side n -> m sits at c = (i + 0.5) * n / m - 0.5 in input coordinates, support s = max(1, n/m),
weights max(0, 1 - |j - c| / s) over in-range j, normalized to sum to 1.
"""

from __future__ import annotations

import torch

__all__ = ["filter_weights", "resample_tokens"]


def resample_tokens(
    tokens: torch.Tensor, grid: tuple[int, int], out: tuple[int, int]
) -> torch.Tensor:
    """Resample a token grid (see the module docstring for the filter).

    tokens: (B, h*w, D), any float dtype, laid out row-major on `grid` (h, w).
    Returns (B, H*W, D) float32 on `out` (H, W); `tokens` itself when grid == out.
    Differentiable in `tokens`.
    """
    if tuple(grid) == tuple(out):
        return tokens
    b, t, d = tokens.shape
    h, w = grid
    assert t == h * w, (t, grid)  # callers check grids against their specs before this
    rows = filter_weights(h, out[0], device=tokens.device)  # (H, h)
    cols = filter_weights(w, out[1], device=tokens.device)  # (W, w)
    maps = tokens.float().reshape(b, h, w, d)  # (B, h, w, D)
    maps = torch.einsum("ih,bhwd,jw->bijd", rows, maps, cols)  # (B, H, W, D)
    return maps.reshape(b, out[0] * out[1], d)


def filter_weights(n: int, m: int, *, device: torch.device | str = "cpu") -> torch.Tensor:
    """(m, n) float32: row i holds the weights of the n input tokens for output i of a side n -> m
    (triangle filter, support max(1, n/m), centre (i + 0.5) * n/m - 0.5, rows sum to 1).

    Written out rather than torch's `interpolate(..., antialias=True)`: in torch 2.13 that returns
    wrong values when the output is one token wide and the height changes (e.g. 5x3 -> 2x1 gives
    the first row twice), which the tests against PIL caught.
    """
    scale = n / m
    centre = (torch.arange(m, dtype=torch.float64) + 0.5) * scale - 0.5  # (m,)
    dist = (torch.arange(n, dtype=torch.float64)[None, :] - centre[:, None]).abs()  # (m, n)
    weights = (1.0 - dist / max(1.0, scale)).clamp_min(0.0)
    return (weights / weights.sum(dim=1, keepdim=True)).to(device, torch.float32)
