"""The build wing: frames in (importers), teachers, the block plan and the precompute job."""
