"""benchmarks/train.py runs end to end at quick sizes.

Slow: it trains 2 students x 4 modes in 2 rounds.
"""

from __future__ import annotations

import json

import pytest


@pytest.mark.slow
def test_train_benchmark_quick(tmp_path) -> None:
    from featurecache.benchmarks.train import run

    rows = run(json_path=str(tmp_path / "train.json"), quick=True)
    providers = [r.provider for r in rows]
    assert providers.count("cache") == 4 and providers.count("resident") == 4  # 2 students
    assert all(r.median > 0 for r in rows if r.unit in ("steps/s", "samples/s"))
    assert all("peak_mib" in r.extra for r in rows if r.unit == "steps/s")
    assert len(json.loads((tmp_path / "train.json").read_text())) == len(rows)
