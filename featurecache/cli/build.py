"""`featurecache sample-data` and `featurecache build`: frames in, a feature cache out."""

from __future__ import annotations

import click


@click.command("sample-data")
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--frames", type=int, required=True, help="Number of frames to render.")
@click.option("--shard-size", type=int, required=True, help="Frames per WebDataset tar shard.")
@click.option("--image-size", type=int, default=224, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--split",
    type=click.Choice(["train", "ood-vision", "ood-semantic", "ood-execution"]),
    default="train",
    show_default=True,
)
def sample_data(
    out: str, frames: int, shard_size: int, image_size: int, seed: int, split: str
) -> None:
    """Render procedural robot episodes into WebDataset tar shards."""
    raise click.ClickException("`sample-data` is not built yet (issue: build a feature cache).")


@click.command()
@click.argument("frames", nargs=-1, required=True)
def build(frames: tuple[str, ...]) -> None:
    """Run a frozen teacher once over every frame and write a feature cache (Ray job)."""
    raise click.ClickException("`build` is not built yet (issue: build a feature cache).")
