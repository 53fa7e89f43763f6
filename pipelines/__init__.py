"""Pipelines: frames in, teachers, the Ray precompute job, the training stream and loop."""
