"""`featurecache bench gpu_build --quick`: the bare forward and the local build of a DINOv2 saved
from its config run, and the build's ratio is its own frames/s over the bare forward's."""

from __future__ import annotations

import json

from featurecache.benchmarks import gpu_build


def test_bench_gpu_build_quick(tmp_path) -> None:
    rows = gpu_build.run(json_path=tmp_path / "g.json", quick=True)
    bare, *builds = rows
    assert bare.provider == "bare forward" and bare.unit == "frames/s" and bare.median > 0
    assert builds and all(r.provider.startswith("local build") for r in builds)
    for r in builds:
        assert r.extra["x_bare_forward"] == r.median / bare.median
        assert r.extra["end_to_end_fps"] > 0 and r.extra["cpu_ms_per_frame"] > 0
    assert len(json.loads((tmp_path / "g.json").read_text())) == len(rows)
