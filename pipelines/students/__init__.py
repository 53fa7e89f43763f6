"""VLA students (`tiny-vla`, `hf-llava:`) and the alignment projector."""
