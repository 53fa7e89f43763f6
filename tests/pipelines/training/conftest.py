"""Fixtures of the training-wing tests.

- shards: the session's sample-data tar shards (tests/pipelines/conftest.py sample_data_dir) as
  a list of paths; a module that needs fewer defines its own `shards`.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from featurecache.samples import expand_frame_paths


@pytest.fixture(scope="session")
def shards(sample_data_dir: Path) -> list[Path]:
    return expand_frame_paths([str(sample_data_dir)])
