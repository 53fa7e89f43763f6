"""`featurecache train` and `featurecache evaluate`: fine-tune a VLA against cached targets."""

from __future__ import annotations

import click


@click.command()
@click.argument("frames", nargs=-1, required=True)
def train(frames: tuple[str, ...]) -> None:
    """Fine-tune a VLA student with visual representation alignment against a feature cache."""
    raise click.ClickException(
        "`train` is not built yet (issue: train without a resident teacher)."
    )


@click.command()
@click.argument("run", type=click.Path(exists=True, file_okay=False))
@click.argument("frames", nargs=-1, required=True)
def evaluate(run: str, frames: tuple[str, ...]) -> None:
    """Report a trained run's action error on frame shards (any split)."""
    raise click.ClickException(
        "`evaluate` is not built yet (issue: train without a resident teacher)."
    )
