"""Fused cosine-alignment loss: Triton kernel, torch reference, autograd op."""

from featurecache.kernels.cosine_alignment import cosine_alignment_loss
from featurecache.kernels.reference import cosine_alignment_loss_reference

__all__ = ["cosine_alignment_loss", "cosine_alignment_loss_reference"]
