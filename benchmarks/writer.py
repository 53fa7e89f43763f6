"""Benchmark: what the compressor costs and buys in the build's writer (issue 21).

Claim: int8 features compress only ~1.1-1.3x with zstd, so on a GPU node, where the writer is
the largest host stage after decoding, `--compressor none` may be worth its bytes. Per feature
kind (DINOv2-B-shaped (256, 768) int8c: the null teacher of `bench ceiling`, a DINOv2-Base with
random weights, ViT-like features with massive activations; EfficientNet-Lite0 block 10 with its
trained weights) and per compressor (none, zstd:1, zstd:3), in one run:

- writer CPU ms/frame: a whole block through `BlockWriter` (rows already encoded, as a build with
  the codec on the device hands them over): shards encoded by `featurecache.chunk_codec`, sha256,
  written to local disk;
- bytes on disk per frame (features, scales, keys, digests) and that over zstd:3's;
- the shard encoding alone, zarr-python (what the writer used before: `create_array` metadata, a
  MemoryStore) vs the direct encoder, CPU ms/frame side by side on the same shard, after checking
  that both give the same bytes.

    python -m featurecache.benchmarks.writer [--json FILE] [--quick]
    featurecache bench writer [--json FILE] [--quick]
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import zarr
from zarr.core.buffer import default_buffer_prototype
from zarr.storage import MemoryStore

import featurecache as fc
from featurecache.benchmarks import harness
from featurecache.benchmarks.cache import efficientnet_features, massive, vit_features
from featurecache.benchmarks.ceiling import SHAPES, null_dinov2b
from featurecache.chunk_codec import direct_layout
from featurecache.codecs import calibrate_channel_scale, encode_torch
from featurecache.format import features_path

TITLE = "Writer: CPU and bytes on disk per frame, per compressor; zarr-python vs direct encoding"
COMPRESSORS = ("none", "zstd:1", "zstd:3")
SHARD_ROWS = 64
BATCH = 32


def _kinds(quick: bool) -> list[tuple[str, np.ndarray]]:
    """(label, float32 (n, tokens, dim)) feature kinds; a few real frames are tiled to fill the
    block (each row is its own chunk, so repeats compress as the originals)."""
    if quick:
        tokens, dim = 16, 64
        null = torch.randn(64, tokens, dim, generator=torch.Generator().manual_seed(0)).numpy()
        return [("null teacher (randn)", null), ("massive", massive(8, tokens, dim))]
    tokens, dim = SHAPES["DINOv2-B"]
    kinds = [
        (f"null teacher {tokens}x{dim}", null_dinov2b(["x"], "cpu").out.numpy()),
        (f"ViT-like, massive activations {tokens}x{dim}", massive(16, tokens, dim)),
    ]
    for label, feats in (
        ("DINOv2-B random weights, layer 6", vit_features("dinov2")),
        ("EfficientNet-Lite0 block 10 (trained)", efficientnet_features()),
    ):
        if feats is not None:  # None without transformers / the weights package
            kinds.append((f"{label} {feats.shape[1]}x{feats.shape[2]}", feats))
    return kinds


def _write_block(path: Path, spec: fc.CacheSpec, encoded: list, scale: np.ndarray) -> float:
    """Write one block of the encoded batches; process CPU seconds of open_block..finish."""
    n = sum(len(e.values) for e in encoded)
    writer = fc.create_cache(path, spec, fc.plan_blocks([("s", n)], SHARD_ROWS),
                             channel_scales={"x": scale})  # fmt: skip
    start = time.process_time()
    block = writer.open_block(0)
    for i, enc in enumerate(encoded):
        keys = [f"frame-{i:04d}-{j:02d}" for j in range(len(enc.values))]
        block.append(keys, {"x": enc}, [bytes(16)] * len(keys))
    result = block.finish()
    cpu = time.process_time() - start
    writer.mark_done(result)
    return cpu


def _disk_bytes(path: Path) -> int:
    """Bytes of the chunk and shard objects of keys, digests, features and scales."""
    arrays = ("keys", "digests", "features", "scales")
    files = [f for name in arrays for f in (path / name).rglob("*") if f.is_file()]
    return sum(f.stat().st_size for f in files if f.name != "zarr.json")


def _encode_shard(path: Path, rows: np.ndarray, repeats: int) -> tuple[float, float]:
    """CPU seconds per shard of zarr-python's and the direct encoding of `rows` into the cache's
    features array (its own zarr.json), after checking they are the same bytes."""
    name = features_path("x")
    meta = (path / name / "zarr.json").read_bytes()
    layout = direct_layout(json.loads(meta))
    assert layout is not None

    def through_zarr() -> bytes:
        encoded = {f"{name}/zarr.json": default_buffer_prototype().buffer.from_bytes(meta)}
        arr = zarr.open_array(MemoryStore(store_dict=encoded), path=name, mode="r+")
        arr.with_config({"write_empty_chunks": True})[: len(rows)] = rows
        return encoded[f"{name}/c/0/0/0"].to_bytes()

    if through_zarr() != layout.encode(rows):
        raise AssertionError("zarr-python and the direct encoder wrote different shards")
    secs = {}
    for label, fn in (("zarr", through_zarr), ("direct", lambda: layout.encode(rows))):
        start = time.process_time()
        for _ in range(repeats):
            fn()
        secs[label] = (time.process_time() - start) / repeats
    return secs["zarr"], secs["direct"]


def run(json_path: str | Path | None = None, quick: bool = False) -> list[harness.Result]:
    """Measure, print the table, write JSON when asked and (unless `quick`) record the table in
    benchmarks/RESULTS.md."""
    torch.set_num_threads(1)
    n, repeats = (64, 2) if quick else (256, 3)
    device = harness.device_name("cpu")
    root = Path(tempfile.mkdtemp(prefix="fcbench-writer-"))
    rows: list[harness.Result] = []
    try:
        for label, feats in _kinds(quick):
            x = np.resize(feats.astype(np.float32), (n, *feats.shape[1:]))  # tiled to n rows
            scale = calibrate_channel_scale(x[:16])
            c = torch.from_numpy(scale)
            encoded = [encode_torch(torch.from_numpy(x[i : i + BATCH]), "int8c", c)
                       for i in range(0, n, BATCH)]  # fmt: skip
            layer = fc.LayerSpec("x", *x.shape[1:])
            figures = {}
            for compressor in COMPRESSORS:
                spec = fc.CacheSpec((layer,), "int8c", SHARD_ROWS, {"m": "bench"},
                                    compressor=compressor)  # fmt: skip
                path = root / f"{compressor}.zarr"
                cpu = []
                for _ in range(repeats):
                    shutil.rmtree(path, ignore_errors=True)
                    cpu.append(_write_block(path, spec, encoded, scale))
                q = np.concatenate([e.values for e in encoded[: SHARD_ROWS // BATCH]])
                zarr_s, direct_s = _encode_shard(path, q[:SHARD_ROWS], repeats)
                figures[compressor] = (cpu, _disk_bytes(path) / n, zarr_s, direct_s, len(q))
                shutil.rmtree(path)
            base = figures["zstd:3"][1]
            for compressor, (cpu, disk, zarr_s, direct_s, shard_n) in figures.items():
                rows.append(harness.result(
                    label, compressor, [1e3 * s / n for s in cpu], "writer CPU ms/frame", device,
                    disk_KiB_per_frame=disk / 1024, disk_vs_zstd3=disk / base,
                    decoded_over_disk=(x[0].size + 4 * x.shape[1] + spec.key_bytes + 16) / disk,
                    encode_zarr_ms=1e3 * zarr_s / shard_n,
                    encode_direct_ms=1e3 * direct_s / shard_n,
                    zarr_over_direct=zarr_s / direct_s,
                ))  # fmt: skip
    finally:
        shutil.rmtree(root, ignore_errors=True)
    harness.publish(
        rows,
        TITLE,
        json_path,
        None if quick else "writer",
        f"{n} frames per kind, one block of {SHARD_ROWS}-row shards, int8c (rows encoded "
        "before the writer, as from the teacher's device). Writer CPU ms/frame: "
        "BlockWriter append + shard encoding + sha256 + local write, one thread. "
        "disk_KiB_per_frame: features, scales, keys, digests; decoded_over_disk: their "
        "decoded bytes (int8 values, float32 scales, keys, digests) over that. "
        "encode_*_ms: one features shard encoded alone (CPU ms per row), zarr-python "
        "(the writer before) vs chunk_codec (now), the same bytes. " + harness.load_note(),
    )
    return rows


if __name__ == "__main__":
    harness.main(run, __doc__)
