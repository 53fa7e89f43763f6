"""O(1) block completion: plan written once, one immutable record per done block, snapshots.
Oracles: the records that were committed, and a version-1 manifest of the same blocks."""

from __future__ import annotations

import hashlib
import json
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest

from featurecache.block_table import BlockTable, DoneRecord
from featurecache.completion import (
    DONE_PREFIX,
    PLAN_OBJECT,
    SNAPSHOT_PREFIX,
    clear_record,
    commit_record,
    is_done,
    load_state,
    record_key,
    write_plan,
    write_snapshot,
)
from featurecache.errors import (
    BlockConflictError,
    FormatVersionError,
    ManifestError,
    NotACacheError,
)
from featurecache.format import ATTRS_KEY, FORMAT_VERSION
from featurecache.manifest import Manifest, plan_blocks
from featurecache.spec import CacheSpec, LayerSpec
from featurecache.store import open_store

SPEC = CacheSpec((LayerSpec("4", 4, 8),), "fp16", 8, {"model": "t"})


@pytest.fixture(params=["local", "memory"])
def store(request: pytest.FixtureRequest, tmp_path):
    if request.param == "local":
        return open_store(tmp_path / "cache")
    return open_store(f"memory://c-{uuid.uuid4().hex}/cache.zarr")


def make_cache(store, sizes: list[int]) -> BlockTable:
    """A records-layout cache's metadata (no arrays): plan, then the group's zarr.json."""
    table = BlockTable.from_blocks(plan_blocks([(f"s{i}.tar", n) for i, n in enumerate(sizes)], 8))
    write_plan(store, table)
    header = {"version": FORMAT_VERSION, **SPEC.to_json(), "rows": table.rows,
              "block_count": len(table)}  # fmt: skip
    meta = {"zarr_format": 3, "node_type": "group", "attributes": {ATTRS_KEY: header}}
    store.create("zarr.json", json.dumps(meta).encode())
    return table


def record(i: int, count: int, skipped: tuple[str, ...] = ()) -> DoneRecord:
    digest = hashlib.sha256(f"{i}:{count}".encode()).hexdigest()
    return DoneRecord(index=i, count=count, checksum=f"sha256:{digest}", skipped=skipped)


def test_plan_and_records(store) -> None:
    make_cache(store, [10, 3, 17, 0])
    state = load_state(store)
    assert state.layout == "records" and state.rows == 16 + 8 + 24
    assert state.table.n_done == 0 and [b.source for b in state.table.blocks()] == [
        "s0.tar", "s1.tar", "s2.tar", "s3.tar"
    ]  # fmt: skip
    assert commit_record(store, record(2, 16, ("bad-1",)))
    assert is_done(store, 2) and not is_done(store, 0)
    state = load_state(store)
    b = state.table.block(2)
    assert (
        b.done
        and b.count == 16
        and b.skipped == ("bad-1",)
        and b.checksum == record(2, 16).checksum
    )
    assert not state.table.block(0).done and state.table.block(0).count == 10
    assert state.records_read == 1
    assert state.table.block_of_row(16 + 8) == 2 and state.table.block_of_row(0) == 0


def test_commit_is_create_if_absent(store) -> None:
    make_cache(store, [10])
    assert commit_record(store, record(0, 10))
    assert not commit_record(store, record(0, 10))  # same result again: accepted, not rewritten
    with pytest.raises(BlockConflictError, match="block 0"):
        commit_record(store, record(0, 9))
    assert load_state(store).table.block(0).count == 10


def test_concurrent_commits_all_land(store) -> None:
    make_cache(store, [8] * 64)
    with ThreadPoolExecutor(8) as pool:
        assert all(pool.map(lambda i: commit_record(store, record(i, 8 - i % 3)), range(64)))
    table = load_state(store).table
    assert table.n_done == 64 and [int(c) for c in table.count] == [8 - i % 3 for i in range(64)]


def test_snapshot_covers_records(store) -> None:
    make_cache(store, [8] * 10)
    for i in range(6):
        commit_record(store, record(i, 8))
    table = load_state(store).table
    assert write_snapshot(store, table)
    assert not write_snapshot(store, table)  # same coverage exists: a new object is not made
    for i in range(6, 8):
        commit_record(store, record(i, 8))
    state = load_state(store)
    assert state.table.n_done == 8 and state.records_read == 2  # snapshot + 2 uncovered records
    # the snapshot alone says the same as the records it covers
    rec_only = load_state(store)
    store.delete_prefix(SNAPSHOT_PREFIX)
    assert load_state(store).table.n_done == 8
    assert rec_only.table.snapshot_json() == load_state(store).table.snapshot_json()


def test_complete_snapshot_means_no_listing(store) -> None:
    make_cache(store, [8] * 5)
    for i in range(5):
        commit_record(store, record(i, 7))
    write_snapshot(store, load_state(store).table)
    store.delete(record_key(4))  # a reader with a complete snapshot never looks at records
    state = load_state(store)
    assert state.table.n_done == 5 and state.records_read == 0


def test_clear_record_makes_pending_again(store) -> None:
    make_cache(store, [8] * 3)
    for i in range(3):
        commit_record(store, record(i, 8))
    write_snapshot(store, load_state(store).table)
    clear_record(store, 1)
    table = load_state(store).table
    assert table.done.tolist() == [True, False, True]
    assert not store.list(SNAPSHOT_PREFIX)


def test_version_1_manifest_loads_into_the_same_table(tmp_path) -> None:
    blocks = plan_blocks([("a.tar", 10), ("b.tar", 5)], 8)
    m = Manifest(spec=SPEC, blocks=tuple(blocks), rows=blocks[-1].row_stop, version=1)
    r = record(1, 4, ("x",))
    m = m.with_block(blocks[1].__class__(**{**blocks[1].__dict__, "status": "done", "count": 4,
                                           "checksum": r.checksum, "skipped": ("x",)}))  # fmt: skip
    header = {**m.to_json(), "version": 1}
    store = open_store(tmp_path / "v1")
    meta = {"zarr_format": 3, "node_type": "group", "attributes": {ATTRS_KEY: header}}
    store.put("zarr.json", json.dumps(meta).encode())
    state = load_state(store)
    assert state.layout == "manifest" and state.version == 1
    assert list(state.table.blocks()) == list(m.blocks)
    assert state.manifest().blocks == m.blocks


def test_not_a_cache_and_newer_versions(store) -> None:
    with pytest.raises(NotACacheError, match="found none"):
        load_state(store)
    meta = {"zarr_format": 3, "node_type": "group", "attributes": {ATTRS_KEY: {"version": 99}}}
    store.put("zarr.json", json.dumps(meta).encode())
    with pytest.raises(FormatVersionError, match="got 99"):
        load_state(store)


def test_malformed_objects_are_named(store) -> None:
    make_cache(store, [8, 8])
    store.put(record_key(1), b'{"index": 1, "count": 3, "checksum": "md5:00"}')
    with pytest.raises(ManifestError, match=r"done/1\.json"):
        load_state(store)
    store.delete(record_key(1))
    store.put(PLAN_OBJECT, b"{not json")
    with pytest.raises(ManifestError, match=r"plan\.json"):
        load_state(store)


def test_table_memory_is_linear_and_small() -> None:
    """About 110 bytes per block plus the source names, however many blocks."""
    for n in (1_000, 100_000):
        sources = [f"s3://bucket/frames/frames-{i:06d}.tar" for i in range(n)]
        table = BlockTable(sources, [i * 1024 for i in range(n)],
                           [(i + 1) * 1024 for i in range(n)], [1000] * n)  # fmt: skip
        per_block = (table.nbytes() - sum(len(s) for s in sources)) / n
        assert per_block <= 120, per_block
    assert table.block_of_row(1024 * 99_999 + 5) == 99_999


def test_records_are_small_and_independent_of_the_block_count(store) -> None:
    make_cache(store, [8] * 50)
    commit_record(store, record(7, 8))
    sizes = dict(store.list(DONE_PREFIX))
    assert list(sizes) == [record_key(7)] and sizes[record_key(7)] < 160
