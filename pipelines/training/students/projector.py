"""The alignment projector of Visual Representation Alignment (PAPER.md).

It maps the student's visual tokens at the aligned layer (width = the student's hidden size) to
the teacher's width, where the cosine alignment loss compares them with the teacher's tokens:

    LayerNorm(d_student) -> Linear(d_student, h) -> SiLU -> Dropout(p)
                         -> Linear(h, h)         -> SiLU -> Dropout(p)
                         -> Linear(h, d_teacher)

The released code (BlindVLA) keeps it frozen at its random init; REPA, which the method builds
on, trains it. Both are offered: frozen by default (`trainable=False`), with a seeded init so a
frozen projector is the same function in every run with the same seed.
"""

from __future__ import annotations

import torch
from torch import nn

from featurecache.errors import OptionError

DEFAULT_PROJECTOR_HIDDEN = 2048  # the paper's hidden width (OpenVLA-7B -> C-RADIOv3-L)
DEFAULT_PROJECTOR_DROPOUT = 0.1
# what sets each width, for the error message of an impossible one
_WIDTH_SOURCE = {
    "in_dim": "the student's hidden size (AlignmentHead student_dim=)",
    "out_dim": "the teacher layer's token width",
    "hidden": "AlignmentHead hidden= / train --projector-hidden",
}


class AlignmentProjector(nn.Module):
    """LayerNorm -> Linear -> SiLU -> Dropout -> Linear -> SiLU -> Dropout -> Linear.

    Input (..., in_dim) float; output (..., out_dim) in the same dtype. `in_dim` is the student's
    hidden size at the aligned layer, `out_dim` the teacher's token width.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        hidden: int = DEFAULT_PROJECTOR_HIDDEN,
        dropout: float = DEFAULT_PROJECTOR_DROPOUT,
    ) -> None:
        super().__init__()
        for name, value in (("in_dim", in_dim), ("out_dim", out_dim), ("hidden", hidden)):
            if value < 1:
                raise OptionError(
                    f"Expected the alignment projector's {name} >= 1, got {value} (from "
                    f"{_WIDTH_SOURCE[name]})."
                )
        if not 0.0 <= dropout < 1.0:
            raise OptionError(
                f"Expected the alignment projector's dropout in [0, 1), got {dropout}."
            )
        self.in_dim, self.out_dim, self.hidden, self.dropout = in_dim, out_dim, hidden, dropout
        self.net = nn.Sequential(
            nn.LayerNorm(in_dim),
            nn.Linear(in_dim, hidden),
            nn.SiLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, hidden),
            nn.SiLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, out_dim),
        )

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B, T, in_dim) -> (B, T, out_dim)."""
        return self.net(tokens)

    def extra_repr(self) -> str:
        return f"in_dim={self.in_dim}, hidden={self.hidden}, out_dim={self.out_dim}"


def build_projector(
    in_dim: int,
    out_dim: int,
    *,
    hidden: int = DEFAULT_PROJECTOR_HIDDEN,
    dropout: float = DEFAULT_PROJECTOR_DROPOUT,
    seed: int = 0,
    trainable: bool = False,
) -> AlignmentProjector:
    """A projector initialised from its own generator seeded with `seed` (independent of the
    global RNG, so the student's init does not shift it); frozen unless `trainable`.

    A frozen projector still applies dropout in train mode, as in the released code.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        projector = AlignmentProjector(in_dim, out_dim, hidden=hidden, dropout=dropout)
    projector.requires_grad_(trainable)
    return projector
