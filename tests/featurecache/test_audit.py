"""inspect and verify, through the Python API and the CLI: each damage is found and named with
its block, shard file and key range; exit status 0 only for a sound cache."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import zarr
from click.testing import CliRunner

import featurecache as fc
from featurecache.audit import inspect_cache, verify_cache
from featurecache.cli import main
from featurecache.samples import iter_keys


def _flip(file: Path, at: int) -> None:
    raw = bytearray(file.read_bytes())
    raw[at] ^= 0x5A
    file.write_bytes(bytes(raw))


def _tar(path: Path, keys: list[str]) -> Path:
    with tarfile.open(path, "w") as tar:
        for key in keys:
            for ext in ("png", "json"):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = 2
                tar.addfile(info, io.BytesIO(b"{}"))
    return path


def test_inspect(build_cache) -> None:
    path, _ = build_cache((20, 5), codec="int8")
    info = inspect_cache(path)
    assert info["codec"] == "int8" and info["rows"] == 32 and info["rows_written"] == 25
    assert (info["blocks_done"], info["blocks_total"]) == (2, 2)
    layer = info["layers"][0]
    assert layer["name"] == "4" and layer["grid"] == [4, 4]
    assert layer["decoded_bytes"] == 25 * 16 * 64 + 25 * 16 * 4
    assert info["size_on_disk_bytes"] > 0 and info["compression_ratio"] > 0
    out = CliRunner().invoke(main, ["inspect", str(path), "--json"])
    assert out.exit_code == 0 and json.loads(out.output)["rows_written"] == 25
    out = CliRunner().invoke(main, ["inspect", str(path)])
    assert out.exit_code == 0 and "2/2 done" in out.output


def test_verify_sound_cache(build_cache, tmp_path: Path) -> None:
    path, data = build_cache((20, 5), codec="int8")
    report = verify_cache(path)
    assert report.ok and report.blocks_checked == 2 and report.rows_checked == 25
    frames = _tar(tmp_path / "frames-000000.tar", list(data))
    assert list(iter_keys(frames)) == list(data)
    assert verify_cache(path, frames=[str(tmp_path)]).frames_checked == 25
    brace = str(tmp_path / "frames-{000000..000000}.tar")
    assert verify_cache(path, frames=[brace, str(tmp_path / "*.tar")]).frames_checked == 25  # once
    with pytest.raises(fc.FeatureCacheError, match="nothing-here"):
        verify_cache(path, frames=[str(tmp_path / "nothing-here-*.tar")])
    out = CliRunner().invoke(main, ["verify", str(path), "--frames", str(frames), "--json"])
    assert out.exit_code == 0, out.output
    assert json.loads(out.output)["ok"] is True


def test_verify_names_a_corrupted_shard(build_cache) -> None:
    path, _ = build_cache((20, 5))
    file = path / "features/blk.2/c/1/0/0"
    _flip(file, 12)
    report = verify_cache(path)
    assert not report.ok
    [problem] = report.problems
    assert (problem.kind, problem.block, problem.file) == ("corrupt", 0, str(file))
    assert problem.rows == (8, 16) and problem.keys == ("s00-0008", "s00-0015")
    assert "checksum" in problem.message  # zarr's crc32c
    out = CliRunner().invoke(main, ["verify", str(path)])
    assert out.exit_code == 1
    assert "block 0 (frames-000000.tar)" in out.output and str(file) in out.output


def test_verify_names_a_truncated_and_a_missing_shard(build_cache) -> None:
    path, _ = build_cache((20, 5))
    file = path / "features/4/c/3/0/0"  # block 1's only shard
    file.write_bytes(file.read_bytes()[:-40])
    (path / "keys/c/0/0").unlink()
    problems = {(p.kind, p.block, p.file) for p in verify_cache(path).problems}
    assert problems == {
        ("corrupt", 1, str(file)),
        ("missing-file", 0, str(path / "keys/c/0/0")),
    }


def test_verify_checksum_nonfinite_duplicates_pending_frames(build_cache, tmp_path: Path) -> None:
    path, data = build_cache((10, 6))
    feats = zarr.open_array(str(path), path="features/4", mode="r+")
    row = feats[3]
    row[0, 0] = np.inf
    feats[3] = row  # bypass the writer: value and checksum now disagree
    record = path / "featurecache/done/1.json"  # block 1's completion record, edited by hand
    record.write_text(
        json.dumps({**json.loads(record.read_text()), "checksum": "sha256:" + "0" * 64})
    )
    kinds = sorted((p.kind, p.block) for p in verify_cache(path).problems)
    assert kinds == [("checksum", 0), ("checksum", 1), ("non-finite", 0)]
    frames = _tar(tmp_path / "f.tar", [*data, "never-built"])
    missing = [p for p in verify_cache(path, frames=[frames]).problems if p.kind == "missing-frame"]
    assert len(missing) == 1 and "never-built" in missing[0].message


def test_verify_duplicate_keys_and_pending(tmp_path: Path) -> None:
    spec = fc.CacheSpec((fc.LayerSpec("x", 2, 4),), "fp16", 4)
    writer = fc.create_cache(
        tmp_path / "c.zarr", spec, fc.plan_blocks([("a", 2), ("b", 2), ("c", 1)], 4)
    )
    for b in (0, 1):
        bw = writer.open_block(b)
        bw.append(["same", f"k{b}"], {"x": np.ones((2, 2, 4))})
        writer.mark_done(bw.finish())
    kinds = sorted((p.kind, p.block) for p in verify_cache(tmp_path / "c.zarr").problems)
    assert kinds == [("duplicate-key", 1), ("pending", 2)]
    with pytest.raises(fc.InvalidKeyError, match=r"'same' at rows 0 \(block 0\) and 4 \(block 1\)"):
        fc.open_cache(tmp_path / "c.zarr").row_of("k0")


def test_cli_errors_name_the_path(tmp_path: Path) -> None:
    out = CliRunner().invoke(main, ["verify", str(tmp_path)])
    assert out.exit_code == 1 and str(tmp_path) in out.output and "zarr.json" in out.output
    out = CliRunner().invoke(main, ["inspect", str(tmp_path), "--json"])
    assert out.exit_code == 1 and json.loads(out.output)["ok"] is False
