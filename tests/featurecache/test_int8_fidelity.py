"""int8 and int8c fidelity on realistic features, through a real cache (write, read back).

Oracle: the analytic per-token bound. Elementwise |x_d - x_hat_d| <= scale * c_d / 2 with
scale = max_d |x_d / c_d| / 127 (c = 1 for int8), so
||x - x_hat||^2 <= scale^2 * sum_d c_d^2 / 4 and cos(x, x_hat) >= sqrt(1 - that / ||x||^2) for
every token. Measured targets: mean cosine >= 0.9999, worst token >= 0.999.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import featurecache as fc


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    return (a64 * b64).sum(-1) / np.linalg.norm(a64, axis=-1) / np.linalg.norm(b64, axis=-1)


def massive(n: int, tokens: int, dim: int, seed: int) -> np.ndarray:
    """ViT-like features with 2 channels at 100x in every token and 1 token in 16 at 10x norm."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, tokens, dim)).astype(np.float32)
    x *= rng.uniform(0.5, 2.0, (n, tokens, 1)).astype(np.float32)
    x[..., rng.choice(dim, max(1, dim // 64), replace=False)] *= 4.0
    x[..., rng.choice(dim, 2, replace=False)] *= 100.0
    x[:, ::16] *= 10.0
    return x


def _roundtrip(path: Path, codec: str, x: np.ndarray, calibration: np.ndarray) -> tuple:
    n, tokens, dim = x.shape
    spec = fc.CacheSpec((fc.LayerSpec("l", tokens, dim),), codec, 16)
    scales = {"l": fc.calibrate_channel_scale(calibration)} if codec == "int8c" else None
    writer = fc.create_cache(path, spec, fc.plan_blocks([("a", n)], 16), channel_scales=scales)
    bw = writer.open_block(0)
    keys = [f"k{i}" for i in range(n)]
    bw.append(keys, {"l": x})
    writer.mark_done(bw.finish())
    cache = fc.open_cache(path)
    c = cache.channel_scale("l")
    return cache.read(keys, "l").numpy(), np.ones(dim) if c is None else c.astype(np.float64)


@pytest.mark.parametrize("codec", ["int8", "int8c"])
@pytest.mark.parametrize("kind", ["gaussian", "relu", "massive"])
def test_cosine_fidelity(tmp_path: Path, features, kind: str, codec: str) -> None:
    n, tokens, dim = 32, 49, 384
    make = massive if kind == "massive" else lambda *a, seed: features(*a, seed=seed, kind=kind)
    x = make(n, tokens, dim, seed=3)
    y, c = _roundtrip(tmp_path / "c.zarr", codec, x, x[:8])  # calibrated on the first frames
    cos = _cos(x, y)
    x64 = x.astype(np.float64)
    scale = np.abs(x64 / c).max(-1) / 127
    bound = np.sqrt(np.clip(1 - scale**2 * (c**2).sum() / 4 / (x64**2).sum(-1), 0, 1))
    assert (cos >= bound - 1e-7).all()
    if kind == "massive" and codec == "int8":  # the defect int8c fixes: int8 misses the target
        assert cos.mean() < 0.9999
        return
    assert cos.mean() >= 0.9999, cos.mean()
    assert cos.min() >= 0.999, cos.min()


@pytest.mark.parametrize("codec", ["int8", "int8c"])
def test_zero_and_tiny_tokens(tmp_path: Path, codec: str) -> None:
    x = np.zeros((2, 3, 8), np.float32)
    x[0, 1] = 1e-30  # denormal-range scale must not divide by zero
    x[1, 2] = np.linspace(-1, 1, 8)
    spec = fc.CacheSpec((fc.LayerSpec("l", 3, 8),), codec, 2)
    scales = {"l": np.ones(8, np.float32)} if codec == "int8c" else None
    writer = fc.create_cache(
        tmp_path / "c.zarr", spec, fc.plan_blocks([("a", 2)], 2), channel_scales=scales
    )
    bw = writer.open_block(0)
    bw.append(["a", "b"], {"l": x})
    writer.mark_done(bw.finish())
    cache = fc.open_cache(tmp_path / "c.zarr")
    q, s = cache.read_raw(["a", "b"], "l")
    assert s[0, 0] == 0 and (q[0, 0] == 0).all()  # all-zero token: scale 0, q 0
    assert np.isfinite(cache.read(["a", "b"], "l").numpy()).all()
    np.testing.assert_array_equal(q[1, 2].numpy(), np.rint(np.linspace(-127, 127, 8)))
