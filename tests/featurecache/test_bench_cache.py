"""The cache benchmark runs end to end at tiny sizes (quick mode records nothing)."""

from __future__ import annotations

from featurecache.benchmarks import cache as bench


def test_bench_cache_quick(tmp_path) -> None:
    rows = bench.run(json_path=tmp_path / "cache.json", quick=True)
    names = {(r.what.split(" b")[0], r.provider) for r in rows}
    assert ("read global-shuffled", "fp16") in names and ("read sequential", "int8") in names
    assert all(r.median > 0 for r in rows)
    assert ("read sequential", "int8c") in names
    cosine = {(r.what.split(" ")[1], r.provider): r.median for r in rows if r.unit == "mean cos"}
    assert cosine[("gaussian", "int8")] >= 0.9999 and cosine[("gaussian", "int8c")] >= 0.9999
    assert cosine[("massive", "int8c")] > cosine[("massive", "int8")]
    assert (tmp_path / "cache.json").exists()
