"""Frozen teachers: one loader per spec (`hf:`, `hf-vlm:`, `efficientnet-lite0`)."""
