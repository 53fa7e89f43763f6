"""The `featurecache` click group. Each command lives in the module of its area and imports its
heavy dependencies (torch, ray, transformers) lazily, so `featurecache --help` stays instant."""

from __future__ import annotations

import click

from featurecache.cli.bench import bench
from featurecache.cli.build import build, sample_data
from featurecache.cli.cache import inspect_cmd, verify
from featurecache.cli.demo import demo
from featurecache.cli.train import evaluate, train


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="featurecache")
def main() -> None:
    """Run a frozen teacher once over every frame, cache its features in Zarr v3, and train
    vision-language-action policies against the cache with a fused cosine-alignment loss.

    \b
    Typical session:
      featurecache sample-data data/train --frames 512 --shard-size 128
      featurecache build data/train --teacher efficientnet-lite0 --layers 4 --out cache.zarr
      featurecache inspect cache.zarr
      featurecache train data/train --cache cache.zarr --student tiny-vla --out runs/aligned
      featurecache evaluate runs/aligned data/ood-vision
    """


main.add_command(sample_data)
main.add_command(build)
main.add_command(inspect_cmd)
main.add_command(verify)
main.add_command(train)
main.add_command(evaluate)
main.add_command(bench)
main.add_command(demo)
