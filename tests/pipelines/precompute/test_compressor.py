"""`featurecache build --compressor`: a local build without a compressor holds the same decoded
arrays and block checksums as the default zstd:3 build (array for array, as plain zarr-python
reads both), records its compressor in the header and the arrays' zarr.json, and a resume with
another compressor is refused like any spec mismatch."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from featurecache import open_cache
from featurecache.cli import main
from featurecache.errors import SpecMismatchError
from featurecache.pipelines.precompute.config import BuildConfig, BuildError
from featurecache.pipelines.precompute.precompute import build_cache

from ._build_helpers import assert_same_cache


def _args(frames: Path, out: Path, *extra: str) -> list[str]:
    return ["build", str(frames), "--teacher", "efficientnet-lite0@64", "--layers", "4",
            "--out", str(out), "--batch-size", "8", "--shard-rows", "6", "--local", "--quiet",
            *extra]  # fmt: skip


def _bytes(path: Path, array: str) -> int:
    return sum(f.stat().st_size for f in (path / array / "c").rglob("*") if f.is_file())


def test_build_without_compressor_equals_zstd(sample_data_dir: Path, tmp_path: Path) -> None:
    frames = sample_data_dir / "frames-000001.tar"  # 16 frames: 2 whole shards of 6, 1 of 4
    zstd, none = tmp_path / "zstd", tmp_path / "none"
    for out, extra in ((zstd, ()), (none, ("--compressor", "none"))):
        result = CliRunner().invoke(main, _args(frames, out, *extra))
        assert result.exit_code == 0, result.output
    assert_same_cache(zstd, none)  # every array as plain zarr reads it, and the checksums
    a, b = open_cache(zstd), open_cache(none)
    assert a.keys == b.keys and len(a.keys) == 16
    assert a.read(a.keys, "4").equal(b.read(b.keys, "4"))  # the direct decoder of each chain
    assert a.spec.compressor == "zstd:3" and b.spec.compressor == "none"
    header = json.loads((none / "zarr.json").read_text())["attributes"]["featurecache"]
    assert header["compressor"] == "none"
    meta = json.loads((none / "features" / "4" / "zarr.json").read_text())
    inner = meta["codecs"][0]["configuration"]["codecs"]
    assert [c["name"] for c in inner] == ["bytes", "crc32c"]
    assert _bytes(none, "features/4") > _bytes(zstd, "features/4")
    assert "compressor none" in CliRunner().invoke(main, ["inspect", str(none)]).output
    verified = CliRunner().invoke(main, ["verify", str(none)])  # reads through zarr-python
    assert verified.exit_code == 0 and "OK: 1 done block(s), 16 rows" in verified.output

    # resuming with another compressor is refused, from the CLI and from Python
    result = CliRunner().invoke(main, _args(frames, none))
    assert result.exit_code != 0 and "compressor: existing 'none' vs requested 'zstd:3'" in (
        result.output
    )
    config = BuildConfig(frames=[str(frames)], teacher="efficientnet-lite0@64", layers=["4"],
                         out=zstd, shard_rows=6, local=True, progress=False,
                         compressor="zstd:1")  # fmt: skip
    with pytest.raises(SpecMismatchError, match="compressor"):
        build_cache(config)


def test_compressor_option_is_checked_and_taught(tmp_path: Path) -> None:
    with pytest.raises(BuildError, match=r"Expected --compressor 'none' or 'zstd:L'.*'zstd:0'"):
        BuildConfig(frames=["x"], teacher="t", layers=["4"], out=tmp_path, compressor="zstd:0")
    result = CliRunner().invoke(main, ["build", "x", "--teacher", "t", "--layers", "4", "--out",
                                       str(tmp_path / "c"), "--compressor", "lz4"])  # fmt: skip
    assert result.exit_code != 0 and "Expected --compressor" in result.output
    text = " ".join(CliRunner().invoke(main, ["build", "--help"]).output.split())
    assert "--compressor none|zstd:L" in text and "[default: zstd:3]" in text
