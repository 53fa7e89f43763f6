"""The store layer against three backends: a local folder, obstore's memory store and a real
local S3 server (moto on 127.0.0.1). The oracle is the bytes that were put."""

from __future__ import annotations

import pickle
import uuid
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import zarr

from featurecache.errors import StorageError, UnsupportedURLError
from featurecache.store import LocalStore, ObjectStore, coalesce, open_store


@pytest.fixture(params=["local", "memory", "s3"])
def store(request: pytest.FixtureRequest, tmp_path):
    if request.param == "local":
        return open_store(tmp_path / "root")
    if request.param == "memory":
        return open_store(f"memory://t-{uuid.uuid4().hex}/some/prefix")
    bucket = request.getfixturevalue("s3_bucket")
    return open_store(f"{bucket}/caches/run1.zarr")


def test_open_store_kinds(tmp_path) -> None:
    assert isinstance(open_store(tmp_path), LocalStore)
    assert isinstance(open_store(f"file://{tmp_path}"), LocalStore)
    assert isinstance(open_store("memory://x/y"), ObjectStore)
    for bad in ("http://host/x", "ftp://a/b", "s3://"):
        with pytest.raises(UnsupportedURLError, match="Expected a local path or a URL"):
            open_store(bad)


def test_coalesce() -> None:
    merged, where = coalesce([(10, 20), (0, 10), (30, 40), (35, 38)])
    assert merged == [(0, 20), (30, 40)]
    assert where == [(0, 10, 10), (0, 0, 10), (1, 0, 10), (1, 5, 3)]
    with pytest.raises(StorageError):
        coalesce([(5, 2)])


def test_whole_objects(store) -> None:
    data = bytes(range(256)) * 40
    store.put("a/b/x.bin", data)
    store.put("a/y.bin", b"12345")
    assert store.read("a/b/x.bin") == data
    assert store.size("a/b/x.bin") == len(data)
    assert store.exists("a/y.bin") and not store.exists("a/z.bin")
    assert store.read_tail("a/b/x.bin", 7) == data[-7:]
    assert store.list("a/") == [("a/b/x.bin", len(data)), ("a/y.bin", 5)]
    assert store.list("a/b/") == [("a/b/x.bin", len(data))]
    assert store.list("nothing/") == []
    store.put("a/y.bin", b"678")  # overwrite
    assert store.read("a/y.bin") == b"678"
    store.delete("a/y.bin")
    store.delete("a/y.bin")  # absent: no error
    with pytest.raises(FileNotFoundError):
        store.read("a/y.bin")
    store.delete_prefix("a/")
    assert store.is_empty()


def test_ranged_reads_coalesce(store) -> None:
    data = np.random.default_rng(0).integers(0, 256, 10_000, dtype=np.uint8).tobytes()
    store.put("obj", data)
    ranges = [(100, 200), (200, 350), (350, 400), (5000, 5010), (9990, 10_000)]
    before = store.requests
    got = store.read_ranges("obj", ranges)
    assert got == [data[a:b] for a, b in ranges]
    assert store.requests - before == 3  # three runs of adjacent ranges, one request each
    with pytest.raises(StorageError, match="shorter"):
        store.read_ranges("obj", [(9_000, 12_000)])


def test_create_if_absent(store) -> None:
    assert store.create("done/1.json", b'{"a": 1}')
    assert not store.create("done/1.json", b'{"a": 2}')
    assert store.read("done/1.json") == b'{"a": 1}'


def test_create_races_one_winner(store) -> None:
    """Eight threads create one key with different content: exactly one wins, and the object
    holds the winner's content whole."""
    with ThreadPoolExecutor(8) as pool:
        won = list(pool.map(lambda i: store.create("k", f"writer {i}".encode() * 50), range(8)))
    assert sum(won) == 1
    assert store.read("k") == f"writer {won.index(True)}".encode() * 50


def test_pickles_as_location(store) -> None:
    store.put("p", b"x")
    copy = pickle.loads(pickle.dumps(store))
    assert copy.location == store.location and copy.read("p") == b"x"


def test_plain_zarr_through_the_store(store) -> None:
    """zarr-python writes and reads arrays through the store's zarr adapter; the objects land
    under the store's prefix (visible to the store's own list)."""
    arr = zarr.create_array(
        store.zarr_store(read_only=False), name="a", shape=(4, 3), chunks=(2, 3), dtype="int32"
    )
    arr[:] = np.arange(12).reshape(4, 3)
    back = zarr.open_array(store.zarr_store(read_only=True), path="a", mode="r")
    np.testing.assert_array_equal(back[:], np.arange(12).reshape(4, 3))
    assert "a/zarr.json" in {k for k, _ in store.list("a/")}


def test_sibling_prefixes_do_not_mix() -> None:
    name = uuid.uuid4().hex
    a, b = open_store(f"memory://{name}/run1"), open_store(f"memory://{name}/run10")
    a.put("x", b"1")
    b.put("x", b"2")
    assert a.list() == [("x", 1)] and b.read("x") == b"2"
