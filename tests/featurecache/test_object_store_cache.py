"""Caches in an object store: the writer, reader and verify on a real local S3 server (moto on
127.0.0.1) and on memory://. Oracle: the same blocks written to a local folder."""

from __future__ import annotations

import threading
import uuid
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import featurecache as fc
from featurecache.audit import verify_cache
from featurecache.completion import load_state
from featurecache.errors import BlockConflictError
from featurecache.store import open_store

SPEC = fc.CacheSpec((fc.LayerSpec("a", 6, 32),), "int8", 8, {"m": "t"})
SIZES = [("s0.tar", 20), ("s1.tar", 9), ("s2.tar", 16)]


def _block(b: int, n: int) -> tuple[list[str], dict[str, np.ndarray]]:
    rng = np.random.default_rng(b)
    return [f"b{b}-{i:03d}" for i in range(n)], {"a": rng.standard_normal((n, 6, 32))}


def _write(location: str, blocks: list[int]) -> None:
    writer = fc.create_cache(location, SPEC, fc.plan_blocks(SIZES, 8))
    for b in blocks:
        keys, feats = _block(b, SIZES[b][1])
        bw = writer.open_block(b)
        for i in range(0, len(keys), 5):
            bw.append(keys[i : i + 5], {k: v[i : i + 5] for k, v in feats.items()})
        writer.mark_done(bw.finish())


@pytest.fixture(params=["s3", "memory"])
def location(request: pytest.FixtureRequest) -> str:
    if request.param == "s3":
        return f"{request.getfixturevalue('s3_bucket')}/caches/c.zarr"
    return f"memory://t-{uuid.uuid4().hex}/c.zarr"


def test_write_read_verify_in_an_object_store(location: str, tmp_path) -> None:
    _write(location, [0, 1, 2])
    _write(str(tmp_path / "local.zarr"), [0, 1, 2])
    remote, local = fc.open_cache(location), fc.open_cache(tmp_path / "local.zarr")
    assert remote.keys == local.keys and len(remote.keys) == 45
    keys = local.keys[::-1][:30]  # shuffled-ish: several shards, several runs
    np.testing.assert_array_equal(remote.read(keys, "a").numpy(), local.read(keys, "a").numpy())
    assert verify_cache(location).ok
    # same objects, byte for byte (shards are encoded the same way, wherever they go)
    st, lt = open_store(location), open_store(tmp_path / "local.zarr")
    assert {k: st.read(k) for k, _ in st.list("features/")} == {
        k: lt.read(k) for k, _ in lt.list("features/")
    }


def test_ranged_reads_are_coalesced(location: str) -> None:
    _write(location, [0])
    cache = fc.open_cache(location)
    cache.read(["b0-000"], "a")  # keys, shard index and scales chunk of shard 0: read and kept
    before = cache.store.requests
    cache.read([f"b0-{i:03d}" for i in range(2, 7)], "a")  # 5 adjacent rows: one request
    assert cache.store.requests - before == 1
    cache.read(["b0-007", "b0-001"], "a")  # two rows apart: two ranges, two requests
    assert cache.store.requests - before == 3


def test_verify_names_a_corrupted_object(location: str) -> None:
    _write(location, [0, 1, 2])
    st = open_store(location)
    key = "features/a/c/1/0/0"  # block 0's second shard
    data = bytearray(st.read(key))
    data[10] ^= 0xFF
    st.put(key, bytes(data))
    problems = verify_cache(location).problems
    assert [(p.kind, p.block, p.file) for p in problems] == [("corrupt", 0, st.url(key))]
    with pytest.raises(fc.CorruptShardError, match=key):
        fc.open_cache(location).read(["b0-008"], "a")  # row 8: the first chunk of shard 1


def test_two_writers_of_one_block_finish_identically(location: str) -> None:
    """Two concurrent builds write the same block with the same data: both commit (one creates
    the record, the other finds an identical one), nothing is lost, verify passes."""
    fc.create_cache(location, SPEC, fc.plan_blocks(SIZES, 8))
    both_open = threading.Barrier(2, timeout=60)  # neither finishes before the other opened it

    def write(_: int) -> fc.Block:
        writer = fc.open_writer(location)
        keys, feats = _block(1, 9)
        bw = writer.open_block(1)
        both_open.wait()
        bw.append(keys, feats)
        return writer.mark_done(bw.finish())

    with ThreadPoolExecutor(2) as pool:
        a, b = pool.map(write, range(2))
    assert a == b and a.done
    assert load_state(open_store(location)).table.n_done == 1
    assert verify_cache(location).problems[0].kind == "pending"  # blocks 0 and 2 only


def test_conflicting_result_is_refused(location: str) -> None:
    _write(location, [1])
    writer = fc.open_writer(location)
    result = fc.BlockResult(index=1, count=9, checksum="sha256:" + "0" * 64)
    with pytest.raises(BlockConflictError, match="block 1"):
        writer.mark_done(result)
    assert verify_cache(location).problems[0].block == 0  # block 1 still verifies


def test_a_shuffled_batch_fetches_its_shards_concurrently(location: str, tmp_path, monkeypatch):
    """A batch spanning several shards of an object store: the shards are fetched at once (more
    than one fetch in flight), and the rows equal a local copy's, in the asked order."""
    import threading
    import time

    from featurecache.shard_reader import ShardReader

    _write(location, [0, 1, 2])
    _write(str(tmp_path / "local.zarr"), [0, 1, 2])
    fetch = ShardReader.feature_rows
    lock, state = threading.Lock(), {"now": 0, "most": 0}

    def slow_fetch(self, layer, shard, local, view=0):  # a bucket's latency, from the reader
        with lock:
            state["now"] += 1
            state["most"] = max(state["most"], state["now"])
        time.sleep(0.05)
        try:
            return fetch(self, layer, shard, local, view)
        finally:
            with lock:
                state["now"] -= 1

    monkeypatch.setattr(ShardReader, "feature_rows", slow_fetch)
    remote, local = fc.open_cache(location), fc.open_cache(tmp_path / "local.zarr")
    keys = [local.keys[i] for i in np.random.default_rng(0).permutation(len(local.keys))[:24]]
    got = remote.read(keys, "a").numpy()
    assert state["most"] > 1, "the shards were fetched one after another"
    np.testing.assert_array_equal(got, local.read(keys, "a").numpy())
