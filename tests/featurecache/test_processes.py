"""Crash safety and concurrency with real processes: SIGKILL a writer mid-block and rewrite the
block (compare with an uninterrupted write, file for file); two processes writing different
blocks at once; a process killed while it commits completion records leaves every record whole.
"""

from __future__ import annotations

import os
import runpy
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

import featurecache as fc
from featurecache.completion import load_state
from featurecache.store import open_store

SCRIPT = Path(__file__).with_name("writer_proc.py")
PROC = runpy.run_path(str(SCRIPT))
SPEC = fc.CacheSpec((fc.LayerSpec("a", 6, 32), fc.LayerSpec("b", 3, 16)), "int8", 8, {"m": "t"})
SIZES = [("frames-0.tar", 20), ("frames-1.tar", 21), ("frames-2.tar", 9), ("frames-3.tar", 16)]


def _spawn(path: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(SCRIPT), str(path), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def read_manifest(path: Path) -> fc.Manifest:
    return load_state(open_store(path)).manifest()


def _files(path: Path) -> dict[str, bytes]:
    out = {}
    for root, _, files in os.walk(path):
        for f in files:
            rel = os.path.relpath(os.path.join(root, f), path)
            # a write killed mid-way leaves a temp file, not an object (LocalStore.list skips
            # them; a build's resume deletes them under its lock)
            if f.startswith(".") and f.endswith(".tmp"):
                continue
            if rel not in ("featurecache.lock", "zarr.json"):
                out[rel] = Path(root, f).read_bytes()
    return out


def _check_data(path: Path, sizes: list[tuple[str, int]] = SIZES) -> None:
    cache = fc.open_cache(path)
    for b, (_, n) in enumerate(sizes):
        keys, feats = PROC["block_data"](SPEC, b, n)
        for name, x in feats.items():
            got = cache.read(keys, name).numpy()
            scale = np.abs(x).max(-1, keepdims=True) / 127
            assert (np.abs(got - x) <= scale / 2 + 1e-6).all(), (b, name)


def test_sigkill_mid_block_then_rewrite(tmp_path: Path) -> None:
    plan = fc.plan_blocks(SIZES[:2], 8)
    crashed, clean = tmp_path / "crashed.zarr", tmp_path / "clean.zarr"
    for path in (crashed, clean):
        fc.create_cache(path, SPEC, plan)
        PROC["write_block"](str(path), 0)
    proc = _spawn(crashed, "1", "--sleep", "0.2")
    for line in proc.stdout:  # wait until two shards' worth of rows went through append
        if line.startswith("appended 1 15"):
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert (crashed / "features/a/c/2/0/0").exists()  # block 1's first shard was on disk
    manifest = read_manifest(crashed)
    assert manifest.blocks[0].done and not manifest.blocks[1].done
    cache = fc.open_cache(crashed)
    assert len(cache.keys) == 20
    try:
        cache.read(["b1-00001"], "a")
        raise AssertionError("read a key of a pending block")
    except fc.BlockNotDoneError as exc:
        assert "block 1" in str(exc)
    PROC["write_block"](str(crashed), 1)  # rewrite the interrupted block whole
    PROC["write_block"](str(clean), 1)
    assert read_manifest(crashed) == read_manifest(clean)
    assert _files(crashed) == _files(clean)
    for name in ("keys", "features/a", "scales/a", "features/b", "scales/b"):
        np.testing.assert_array_equal(
            zarr.open_array(str(crashed), path=name)[:], zarr.open_array(str(clean), path=name)[:]
        )


def test_two_processes_write_different_blocks(tmp_path: Path) -> None:
    path = tmp_path / "c.zarr"
    fc.create_cache(path, SPEC, fc.plan_blocks(SIZES, 8))
    procs = [_spawn(path, "0", "2", "--sleep", "0.01"), _spawn(path, "1", "3", "--sleep", "0.01")]
    for p in procs:
        _out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    manifest = read_manifest(path)
    assert [b.done for b in manifest.blocks] == [True] * 4
    assert [b.count for b in manifest.blocks] == [n for _, n in SIZES]
    _check_data(path)
    from featurecache.audit import verify_cache

    assert verify_cache(path).ok


def test_kill_during_record_commits(tmp_path: Path) -> None:
    """A process committing completion records as fast as it can is SIGKILLed: every record
    there is whole (no partial JSON), and commits go on (there is no lock to leave held)."""
    path = tmp_path / "c.zarr"
    fc.create_cache(path, SPEC, fc.plan_blocks([(f"s{i}", 1) for i in range(5000)], 8))
    code = (
        "import sys\n"
        "from featurecache.block_table import DoneRecord\n"
        "from featurecache.completion import commit_record\n"
        "from featurecache.store import open_store\n"
        "st = open_store(sys.argv[1])\n"
        "for i in range(5000):\n"
        "    commit_record(st, DoneRecord(index=i, count=1, checksum='sha256:' + '%064x' % i,\n"
        "                                 skipped=tuple(f'k{j}' for j in range(i % 50))))\n"
        "    if i == 3: print('running', flush=True)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(path)], stdout=subprocess.PIPE)
    assert proc.stdout.readline().strip() == b"running"
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    state = load_state(open_store(path))  # parses every record: none is torn
    done = state.table.done_indices().tolist()
    assert done == list(range(len(done))) and 3 < len(done) < 5000
    assert all(state.table.block(i).skipped == tuple(f"k{j}" for j in range(i % 50)) for i in done)
    writer = fc.open_writer(path)
    bw = writer.open_block(4999)
    bw.append(["x"], {"a": np.ones((1, 6, 32)), "b": np.ones((1, 3, 16))})
    assert writer.mark_done(bw.finish()).done


@pytest.mark.slow
@pytest.mark.parametrize("kill_after", ["appended 1 5", "appended 1 10", "appended 1 21"])
def test_sigkill_at_several_points(tmp_path: Path, kill_after: str) -> None:
    """Kill after the first batch (nothing flushed), mid-block, and after the last append (the
    final partial shard may or may not be written); the rewrite always matches a clean write."""
    plan = fc.plan_blocks(SIZES[:2], 8)
    crashed, clean = tmp_path / "crashed.zarr", tmp_path / "clean.zarr"
    for path in (crashed, clean):
        fc.create_cache(path, SPEC, plan)
    proc = _spawn(crashed, "1", "--sleep", "0.3")
    for line in proc.stdout:
        if line.startswith(kill_after):
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not read_manifest(crashed).blocks[1].done
    for path in (crashed, clean):
        PROC["write_block"](str(path), 1)
        PROC["write_block"](str(path), 0)
    assert read_manifest(crashed) == read_manifest(clean)
    assert _files(crashed) == _files(clean)
    _check_data(crashed, SIZES[:2])


@pytest.mark.slow
def test_four_processes_eight_blocks(tmp_path: Path) -> None:
    sizes = [(f"frames-{i}.tar", 9 + 3 * i) for i in range(8)]
    path = tmp_path / "c.zarr"
    fc.create_cache(path, SPEC, fc.plan_blocks(sizes, 8))
    procs = [_spawn(path, str(i), str(i + 4)) for i in range(4)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    manifest = read_manifest(path)
    assert all(b.done for b in manifest.blocks)
    assert [b.count for b in manifest.blocks] == [n for _, n in sizes]
    _check_data(path, sizes)
    from featurecache.audit import verify_cache

    assert verify_cache(path).ok
