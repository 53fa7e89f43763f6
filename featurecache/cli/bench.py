"""`featurecache bench`: run the benchmark scripts of benchmarks/ and record their figures."""

from __future__ import annotations

import click


@click.command()
@click.argument("what", type=click.Choice(["kernel", "cache", "build", "train", "all"]))
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Write results as JSON.")
def bench(what: str, json_path: str | None) -> None:
    """Measure the kernel, the cache, the build or training; print a table and write JSON."""
    raise click.ClickException("`bench` is not built yet.")
