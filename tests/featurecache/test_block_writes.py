"""The block writer's pool: a shard's objects are encoded and written concurrently (at most
WRITE_WINDOW at once), and the cache is byte for byte the one written one object at a time."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np

import featurecache as fc
from featurecache import block_writer
from featurecache.store import LocalStore

LAYERS = (fc.LayerSpec("a", 6, 16), fc.LayerSpec("b", 4, 8))


def _write(path: Path) -> None:
    spec = fc.CacheSpec(LAYERS, "int8", 4)
    writer = fc.create_cache(path, spec, fc.plan_blocks([("s", 18)], 4))
    bw = writer.open_block(0)
    rng = np.random.default_rng(0)
    for start in range(0, 18, 5):
        n = min(5, 18 - start)
        feats = {x.name: rng.standard_normal((n, x.tokens, x.dim), np.float32) for x in LAYERS}
        bw.append([f"k{start + i}" for i in range(n)], feats)
    writer.mark_done(bw.finish())


def _objects(path: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(path)): p.read_bytes()
        for p in sorted(path.rglob("*"))
        if p.is_file() and "/c/" in str(p)
    }


def test_shard_objects_are_written_concurrently(tmp_path, monkeypatch) -> None:
    real_put, lock = LocalStore.put, threading.Lock()
    inflight, peak = [0], [0]

    def slow_put(self: LocalStore, key: str, data: bytes) -> None:
        with lock:
            inflight[0] += 1
            peak[0] = max(peak[0], inflight[0])
        time.sleep(0.02)  # a bucket's latency: the other objects of the shard go meanwhile
        real_put(self, key, data)
        with lock:
            inflight[0] -= 1

    monkeypatch.setattr(LocalStore, "put", slow_put)
    _write(tmp_path / "c.zarr")
    assert 1 < peak[0] <= block_writer.WRITE_WINDOW


def test_the_cache_equals_one_written_an_object_at_a_time(tmp_path, monkeypatch) -> None:
    _write(tmp_path / "pool.zarr")
    monkeypatch.setattr(block_writer, "WRITE_WINDOW", 1)
    _write(tmp_path / "serial.zarr")
    pool, serial = _objects(tmp_path / "pool.zarr"), _objects(tmp_path / "serial.zarr")
    assert len(serial) == 6 * 5  # keys, digests, 2 features, 2 scales; 5 shards of 4 rows
    assert pool == serial
    cache = fc.open_cache(tmp_path / "pool.zarr")
    assert cache.keys == [f"k{i}" for i in range(18)]
