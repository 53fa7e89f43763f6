"""`featurecache demo`: the paper's experiment in miniature, end to end."""

from __future__ import annotations

import click


@click.command()
@click.argument("out", type=click.Path(file_okay=False), default="demo-out", required=False)
@click.option(
    "--full",
    is_flag=True,
    help="Larger data, longer runs and three seeds, reported as mean ± spread (about an hour).",
)
@click.option(
    "--steps", type=int, help="Training steps of each run (default 400; 1500 with --full)."
)
@click.option("--train-frames", type=int, help="Frames of the train split (default 1536).")
@click.option("--seeds", type=str, help="Comma-separated seeds, one plain+aligned pair each.")
def demo(
    out: str, full: bool, steps: int | None, train_frames: int | None, seeds: str | None
) -> None:
    """Run the paper's experiment in miniature, end to end, into OUT (default: demo-out).

    \b
    1. sample-data: train split plus the three OOD splits (vision, semantic, execution)
    2. build: an int8 cache of the real efficientnet-lite0 teacher, as a local Ray job
    3. train tiny-vla twice, same data and seed: --lambda 0 (plain) and --lambda 0.2 (aligned),
       with no teacher in memory
    4. evaluate both on every split; alignment cosine; linear probe for object identity
    5. write OUT/report.md (table, cache summary, timings) and OUT/losses.png

    About 10 minutes on 2 CPU cores at the default sizes.
    """
    from dataclasses import replace

    from featurecache.pipelines.demo.experiment import DemoConfig, run_demo

    config = DemoConfig.full(out) if full else DemoConfig(out=out)
    overrides: dict = {}
    if steps is not None:
        overrides["steps"] = steps
    if train_frames is not None:
        overrides["train_frames"] = train_frames
    if seeds is not None:
        try:
            overrides["seeds"] = tuple(int(s) for s in seeds.split(",") if s.strip())
        except ValueError:
            raise click.BadParameter(
                f"expected integers like 0,1,2, got {seeds!r}", param_hint="--seeds"
            ) from None
    run_demo(replace(config, **overrides))
