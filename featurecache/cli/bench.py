"""`featurecache bench`: run the benchmark scripts of benchmarks/ and record their figures.

Each benchmark is the module `featurecache.benchmarks.<name>` with `run(json_path=None,
quick=False) -> list[Result]`; it is imported only when asked for (they import torch, ray, ...).
"""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType

import click

BENCHMARKS = (
    "kernel", "cache", "build", "ceiling", "gpu_build", "writer", "train", "manifest", "views",
    "augment",
)  # fmt: skip


class MissingBenchmark(LookupError):
    """The module `featurecache.benchmarks.<name>` does not exist (yet)."""


def load_benchmark(name: str) -> ModuleType:
    """Import `featurecache.benchmarks.<name>`; MissingBenchmark if that module is not there
    (an ImportError raised *inside* an existing benchmark is not hidden)."""
    module_name = f"featurecache.benchmarks.{name}"
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name in (module_name, "featurecache.benchmarks"):
            message = f"{module_name} does not exist (no benchmarks/{name}.py)"
            raise MissingBenchmark(message) from err
        raise


@click.command()
@click.argument("what", type=click.Choice([*BENCHMARKS, "all"]))
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Write results as JSON.")
@click.option("--quick", is_flag=True, help="Tiny sizes (tests, CI); RESULTS.md is not updated.")
def bench(what: str, json_path: str | None, quick: bool) -> None:
    """Measure the kernel, the cache, the build or training; print a table and write JSON.

    Full runs (without --quick) also record their table in benchmarks/RESULTS.md. `all` runs
    every benchmark in turn, prints one summary table and writes one JSON file; a benchmark that
    is missing or fails is reported and the others still run.
    """
    if json_path:  # a missing folder is made now: never fail after the work
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
    if what != "all":
        module = load_benchmark(what)
        module.run(json_path=json_path, quick=quick)
        return

    from featurecache.benchmarks import harness

    rows: list[harness.Result] = []
    status: dict[str, str] = {}
    for name in BENCHMARKS:
        try:
            module = load_benchmark(name)
        except MissingBenchmark as err:
            status[name] = f"missing, not run: {err}"
            click.echo(f"bench {name}: {status[name]}", err=True)
            continue
        click.echo(f"\n== bench {name} ==")
        try:
            got = module.run(json_path=None, quick=quick)
        except Exception as err:  # report and go on with the next benchmark
            status[name] = f"failed: {type(err).__name__}: {err}"
            click.echo(f"bench {name}: {status[name]}", err=True)
            continue
        rows += got
        status[name] = f"ok ({len(got)} rows)"
    click.echo("")
    harness.report(rows, "featurecache bench all", json_path)
    click.echo("")
    for name, line in status.items():
        click.echo(f"{name:>7}: {line}")
    failed = [name for name, line in status.items() if line.startswith("failed")]
    if failed:
        raise click.ClickException(f"benchmark(s) failed: {', '.join(failed)}")
