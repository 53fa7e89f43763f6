"""Round trips per codec against independent oracles (numpy casts and a per-token loop), plus the
reader's key index, shard grouping, LRU and pickling."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

import featurecache as fc


def _int8_oracle(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-token absmax int8, written out token by token (independent of featurecache.codecs)."""
    q = np.zeros(x.shape, np.int8)
    s = np.zeros(x.shape[:-1], np.float32)
    for idx in np.ndindex(*x.shape[:-1]):
        v = x[idx].astype(np.float64)
        amax = np.float32(np.abs(v).max())
        scale = np.float32(amax / np.float32(127))
        s[idx] = scale
        if scale > 0:
            q[idx] = np.clip(np.round(x[idx] / scale), -127, 127).astype(np.int8)
    return q, s


@pytest.mark.parametrize("codec", ["fp16", "int8", "int8c"])
def test_round_trip(build_cache, codec: str) -> None:
    path, data = build_cache((20, 5, 13, 0), codec=codec)
    cache = fc.open_cache(path)
    assert cache.keys == list(data)  # row order = block order = append order
    rng = np.random.default_rng(1)
    keys = list(rng.permutation(list(data)))
    for layer in cache.spec.layer_names:
        got = cache.read(keys, layer)
        ref = np.stack([data[k][layer] for k in keys])
        raw, scales = cache.read_raw(keys, layer)
        if codec == "fp16":
            assert got.dtype == torch.float16 and scales is None
            np.testing.assert_array_equal(got.numpy(), ref.astype(np.float16))
        else:  # int8: c = 1; int8c: int8 of the channel-equalised x / c (float32 division)
            c = cache.channel_scale(layer)
            c = np.ones(ref.shape[-1], np.float32) if c is None else c
            assert (codec == "int8c") == (cache.channel_scale(layer) is not None)
            q, s = _int8_oracle((ref / c).astype(np.float32))
            assert raw.dtype == torch.int8 and scales.dtype == torch.float32
            np.testing.assert_array_equal(raw.numpy(), q)
            np.testing.assert_array_equal(scales.numpy(), s)
            assert got.dtype == torch.float32
            np.testing.assert_allclose(got.numpy(), q * s[..., None] * c, rtol=0, atol=0)
            # |x - q * s * c| <= s * c / 2 elementwise (+ float32 rounding)
            assert (np.abs(got.numpy() - ref) <= s[..., None] * c * 0.5 + 1e-6).all()


def test_key_index_and_blocks(build_cache) -> None:
    path, _data = build_cache((20, 5, 13))
    cache = fc.open_cache(path)
    assert len(cache) == 38 and "s01-0004" in cache and "nope" not in cache
    assert cache.row_of("s00-0000") == 0
    assert cache.row_of("s01-0000") == 24  # block 1 starts on the next shard boundary (8 rows)
    assert cache.row_of("s02-0012") == 32 + 12
    assert [b.row_start for b in cache.manifest.blocks] == [0, 24, 32]
    assert cache.manifest.rows == 48


@pytest.mark.parametrize("direct", [True, False])
def test_each_row_decoded_once(build_cache, direct: bool) -> None:
    path, data = build_cache((40,), shard_rows=8, codec="int8")
    cache = fc.open_cache(path, direct=direct)
    keys = list(data)
    for i in range(0, 40, 3):
        cache.read(keys[i : i + 3], "4")
    assert cache.rows_decoded == 40
    # direct: one read per shard per batch; zarr: one whole-shard read per shard
    assert cache.shard_reads == (14 + 3 if direct else 5)
    cache.read(keys[::-1], "4")  # all rows still in the LRU
    assert cache.rows_decoded == 40


@pytest.mark.parametrize("codec", ["fp16", "int8", "int8c"])
def test_direct_path_matches_zarr(build_cache, codec: str) -> None:
    path, data = build_cache((20, 5, 13), codec=codec)
    keys = list(np.random.default_rng(0).permutation(list(data)))
    direct, via_zarr = fc.open_cache(path), fc.open_cache(path, direct=False)
    for layer in direct.spec.layer_names:
        a, sa = direct.read_raw(keys, layer)
        b, sb = via_zarr.read_raw(keys, layer)
        np.testing.assert_array_equal(a.numpy(), b.numpy())
        if codec != "fp16":
            np.testing.assert_array_equal(sa.numpy(), sb.numpy())


def test_lru_is_bounded(build_cache) -> None:
    path, data = build_cache((40,), shard_rows=8)
    row_bytes = 16 * 64 * 2
    cache = fc.open_cache(path, cache_bytes=16 * row_bytes)
    keys = list(data)
    cache.read(keys, "4")
    assert cache._lru_bytes <= 16 * row_bytes
    cache.read(keys[-16:], "4")  # the last 16 rows are cached
    assert cache.rows_decoded == 40
    cache.read(keys[:8], "4")  # evicted: decoded again
    assert cache.rows_decoded == 48


def test_pickle_reopens(build_cache) -> None:
    path, _data = build_cache((10,))
    cache = fc.open_cache(path)
    cache.read(["s00-0001"], "4")
    clone = pickle.loads(pickle.dumps(cache))
    assert clone.rows_decoded == 0 and clone.path == cache.path
    np.testing.assert_array_equal(
        clone.read(["s00-0003"], "blk.2").numpy(), cache.read(["s00-0003"], "blk.2").numpy()
    )


def test_torch_inputs_and_skips(tmp_path) -> None:
    spec = fc.CacheSpec((fc.LayerSpec("x", 3, 8),), "fp16", 4, {"m": 1})
    writer = fc.create_cache(tmp_path / "c.zarr", spec, fc.plan_blocks([("a", 6)], 4))
    bw = writer.open_block(0)
    x = torch.randn(5, 3, 8, dtype=torch.bfloat16)
    bw.append([f"k{i}" for i in range(5)], {"x": x})
    bw.skip("bad-frame")
    block = writer.mark_done(bw.finish())
    assert block.count == 5 and block.skipped == ("bad-frame",) and block.done
    cache = fc.open_cache(tmp_path / "c.zarr")
    np.testing.assert_array_equal(
        cache.read(["k4", "k0"], "x").numpy(), x[[4, 0]].float().numpy().astype(np.float16)
    )
    assert cache.read([], "x").shape == (0, 3, 8)


def test_resume_reopens_same_cache(tmp_path, build_cache) -> None:
    path, data = build_cache((10, 3))
    manifest = fc.open_cache(path).manifest
    plan = fc.plan_blocks([("frames-000000.tar", 10), ("frames-000001.tar", 3)], 8)
    writer = fc.create_cache(path, manifest.spec, plan)  # same spec and plan: resume
    assert all(b.done for b in writer.manifest.blocks)
    assert fc.open_cache(path).keys == list(data)


def test_create_in_existing_empty_folder(tmp_path) -> None:
    (tmp_path / "c.zarr").mkdir()
    spec = fc.CacheSpec((fc.LayerSpec("x", 2, 4),), "int8", 4)
    writer = fc.create_cache(tmp_path / "c.zarr", spec, fc.plan_blocks([("a", 3)], 4))
    assert writer.manifest.rows == 4
    assert [p.name for p in tmp_path.iterdir()] == ["c.zarr"]  # no temporary folder left


class _Rows(torch.utils.data.Dataset):
    def __init__(self, cache: fc.FeatureCache) -> None:
        self.cache = cache

    def __len__(self) -> int:
        return len(self.cache.keys)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.cache.read([self.cache.keys[i]], "4")[0]


def test_dataloader_workers(build_cache) -> None:
    path, data = build_cache((20, 5))
    cache = fc.open_cache(path)
    loader = torch.utils.data.DataLoader(_Rows(cache), batch_size=4, num_workers=2)
    got = torch.cat(list(loader)).numpy()
    ref = np.stack([data[k]["4"] for k in cache.keys]).astype(np.float16)
    np.testing.assert_array_equal(got, ref)
