"""The `featurecache` command line: a thin layer of click commands over the Python API."""

from featurecache.cli.main import main

__all__ = ["main"]
