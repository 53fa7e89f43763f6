"""The direct chunk and shard encoder against its oracle, zarr-python: for the same data and array
metadata the objects are equal byte for byte (full and partial shards and chunks, every dtype the
cache stores, every compressor); a cache written through it is read by plain zarr-python."""

from __future__ import annotations

import json

import numpy as np
import pytest
import zarr
from zarr.codecs import BytesCodec, Crc32cCodec, ZstdCodec
from zarr.storage import MemoryStore

import featurecache as fc
from featurecache.chunk_codec import ChunkChain, direct_layout
from featurecache.errors import ChunkError, SpecError
from featurecache.format import checksum_arrays

COMPRESSORS = ("none", "zstd:1", "zstd:3", "zstd:9")


def zarr_compressors(compressor: str) -> list:
    """The zarr-python codecs of a compressor name, written here independently of chunk_codec."""
    if compressor == "none":
        return [Crc32cCodec()]
    return [ZstdCodec(level=int(compressor.split(":")[1]), checksum=False), Crc32cCodec()]


def zarr_object(values: np.ndarray, shape: tuple, chunks: tuple, shards: tuple | None,
                compressor: str) -> tuple[dict, bytes]:  # fmt: skip
    """(zarr.json, the first shard's or chunk's object) of an array zarr-python wrote with
    values in its first rows (a fresh array: the rest never written)."""
    encoded: dict = {}
    arr = zarr.create_array(
        MemoryStore(store_dict=encoded), name="a", shape=shape, chunks=chunks, shards=shards,
        dtype=values.dtype, fill_value=0, serializer=BytesCodec(endian="little"),
        compressors=zarr_compressors(compressor), filters=None,
        config={"write_empty_chunks": True},
    )  # fmt: skip
    arr[: len(values)] = values
    meta = json.loads(encoded["a/zarr.json"].to_bytes())
    key = "a/c/" + "/".join(["0"] * len(shape))
    return meta, encoded[key].to_bytes()


def sample(dtype: str, shape: tuple, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape) * 3
    if np.dtype(dtype).kind in "iu":
        x = np.clip(np.rint(x * 20), np.iinfo(dtype).min, np.iinfo(dtype).max)
    x = x.astype(dtype)
    x[1] = 0  # an all-zero written row: its chunk is stored too
    return x


@pytest.mark.parametrize("compressor", COMPRESSORS)
@pytest.mark.parametrize("dtype", ["int8", "float16"])
@pytest.mark.parametrize(("shard_rows", "written"), [(8, 8), (8, 3), (6, 6), (6, 5), (1, 1)])
def test_shard_equals_zarr(compressor: str, dtype: str, shard_rows: int, written: int) -> None:
    tokens, dim = 7, 24
    values = sample(dtype, (max(written, 2), tokens, dim), seed=shard_rows * 10 + written)[:written]
    meta, expected = zarr_object(values, (4 * shard_rows, tokens, dim), (1, tokens, dim),
                                 (shard_rows, tokens, dim), compressor)  # fmt: skip
    layout = direct_layout(meta)
    assert layout is not None and layout.sharded and layout.rows == shard_rows
    assert layout.chain == ChunkChain.named(compressor)
    assert layout.encode(values) == expected


@pytest.mark.parametrize("compressor", COMPRESSORS)
@pytest.mark.parametrize(
    ("dtype", "row_shape"),
    [("uint8", (32,)), ("uint8", (16,)), ("float32", (7,)), ("float64", (2, 10))],
)  # keys, digests, scales, view params
@pytest.mark.parametrize("written", [8, 5, 1])
def test_row_chunk_equals_zarr(compressor: str, dtype: str, row_shape: tuple, written: int) -> None:
    values = sample(dtype, (max(written, 2), *row_shape), seed=written)[:written]
    meta, expected = zarr_object(
        values, (24, *row_shape), (8, *row_shape), None, compressor
    )  # a partly written chunk: zarr stores it whole, its other rows 0
    layout = direct_layout(meta)
    assert layout is not None and not layout.sharded and layout.rows == 8
    assert layout.encode(values) == expected


@pytest.mark.parametrize("compressor", ["none", "zstd:3"])
def test_decode_checks_crc(compressor: str) -> None:
    chain = ChunkChain.named(compressor)
    x = np.arange(60, dtype=np.float32).reshape(3, 20)
    raw = chain.encode(x)
    np.testing.assert_array_equal(chain.decode(raw, "<f4", (3, 20)), x)
    bad = bytearray(raw)
    bad[2] ^= 1
    with pytest.raises(ChunkError, match="crc32c"):
        chain.decode(bytes(bad), "<f4", (3, 20))


def test_compressor_names() -> None:
    assert ChunkChain.named("none").level is None
    assert ChunkChain.named("zstd:22").compressor == "zstd:22"
    for bad in ("zstd", "zstd:0", "zstd:23", "zstd:03", "lz4:1", "", "ZSTD:3"):
        with pytest.raises(SpecError, match="Expected compressor 'none' or 'zstd:L'"):
            ChunkChain.named(bad)


def test_other_chains_are_not_direct() -> None:
    meta, _ = zarr_object(np.ones((2, 3), np.float32), (8, 3), (4, 3), None, "zstd:3")
    assert direct_layout(meta) is not None
    for change in (
        {"fill_value": 1.0},
        {"codecs": [meta["codecs"][0], {"name": "gzip", "configuration": {"level": 1}}]},
        {"codecs": [meta["codecs"][0], {"name": "zstd", "configuration": {"level": 3,
                                                                          "checksum": True}},
                    meta["codecs"][2]]},
        {"chunk_key_encoding": {"name": "v2", "configuration": {"separator": "."}}},
    ):  # fmt: skip
        assert direct_layout(meta | change) is None


@pytest.mark.parametrize("compressor", ["none", "zstd:1"])
@pytest.mark.parametrize("codec", ["int8c", "fp16"])
def test_cache_objects_equal_zarr_and_read_by_zarr(tmp_path, features, codec, compressor) -> None:
    """A whole cache written by the BlockWriter: every shard and chunk object equals zarr-python's
    encoding of the same rows with the cache's own zarr.json, and plain zarr reads the values."""
    layers = (fc.LayerSpec("4", 16, 64, (4, 4)), fc.LayerSpec("blk.2", 5, 24))
    spec = fc.CacheSpec(layers, codec, 8, {"m": 1}, compressor=compressor)
    scales = None
    if codec == "int8c":
        scales = {x.name: fc.calibrate_channel_scale(features(8, x.tokens, x.dim)) for x in layers}
    path = tmp_path / "c.zarr"
    writer = fc.create_cache(path, spec, fc.plan_blocks([("a", 20)], 8), channel_scales=scales)
    bw = writer.open_block(0)
    keys = [f"k{i:03d}" for i in range(20)]
    feats = {x.name: features(20, x.tokens, x.dim, seed=i) for i, x in enumerate(layers)}
    bw.append(keys, feats, [bytes([i]) * 16 for i in range(20)])
    writer.mark_done(bw.finish())

    header = json.loads((path / "zarr.json").read_text())["attributes"]["featurecache"]
    assert header["compressor"] == compressor
    for name in checksum_arrays(spec):
        meta = (path / name / "zarr.json").read_bytes()
        stored = zarr.open_array(str(path), path=name, mode="r")[:20]  # plain zarr reads it
        encoded = {f"{name}/zarr.json": zarr.core.buffer.cpu.Buffer.from_bytes(meta)}
        arr = zarr.open_array(MemoryStore(store_dict=encoded), path=name, mode="r+")
        arr.with_config({"write_empty_chunks": True})[:20] = stored
        files = sorted(k for k in encoded if "/c/" in k)
        assert len(files) == 3  # shards 0, 1 whole, 2 holding rows 16..19
        for key in files:
            assert (path / key).read_bytes() == encoded[key].to_bytes(), key
    cache = fc.open_cache(path)  # the direct decoder on the same objects
    assert cache.keys == keys
    for direct in (True, False):
        got = fc.open_cache(path, direct=direct).read(keys[::3], "4").numpy()
        want = zarr.open_array(str(path), path="features/4", mode="r")[::3][:7]
        if codec == "int8c":
            s = zarr.open_array(str(path), path="scales/4", mode="r")[::3][:7]
            c = zarr.open_array(str(path), path="channel_scales/4", mode="r")[:]
            want = want.astype(np.float32) * s[..., None] * c
        np.testing.assert_array_equal(got, want.astype(got.dtype))
