"""The target-codec training benchmark runs end to end at tiny sizes (quick mode records
nothing): three caches, three runs, one row per quantized codec."""

from __future__ import annotations

import pytest

from featurecache.benchmarks import target_codecs as bench


@pytest.mark.slow
def test_bench_target_codecs_quick(tmp_path) -> None:
    rows = bench.run(json_path=tmp_path / "codecs.json", quick=True)
    assert [r.provider for r in rows] == [bench.CONTROL, "int8", "int8c", bench.INT4] * 2
    assert all(0 <= r.median < 0.1 for r in rows)  # a quantized target moves the cosine little
    assert (tmp_path / "codecs.json").exists()
