"""`featurecache inspect` and `featurecache verify`: look at a cache, check it end to end."""

from __future__ import annotations

import json
import sys

import click

from featurecache.region import FrameRegion


def _mib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:.1f} MiB"


def _ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x"


@click.command("inspect")
@click.argument("cache")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
def inspect_cmd(cache: str, as_json: bool) -> None:
    """Show a cache's spec, rows, layers, codec, blocks done, size on disk and compression.

    CACHE: a folder, or s3://BUCKET/PATH, gs://BUCKET/PATH."""
    from featurecache.audit import inspect_cache

    info = inspect_cache(cache)
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    click.echo(f"cache         {info['path']} (format v{info['format_version']})")
    click.echo(
        f"codec         {info['codec']}   shard_rows {info['shard_rows']}   compressor "
        f"{info['compressor']}"
    )
    click.echo(
        f"rows          {info['rows_written']} written of {info['rows']} "
        f"({info['skipped']} skipped frames)"
    )
    click.echo(f"blocks        {info['blocks_done']}/{info['blocks_total']} done")
    if info["views"] > 1:
        augment = info["augment"]
        click.echo(
            f"views         {info['views']} per row (0 = the frame; --augment "
            f"{' '.join(augment.get('given', [])) or augment['terms']}, seed {augment['seed']}; "
            f"{_mib(info['disk_bytes_per_extra_view'])} per extra view)"
        )
    click.echo(f"on disk       {_mib(info['size_on_disk_bytes'])}")
    click.echo(f"compression   {_ratio(info['compression_ratio'])} (decoded / on disk)")
    click.echo(f"fingerprint   {json.dumps(info['fingerprint'], sort_keys=True)}")
    for camera, region in info["frame_regions"].items():
        seen = FrameRegion.from_json(region)
        whole = "the whole frame" if seen.whole else "a part of the frame"
        name = f"region {camera}" if camera else "region"
        click.echo(f"{name:<13} {whole}: {seen.describe()}")
    for layer in info["layers"]:
        grid = "x".join(map(str, layer["grid"])) if layer["grid"] else "-"
        click.echo(
            f"layer {layer['name']:<8} tokens {layer['tokens']} (grid {grid}) dim {layer['dim']}  "
            f"{_mib(layer['disk_bytes'])} on disk, {_ratio(layer['compression_ratio'])}, "
            f"{_ratio(layer['ratio_vs_fp16'])} vs fp16"
        )


@click.command()
@click.argument("cache")
@click.option(
    "--frames",
    multiple=True,
    help="Frame shards whose every key must be in the cache (or recorded as skipped): a tar, a "
    "folder, a quoted glob or brace pattern (d/frames-{000000..000009}.tar), local or s3://, "
    "gs://; repeatable.",
)
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
def verify(cache: str, frames: tuple[str, ...], as_json: bool) -> None:
    """Check every done block: readable, checksums match, finite values, unique keys.

    CACHE: a folder, or s3://BUCKET/PATH, gs://BUCKET/PATH. Exit status 0 only when every check
    holds."""
    from featurecache.audit import verify_cache

    report = verify_cache(cache, frames=list(frames) or None)
    if as_json:
        click.echo(json.dumps(report.to_json(), indent=2))
    else:
        for problem in report.problems:
            click.echo(f"PROBLEM {problem}")
        status = "OK" if report.ok else f"FAILED ({len(report.problems)} problem(s))"
        click.echo(
            f"{status}: {report.blocks_checked} done block(s), {report.rows_checked} rows"
            + (f", {report.frames_checked} frames" if frames else "")
            + f" checked in {cache}"
        )
    if not report.ok:
        sys.exit(1)
