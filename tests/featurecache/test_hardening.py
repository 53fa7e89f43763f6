"""Hardening of the cache itself (issue 9): the manifest is not trusted over the arrays, per-row
source digests, URLs refused, the umask respected, one build at a time, a full disk loses nothing.
Every bad input is a typed error naming the field, file or key at fault; the oracles are the
arrays' own zarr.json, plain zarr-python and hashlib."""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr

import featurecache as fc
from featurecache.audit import verify_cache
from featurecache.format import ATTRS_KEY, GROUP_METADATA, sample_digest
from featurecache.manifest import acquire_build_lock
from featurecache.store import LocalStore

LAYER = fc.LayerSpec("x", tokens=4, dim=8, grid=(2, 2))


def _images(keys: list[str], salt: str = "") -> dict[str, bytes]:
    """Stand-in encoded images: distinct bytes per key (and per salt)."""
    return {k: f"png-bytes-of-{k}{salt}".encode() * 3 for k in keys}


def _cache(path: Path, sizes: tuple[int, ...] = (6, 3), *, digests: bool = True) -> list[str]:
    """A small fp16 cache (shard_rows 4) whose rows carry the digests of `_images`."""
    spec = fc.CacheSpec((LAYER,), "fp16", 4, {"teacher": "test"})
    writer = fc.create_cache(
        path, spec, fc.plan_blocks([(f"src{i}", n) for i, n in enumerate(sizes)], 4)
    )
    keys_all = []
    for b, n in enumerate(sizes):
        keys = [f"b{b}-k{i}" for i in range(n)]
        images = _images(keys)
        bw = writer.open_block(b)
        feats = {"x": np.random.default_rng(b).standard_normal((n, 4, 8)).astype(np.float32)}
        dg = [sample_digest({"": images[k]}) for k in keys] if digests else None
        bw.append(keys, feats, dg)
        writer.mark_done(bw.finish())
        keys_all += keys
    return keys_all


def _edit_header(path: Path, change: Callable[[dict[str, Any]], None]) -> None:
    meta = json.loads((path / GROUP_METADATA).read_text())
    change(meta["attributes"][ATTRS_KEY])
    (path / GROUP_METADATA).write_text(json.dumps(meta))


def _as_version_1(path: Path) -> None:
    """Rewrite a cache's header in the version-1 layout (the block table inside zarr.json)."""
    table = fc.open_cache(path).manifest.to_json()
    _edit_header(path, lambda h: (h.clear(), h.update({**table, "version": 1})))


# ---- the manifest is checked against the arrays ------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value", "named"),
    [
        ("tokens", 5, "shape"),  # read would reshape garbage out of (4, 8) rows
        ("dim", 16, "shape"),
        ("grid", [1, 4], "grid"),  # same token count, another grid: only the array's record says
        ("grid", [4, 4], r"grid h \* w <= tokens"),  # impossible for 4 tokens
    ],
)
def test_edited_layer_is_refused(tmp_path: Path, field: str, value: Any, named: str) -> None:
    path = tmp_path / "c.zarr"
    _cache(path)
    _edit_header(path, lambda h: h["layers"][0].__setitem__(field, value))
    with pytest.raises(fc.ManifestError, match=named) as err:
        fc.open_cache(path)
    assert str(path / GROUP_METADATA) in str(err.value) or str(path) in str(err.value)
    if "<=" not in named:
        problems = verify_cache(path).problems
        assert [p.kind for p in problems] == ["manifest"] * len(problems) and problems
        assert any(named in p.message and "zarr.json" in p.message for p in problems)


def test_impossible_rows_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "c.zarr"
    _cache(path)
    _edit_header(path, lambda h: h.__setitem__("rows", -5))
    with pytest.raises(fc.ManifestError, match=r"rows = 12 .*got -5.*zarr.json"):
        fc.open_cache(path)
    _edit_header(path, lambda h: h.__setitem__("rows", "12"))
    with pytest.raises(fc.ManifestError, match="rows"):
        fc.open_cache(path)


@pytest.mark.parametrize(
    ("edit", "named"),
    [
        (lambda h: h["blocks"][0].__setitem__("status", "DONE!"), "status in .*'DONE!'"),
        (lambda h: h["blocks"][1].__setitem__("count", 99), "count <= its capacity 4.*got 99"),
        (lambda h: h["blocks"][1].__setitem__("row_start", 0), "start at row 8"),  # overlap
        (lambda h: h["blocks"][0].__setitem__("row_stop", 6), "shard boundaries"),
        (lambda h: h["blocks"][0].__setitem__("count", 5.5), "count to be an integer"),
        (lambda h: h["blocks"][0].__setitem__("checksum", "sha256:nope"), "checksum"),
        (lambda h: h.__setitem__("rows", -5), "rows = 12"),
    ],
)
def test_version_1_block_table_is_checked(tmp_path: Path, edit: Callable, named: str) -> None:
    path = tmp_path / "c.zarr"
    _cache(path)
    _as_version_1(path)
    assert len(fc.open_cache(path).keys) == 9  # the untouched version-1 cache reads
    _edit_header(path, edit)
    with pytest.raises(fc.ManifestError, match=named) as err:
        fc.open_cache(path)
    assert "zarr.json" in str(err.value)


def test_garbage_zarr_json_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "c.zarr"
    _cache(path)
    for garbage in (b"\x89PNG\x00\xff garbage", b"[1, 2, 3]", b'{"zarr_format": 3'):
        (path / GROUP_METADATA).write_bytes(garbage)
        with pytest.raises(fc.NotACacheError, match=r"zarr\.json"):
            fc.open_cache(path)


# ---- digests --------------------------------------------------------------------------------


def test_digests_are_stored_readable_by_plain_zarr(tmp_path: Path) -> None:
    path = tmp_path / "c.zarr"
    keys = _cache(path)
    images = _images(keys)
    plain = zarr.open_array(str(path), path="digests", mode="r")
    assert plain.dtype == np.uint8 and plain.shape == (12, 16)
    cache = fc.open_cache(path)
    for key in keys:  # oracle: hashlib on the image bytes, the row found through plain zarr
        row = cache.row_of(key)
        assert bytes(plain[row]) == hashlib.sha256(images[key]).digest()[:16]
    assert cache.has_digests
    other = _images(keys, salt="-other")
    got = [sample_digest({"": other[k]}) if k.endswith("1") else sample_digest({"": images[k]})
           for k in keys]  # fmt: skip
    bad = cache.digest_mismatches(keys, got)
    assert [keys[i] for i in bad] == [k for k in keys if k.endswith("1")]
    err = cache.digest_mismatch_error(keys[1], got[1], "frames-7.tar")
    assert keys[1] in str(err) and "frames-7.tar" in str(err) and "src0" in str(err)


def test_sample_digest_of_several_cameras() -> None:
    a, b = b"top image", b"wrist image"
    want = hashlib.sha256(hashlib.sha256(a).digest()[:16] + hashlib.sha256(b).digest()[:16])
    assert sample_digest({"wrist": b, "top": a}) == want.digest()[:16]  # sorted camera order
    assert sample_digest({"": a}) == hashlib.sha256(a).digest()[:16]


def test_rows_without_digests_never_mismatch(tmp_path: Path) -> None:
    path = tmp_path / "c.zarr"
    keys = _cache(path, digests=False)
    cache = fc.open_cache(path)
    assert not cache.digests(keys).any()
    assert cache.digest_mismatches(keys, [b"\x01" * 16] * len(keys)) == []


def test_version_1_cache_reads_but_is_not_written(tmp_path: Path) -> None:
    path = tmp_path / "c.zarr"
    keys = _cache(path)
    _as_version_1(path)
    cache = fc.open_cache(path)
    assert not cache.has_digests and cache.keys == keys
    assert not cache.digests(keys).any()
    with pytest.raises(fc.FormatVersionError, match="version 1"):
        fc.open_writer(path)
    # a build into it (exclusive: the build lock) is refused the same way, the lock released
    # once (it was closed twice: "Bad file descriptor"), and the next attempt is refused alike
    spec = fc.CacheSpec((LAYER,), "fp16", 4, {"teacher": "test"})
    plan = fc.plan_blocks([("src0", 6), ("src1", 3)], 4)
    for _ in range(2):
        with pytest.raises(fc.FormatVersionError, match="version 1"):
            fc.create_cache(path, spec, plan, exclusive=True)


def _tar(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_verify_frames_checks_digests_and_survives_bad_tars(tmp_path: Path) -> None:
    path = tmp_path / "c.zarr"
    keys = _cache(path, sizes=(6,))
    frames = tmp_path / "frames"
    frames.mkdir()
    same = _images(keys)
    _tar(frames / "a-same.tar", {f"{k}.png": same[k] for k in keys})
    assert verify_cache(path, frames=[str(frames / "a-same.tar")]).ok
    other = {k: (same[k] if k != keys[2] else b"another image") for k in keys}
    _tar(frames / "b-other.tar", {f"{k}.png": other[k] for k in keys})
    (frames / "c-empty.tar").write_bytes(b"")
    whole = (frames / "a-same.tar").read_bytes()
    (frames / "d-truncated.tar").write_bytes(whole[: len(whole) // 2 + 100])
    report = verify_cache(path, frames=[str(frames)])
    kinds = {(p.kind, Path(p.file).name) for p in report.problems}
    assert ("digest-mismatch", "b-other.tar") in kinds
    assert ("bad-tar", "c-empty.tar") in kinds and ("bad-tar", "d-truncated.tar") in kinds
    mismatch = next(p for p in report.problems if p.kind == "digest-mismatch")
    assert mismatch.keys == (keys[2], keys[2])


# ---- URLs, umask, one build at a time, full disk ---------------------------------------------


@pytest.mark.parametrize("url", ["x://bucket/c.zarr", "http://host/c.zarr", "ftp://h/c"])
def test_urls_are_refused_not_made_folders(tmp_path: Path, monkeypatch, url: str) -> None:
    monkeypatch.chdir(tmp_path)
    spec = fc.CacheSpec((LAYER,), "fp16", 4)
    with pytest.raises(fc.UnsupportedURLError, match=url.split("/")[0]):
        fc.create_cache(url, spec, fc.plan_blocks([("a", 1)], 4))
    with pytest.raises(fc.UnsupportedURLError):
        fc.open_cache(url)
    assert list(tmp_path.iterdir()) == []  # no ./x:/bucket/c.zarr


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_new_cache_respects_the_umask(tmp_path: Path, umask: int) -> None:
    old = os.umask(umask)
    try:
        _cache(tmp_path / "c.zarr", sizes=(2,))
    finally:
        os.umask(old)
    for p in [tmp_path / "c.zarr", tmp_path / "c.zarr" / "features"]:
        assert p.stat().st_mode & 0o777 == 0o777 & ~umask


def test_second_build_is_refused_without_advising_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "c.zarr"
    spec = fc.CacheSpec((LAYER,), "fp16", 4)
    plan = fc.plan_blocks([("a", 6)], 4)
    winner = fc.create_cache(path, spec, plan, exclusive=True)
    bw = winner.open_block(0)
    bw.append([f"k{i}" for i in range(6)], {"x": np.ones((6, 4, 8), np.float32)})
    winner.mark_done(bw.finish())
    for overwrite in (False, True):
        with pytest.raises(fc.CacheBusyError) as err:
            fc.create_cache(path, spec, plan, overwrite=overwrite, exclusive=True)
        assert "overwrite" not in str(err.value) and str(path) in str(err.value)
    assert fc.open_cache(path).keys == [f"k{i}" for i in range(6)]  # the winner's work is kept
    winner.close()
    fc.create_cache(path, spec, plan, exclusive=True).close()  # free again once released


def test_lock_holder_is_named(tmp_path: Path) -> None:
    fd = acquire_build_lock(tmp_path, tmp_path / "c.zarr")
    try:
        with pytest.raises(fc.CacheBusyError, match=f"pid {os.getpid()}"):
            acquire_build_lock(tmp_path, tmp_path / "c.zarr")
    finally:
        os.close(fd)


def test_full_disk_names_the_file_and_keeps_done_blocks(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "c.zarr"
    spec = fc.CacheSpec((LAYER,), "fp16", 4)
    writer = fc.create_cache(path, spec, fc.plan_blocks([("a", 4), ("b", 8)], 4))
    bw = writer.open_block(0)
    bw.append([f"a{i}" for i in range(4)], {"x": np.ones((4, 4, 8), np.float32)})
    writer.mark_done(bw.finish())
    before = (path / GROUP_METADATA).read_bytes()
    real_put = LocalStore.put

    def full(self: LocalStore, key: str, data: bytes) -> None:
        if key.startswith("features/") and "/c/2/" in key:  # the disk fills during shard 2
            raise OSError(errno.ENOSPC, "No space left on device")
        real_put(self, key, data)

    monkeypatch.setattr(LocalStore, "put", full)
    bw = writer.open_block(1)
    with pytest.raises(fc.StorageError, match=r"features/x/c/2/0/0.*No space left.*pending"):
        # shard objects are written by a pool: the failure surfaces by finish at the latest
        bw.append([f"b{i}" for i in range(8)], {"x": np.ones((8, 4, 8), np.float32)})
        bw.finish()
    monkeypatch.undo()
    assert (path / GROUP_METADATA).read_bytes() == before  # the manifest was not touched
    cache = fc.open_cache(path)
    assert cache.keys == [f"a{i}" for i in range(4)]
    assert cache.read(["a3"], "x").float().eq(1).all()
    assert verify_cache(path).problems[0].kind == "pending"  # block 1 is simply not done
