"""Shared helpers of the cache-format tests, as fixtures (tests run in importlib mode).

- `features`: realistic teacher-like features, float32 (n, tokens, dim), deterministic by seed.
- `build_cache`: write a small cache (blocks of given sizes, every block done) and return
  (path, {key: {layer: float32 (tokens, dim)}}) with the original float32 features.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pytest

import featurecache as fc

LAYERS = (fc.LayerSpec("4", tokens=16, dim=64, grid=(4, 4)), fc.LayerSpec("blk.2", 5, 24))
FINGERPRINT = {"model": "test-teacher", "weights_sha256": "ab" * 32, "image_size": [64, 64]}


def realistic_features(
    n: int, tokens: int, dim: int, *, seed: int = 0, kind: str = "gaussian"
) -> np.ndarray:
    """float32 (n, tokens, dim). "gaussian": per-token mean and scale vary, a few outlier channels
    at 4x (ViT-like); "relu": post-ReLU (non-negative, ~half zeros); "outlier": 16x channels."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, tokens, dim)).astype(np.float32)
    x *= rng.uniform(0.5, 2.0, (n, tokens, 1)).astype(np.float32)
    x += rng.normal(0, 0.3, (1, 1, dim)).astype(np.float32)
    channels = rng.choice(dim, size=max(1, dim // 64), replace=False)
    factor = {"gaussian": 4.0, "relu": 4.0, "outlier": 16.0}[kind]
    x[..., channels] *= factor
    if kind == "relu":
        x = np.maximum(x, 0)
    return x


@pytest.fixture
def features() -> Callable[..., np.ndarray]:
    return realistic_features


def write_blocks(
    path: Path,
    sizes: Sequence[int],
    *,
    codec: str = "fp16",
    shard_rows: int = 8,
    batch: int = 5,
    seed: int = 0,
    layers: Sequence[fc.LayerSpec] = LAYERS,
) -> dict[str, dict[str, np.ndarray]]:
    spec = fc.CacheSpec(tuple(layers), codec, shard_rows, FINGERPRINT)
    plan = fc.plan_blocks([(f"frames-{i:06d}.tar", n) for i, n in enumerate(sizes)], shard_rows)
    channel_scales = None
    if codec == "int8c":  # calibrated on other features of the same distribution
        channel_scales = {
            layer.name: fc.calibrate_channel_scale(
                realistic_features(8, layer.tokens, layer.dim, seed=seed + 99)
            )
            for layer in layers
        }
    writer = fc.create_cache(path, spec, plan, channel_scales=channel_scales)
    data: dict[str, dict[str, np.ndarray]] = {}
    for b, n in enumerate(sizes):
        bw = writer.open_block(b)
        keys = [f"s{b:02d}-{i:04d}" for i in range(n)]
        for i in range(0, n, batch):
            ks = keys[i : i + batch]
            feats = {
                layer.name: realistic_features(
                    len(ks), layer.tokens, layer.dim, seed=seed * 7919 + b * 101 + i + j
                )
                for j, layer in enumerate(layers)
            }
            bw.append(ks, feats)
            for r, k in enumerate(ks):
                data[k] = {name: f[r] for name, f in feats.items()}
        writer.mark_done(bw.finish())
    return data


@pytest.fixture
def build_cache(
    tmp_path: Path,
) -> Callable[..., tuple[Path, dict[str, dict[str, np.ndarray]]]]:
    def build(sizes: Sequence[int] = (20, 5, 13), **kw: object):
        path = tmp_path / f"cache-{kw.get('codec', 'fp16')}.zarr"
        return path, write_blocks(path, sizes, **kw)  # type: ignore[arg-type]

    return build
