"""Shared fixtures of the pipelines tests (owned by the build area; the training tests reuse them).

- `sample_data_dir`: a train split of 48 frames (4 episodes of 12), 64x64 px, in 3 shards of 16.
- `sample_splits`: {split: folder} for all four splits, 24 frames each, 64x64 px, shards of 12.
- `tiny_vit_path`: a tiny random ViT (transformers) with its image processor, saved to a folder.
- `tiny_llava_path`: a tiny random LLaVA (ViT-less CLIP vision tower + Llama) with a WordLevel
  tokenizer and processor, saved to a folder.
- `ray_temp_dir`: a short temp dir for `ray.init(_temp_dir=...)` (Unix socket paths are short).
All are session-scoped and built once; treat them as read-only.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from featurecache.pipelines.sample_data import SPLITS, write_sample_data


@pytest.fixture(scope="session")
def sample_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A train split: 48 frames (4 episodes x 12), 64x64 px, shards frames-00000{0,1,2}.tar."""
    out = tmp_path_factory.mktemp("sample") / "train"
    write_sample_data(out, frames=48, shard_size=16, image_size=64, seed=0, split="train")
    return out


@pytest.fixture(scope="session")
def sample_splits(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """All four splits, 24 frames each (2 episodes), 64x64 px, 2 shards of 12 per split."""
    root = tmp_path_factory.mktemp("splits")
    out = {}
    for split in SPLITS:
        out[split] = root / split
        write_sample_data(out[split], frames=24, shard_size=12, image_size=64, split=split)
    return out


@pytest.fixture()
def ray_temp_dir() -> Iterator[str]:
    """A short, private temp dir for one test's Ray session (removed afterwards)."""
    path = tempfile.mkdtemp(prefix="fcray", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)
