"""The int8c codec: calibration, the writer's contract for channel scales, verify, versions.

Fidelity against the analytic bound is in test_int8_fidelity.py; plain zarr-python reading int8c
is in test_plain_zarr.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import zarr

import featurecache as fc
from featurecache.audit import verify_cache
from featurecache.codecs import CALIBRATION_ERROR_GOAL, dequantize_int8, quantize_int8
from featurecache.format import ATTRS_KEY, GROUP_METADATA

LAYER = fc.LayerSpec("l", 8, 32)


def _rel_error(x: np.ndarray, c: np.ndarray | None) -> float:
    q, s = quantize_int8(x, c)
    e = dequantize_int8(q, s, c).astype(np.float64) - x
    return float(((e**2).sum(-1) / (x.astype(np.float64) ** 2).sum(-1)).mean())


@pytest.mark.parametrize("kind", ["gaussian", "relu", "outlier"])
def test_calibration_never_worse_than_int8_on_its_sample(features, kind: str) -> None:
    """alpha = 0 (plain int8) is a candidate, so on the calibration sample int8c <= int8."""
    x = features(8, 49, 96, seed=5, kind=kind)
    c = fc.calibrate_channel_scale(x)
    assert c.shape == (96,) and c.dtype == np.float32
    assert np.isfinite(c).all() and c.min() == 1.0 and (c == 1.0).mean() >= 0.5
    assert _rel_error(x, c) <= _rel_error(x, None)
    np.testing.assert_array_equal(c, fc.calibrate_channel_scale(x))  # deterministic


def test_calibration_attenuates_massive_channels() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 64, 128)).astype(np.float32)
    x[..., [7, 90]] *= 100.0
    c = fc.calibrate_channel_scale(x)
    assert set(np.argsort(c)[-2:]) == {7, 90}  # the two largest scales
    assert _rel_error(x, None) > CALIBRATION_ERROR_GOAL  # int8 misses the goal here...
    assert _rel_error(x, c) <= CALIBRATION_ERROR_GOAL  # ...the least equalisation meeting it


def test_calibration_keeps_int8_where_it_is_good_enough() -> None:
    """Equalising costs bytes: where plain int8 meets the goal on the sample, c = 1 (int8c then
    stores exactly int8's codes)."""
    x = np.random.default_rng(2).standard_normal((8, 49, 96)).astype(np.float32)
    assert _rel_error(x, None) <= CALIBRATION_ERROR_GOAL
    np.testing.assert_array_equal(fc.calibrate_channel_scale(x), np.ones(96))


def test_calibration_edge_cases() -> None:
    np.testing.assert_array_equal(fc.calibrate_channel_scale(np.zeros((3, 5, 7))), np.ones(7))
    sparse = np.zeros((2, 4, 16), np.float32)
    sparse[0, 0, 3] = 1.0  # most channels never fire: nothing to equalise
    np.testing.assert_array_equal(fc.calibrate_channel_scale(sparse), np.ones(16))
    bad = np.ones((2, 3, 4), np.float32)
    bad[1, 2, 0] = np.nan
    with pytest.raises(fc.InvalidFeaturesError, match="finite calibration features"):
        fc.calibrate_channel_scale(bad)


def test_quantize_roundtrip_formula() -> None:
    """x ~= q * scale * c, with q the int8 of x / c at the per-token absmax scale."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 5, 32)).astype(np.float32)
    c = rng.uniform(1, 8, 32).astype(np.float32)
    q, s = quantize_int8(x, c)
    y = x / c
    np.testing.assert_allclose(s, np.abs(y).max(-1) / 127, rtol=1e-6)
    assert np.abs(q).max() == 127
    err = np.abs(q * s[..., None] * c - x)
    assert (err <= s[..., None] * c / 2 * (1 + 1e-5)).all()


def _create(path: Path, codec: str = "int8c", **kw):
    spec = fc.CacheSpec((LAYER,), codec, 4)
    return fc.create_cache(path, spec, fc.plan_blocks([("a", 6), ("b", 3)], 4), **kw)


def _fill(writer, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((9, 8, 32)).astype(np.float32)
    for b, rows in ((0, range(6)), (1, range(6, 9))):
        bw = writer.open_block(b)
        bw.append([f"k{i}" for i in rows], {"l": x[list(rows)]})
        writer.mark_done(bw.finish())
    return x


@pytest.mark.parametrize(
    ("codec", "scales", "error", "match"),
    [
        ("int8c", None, fc.InvalidFeaturesError, "Expected channel_scales for every layer"),
        ("int8c", {"other": np.ones(32)}, fc.InvalidFeaturesError, "every layer"),
        ("int8c", {"l": np.ones(31)}, fc.InvalidFeaturesError, r"shape \(32,\)"),
        ("int8c", {"l": np.r_[np.ones(31), 0.0]}, fc.InvalidFeaturesError, "positive"),
        ("int8c", {"l": np.r_[np.ones(31), np.inf]}, fc.InvalidFeaturesError, "finite"),
        ("int8", {"l": np.ones(32)}, fc.SpecMismatchError, "only int8c"),
    ],
)
def test_channel_scale_errors(tmp_path: Path, codec, scales, error, match) -> None:
    with pytest.raises(error, match=match):
        _create(tmp_path / "c.zarr", codec, channel_scales=scales)
    assert not (tmp_path / "c.zarr").exists()


def test_resume_keeps_or_checks_the_stored_scales(tmp_path: Path) -> None:
    c = np.linspace(1, 4, 32, dtype=np.float32)
    path = tmp_path / "c.zarr"
    _create(path, channel_scales={"l": c})
    again = _create(path)  # resume: no scales needed
    assert again.spec.codec == "int8c"
    _create(path, channel_scales={"l": c.copy()})  # equal: fine
    with pytest.raises(fc.SpecMismatchError, match="channel scales of layer 'l'"):
        _create(path, channel_scales={"l": c * 2})
    x = _fill(again)
    cache = fc.open_cache(path)
    np.testing.assert_array_equal(cache.channel_scale("l"), c)
    q, s = cache.read_raw(cache.keys, "l")
    want = q.numpy().astype(np.float32) * s.numpy()[..., None] * c
    np.testing.assert_array_equal(cache.read(cache.keys, "l").numpy(), want)
    cos = (x * want).sum(-1) / np.linalg.norm(x, axis=-1) / np.linalg.norm(want, axis=-1)
    assert cos.min() > 0.999


def test_verify_checks_the_channel_scales(tmp_path: Path) -> None:
    path = tmp_path / "c.zarr"
    _fill(_create(path, channel_scales={"l": np.full(32, 2.0, np.float32)}))
    assert verify_cache(path).ok
    arr = zarr.open_array(str(path), path="channel_scales/l", mode="r+")
    arr[:] = np.full(32, 3.0, np.float32)  # valid values, but not the ones blocks were made with
    problems = verify_cache(path).problems
    assert [p.kind for p in problems] == ["checksum", "checksum"]
    arr[:] = np.r_[np.full(31, 2.0), -1.0].astype(np.float32)
    kinds = [p.kind for p in verify_cache(path).problems]
    assert "non-finite" in kinds
    with pytest.raises(fc.CorruptShardError, match="finite positive"):
        fc.open_cache(path).read(["k0"], "l")


def _set_version(path: Path, version: int) -> None:
    meta = json.loads((path / GROUP_METADATA).read_text())
    meta["attributes"][ATTRS_KEY]["version"] = version
    (path / GROUP_METADATA).write_text(json.dumps(meta))


def test_version_1_int8_cache_still_reads(tmp_path: Path) -> None:
    """A version-2 int8 cache relabelled 1 reads the same values (its checksums, which cover the
    version-2 digests, are another matter: the hardening tests own version-1 verification)."""
    path = tmp_path / "v1.zarr"
    x = _fill(_create(path, "int8"))
    before = fc.open_cache(path).read([f"k{i}" for i in range(9)], "l").numpy()
    _set_version(path, 1)
    cache = fc.open_cache(path)
    assert cache.manifest.version == 1 and cache.channel_scale("l") is None
    after = cache.read([f"k{i}" for i in range(9)], "l").numpy()
    np.testing.assert_array_equal(before, after)
    assert np.abs(after - x).max() < 0.05


def test_int8c_needs_version_2(tmp_path: Path) -> None:
    path = tmp_path / "c.zarr"
    _create(path, channel_scales={"l": np.ones(32)})
    _set_version(path, 1)
    with pytest.raises(fc.FormatVersionError, match="version >= 2 for codec 'int8c'"):
        fc.open_cache(path)
