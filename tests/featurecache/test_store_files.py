"""Frame tars in an object store (featurecache.store_files through featurecache.samples) and the
build lease (featurecache.lease), on memory:// and the real local S3 server. Oracles: the same
tars read from local disk; tarfile over the whole bytes; the object sizes."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
import time
import uuid
from pathlib import Path

import pytest

import featurecache as fc
from featurecache.lease import LEASE_PREFIX, Lease, acquire_lease, holds_only_leases
from featurecache.samples import (
    FramesNotFoundError,
    expand_frame_paths,
    iter_keys,
    iter_samples,
)
from featurecache.store import open_store
from featurecache.store_files import MIN_READ_AHEAD, RangedReader, open_object


def _tar(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _shard(i: int, n: int = 3, size: int = 100) -> bytes:
    return _tar([(f"s{i}-{j}.png", bytes([j]) * size) for j in range(n)])


@pytest.fixture(params=["memory", "s3"])
def root(request: pytest.FixtureRequest) -> str:
    if request.param == "s3":
        return f"{request.getfixturevalue('s3_bucket')}/data"
    return f"memory://f-{uuid.uuid4().hex}/data"


def test_patterns_are_listed_like_local_ones(root: str, tmp_path: Path) -> None:
    st, local = open_store(root), tmp_path / "data"
    for name in [
        "train/frames-000000.tar",
        "train/frames-000001.tar",
        "train/frames-000002.tar",
        "train/notes.txt",
        "train/deeper/frames-000009.tar",
        "val/frames-000000.tar",
    ]:
        st.put(name, _shard(0))
        (local / name).parent.mkdir(parents=True, exist_ok=True)
        (local / name).write_bytes(_shard(0))  # fmt: skip
    cases = [
        ["train"],  # a folder: its *.tar, not deeper
        ["train/frames-{000001..000002}.tar", "train/frames-000000.tar"],  # order kept
        ["*/frames-000000.tar"],  # a glob matches segment by segment
        ["train/frames-00000[02].tar", "train/frames-000000.tar"],  # named twice: once
    ]
    for patterns in cases:
        remote = expand_frame_paths([f"{root}/{p}" for p in patterns])
        want = expand_frame_paths([str(local / p) for p in patterns])
        assert [r[len(root) + 1 :] for r in remote] == [str(w.relative_to(local)) for w in want]
    with pytest.raises(FramesNotFoundError, match="frames-000003"):
        expand_frame_paths([f"{root}/train/frames-{{000000..000003}}.tar"])  # one is missing
    with pytest.raises(FramesNotFoundError, match="match at least one"):
        expand_frame_paths([f"{root}/train/x-*.tar"])
    with pytest.raises(fc.UnsupportedURLError, match="x://bucket/data"):
        expand_frame_paths(["x://bucket/data"])


def test_samples_from_the_store_equal_local_ones(root: str, tmp_path: Path) -> None:
    data = _tar([("a.png", b"1"), ("a.json", b"{}"), ("b.top.png", b"2"), ("b.wrist.png", b"3")])
    open_store(root).put("s.tar", data)
    (tmp_path / "s.tar").write_bytes(data)
    url = f"{root}/s.tar"
    assert list(iter_keys(url)) == list(iter_keys(tmp_path / "s.tar")) == ["a", "b"]
    remote, local = list(iter_samples(url)), list(iter_samples(tmp_path / "s.tar"))
    assert [(s.key, s.members) for s in remote] == [(s.key, s.members) for s in local]
    assert remote[0].source == url


def test_a_cut_tar_in_the_store_is_refused(root: str) -> None:
    data = _shard(0, n=3, size=600)
    st = open_store(root)
    st.put("cut.tar", data[: 512 + 1024])  # one whole member, cut right after it
    st.put("empty.tar", b"")
    for read in (iter_keys, lambda u: (s.key for s in iter_samples(u))):
        with pytest.raises(FramesNotFoundError, match=r"cut\.tar.*cut short"):
            list(read(f"{root}/cut.tar"))
        with pytest.raises(FramesNotFoundError, match=r"empty\.tar"):
            list(read(f"{root}/empty.tar"))
    with pytest.raises(FramesNotFoundError, match=r"nope\.tar"):
        list(iter_keys(f"{root}/nope.tar"))


def test_planning_reads_headers_not_members() -> None:
    """Keys of a tar of large members: one small ranged read per header, the members are never
    downloaded; a tar of small members is read in a few growing windows."""
    st = open_store(f"memory://f-{uuid.uuid4().hex}")
    big = 4 * MIN_READ_AHEAD
    st.put("big.tar", _tar([(f"k{i}.png", b"x" * big) for i in range(6)]))
    reader = RangedReader(st, "big.tar")
    with tarfile.open(fileobj=reader, mode="r:") as tar:
        assert [m.name for m in tar] == [f"k{i}.png" for i in range(6)]
    assert reader.fetches == 7  # a window per header + the end marker; members skipped
    assert reader.fetches * MIN_READ_AHEAD < reader.length / 3
    st.put("small.tar", _tar([(f"k{i}.png", b"x" * 1000) for i in range(2000)]))
    reader = RangedReader(st, "small.tar")
    with tarfile.open(fileobj=reader, mode="r:") as tar:
        assert len(tar.getmembers()) == 2000
    assert reader.fetches <= 8  # 4.1 MB in windows of 64 kB, 128 kB, ... (doubling)


def test_open_object_streams_and_seeks(root: str) -> None:
    data = os.urandom(3 << 20)
    open_store(root).put("blob", data)
    with open_object(f"{root}/blob", sequential=True) as f:
        assert f.read() == data
    with open_object(f"{root}/blob") as f:
        f.seek(1 << 20)
        assert f.read(10) == data[1 << 20 : (1 << 20) + 10]
        f.seek(-5, io.SEEK_END)
        assert f.read() == data[-5:]


# ---- the build lease ---------------------------------------------------------------------------


def test_one_lease_at_a_time(root: str) -> None:
    st = open_store(f"{root}/c.zarr")
    lease = acquire_lease(st, seconds=30)
    assert holds_only_leases(st) and not st.is_empty()
    with pytest.raises(fc.CacheBusyError, match=f"pid {os.getpid()}"):
        acquire_lease(st)
    lease.release()
    again = acquire_lease(st)  # released: free
    assert [k for k, _ in st.list(LEASE_PREFIX)] == [f"{LEASE_PREFIX}{1:012d}.json"]
    again.release()


def test_a_dead_holders_lease_is_taken_at_once_and_an_expired_one_later(root: str) -> None:
    st = open_store(f"{root}/c.zarr")
    code = (
        "import sys; from featurecache.store import open_store; "
        "from featurecache.lease import acquire_lease; acquire_lease(open_store(sys.argv[1]))"
    )  # takes the lease and exits without releasing it (as a SIGKILLed build would)
    subprocess.run([sys.executable, "-c", code, st.location], check=True)
    holder = acquire_lease(st)  # its pid is gone on this host: taken over at once
    holder.release()
    other_host = {"holder": "pid 1 on elsewhere", "host": "elsewhere", "pid": 1}
    st.put(
        f"{LEASE_PREFIX}{9:012d}.json",
        json.dumps(other_host | {"expires": time.time() + 1}).encode(),
    )
    with pytest.raises(fc.CacheBusyError, match="pid 1 on elsewhere"):
        acquire_lease(st)  # alive elsewhere, as far as we can tell
    time.sleep(1.1)
    taker = acquire_lease(st)  # expired: taken (lease 10)
    stalled = Lease(st, 9, 60.0)  # the holder of lease 9 wakes up and renews
    stalled.renew()
    assert stalled.lost
    taker.release()
