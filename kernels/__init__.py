"""Fused cosine-alignment loss: Triton kernel, torch reference, autograd op."""
