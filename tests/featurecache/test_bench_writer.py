"""`featurecache bench writer --quick`: every kind and compressor measured, zarr-python and the
direct encoder checked equal on the same shard (the benchmark raises otherwise), sizes coherent."""

from __future__ import annotations

from featurecache.benchmarks import writer


def test_bench_writer_quick(tmp_path) -> None:
    rows = writer.run(json_path=tmp_path / "w.json", quick=True)
    assert [(r.what, r.provider) for r in rows] == [
        (kind, c) for kind in ("null teacher (randn)", "massive") for c in writer.COMPRESSORS
    ]
    by = {(r.what, r.provider): r.extra for r in rows}
    for kind in ("null teacher (randn)", "massive"):
        assert by[(kind, "zstd:3")]["disk_vs_zstd3"] == 1
        assert by[(kind, "none")]["disk_KiB_per_frame"] > by[(kind, "zstd:3")]["disk_KiB_per_frame"]
    assert all(r.median > 0 and r.extra["encode_direct_ms"] > 0 for r in rows)
    assert (tmp_path / "w.json").exists()
