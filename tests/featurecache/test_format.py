"""The spec types and block planning (pure functions, no files)."""

from __future__ import annotations

import pytest

import featurecache as fc
from featurecache.manifest import Manifest


def test_plan_blocks_start_on_shard_boundaries() -> None:
    plan = fc.plan_blocks([("a", 10), ("b", 8), ("c", 0), ("d", 1)], 8)
    assert [(b.row_start, b.row_stop, b.count) for b in plan] == [
        (0, 16, 10),
        (16, 24, 8),
        (24, 24, 0),
        (24, 32, 1),
    ]
    assert all(b.row_start % 8 == 0 and b.status == "pending" for b in plan)
    with pytest.raises(fc.SpecError):
        fc.plan_blocks([("a", -1)], 8)


def test_manifest_json_round_trip() -> None:
    spec = fc.CacheSpec(
        (fc.LayerSpec("16", 256, 1024, (16, 16)), fc.LayerSpec("x", 1, 2)),
        "int8",
        32,
        {"model": "m", "size": (256, 256)},
        key_bytes=64,
    )
    assert spec.fingerprint == {"model": "m", "size": [256, 256]}  # JSON-canonical
    m = Manifest(spec, tuple(fc.plan_blocks([("a", 40)], 32)), 64)
    assert Manifest.from_json(m.to_json()) == m
    assert spec.layer("16").grid == (16, 16)


def test_direct_layout_only_for_our_chains(build_cache) -> None:
    import json

    from featurecache.chunk_codec import direct_layout

    path, _ = build_cache((4,), codec="int8")
    meta = {name: json.loads((path / name / "zarr.json").read_text()) for name in
            ("features/4", "scales/4", "keys")}  # fmt: skip
    assert direct_layout(meta["features/4"]).sharded
    assert not direct_layout(meta["scales/4"]).sharded
    assert not direct_layout(meta["keys"]).sharded
    other = json.loads(json.dumps(meta["features/4"]))
    other["codecs"][0]["configuration"]["codecs"][1] = {"name": "blosc", "configuration": {}}
    assert direct_layout(other) is None  # read through zarr-python instead


def test_package_exports_are_lazy_and_complete() -> None:
    import subprocess
    import sys

    code = (
        "import sys, featurecache\n"
        "assert 'zarr' not in sys.modules and 'torch' not in sys.modules\n"
        "assert sorted(featurecache.__all__) == sorted(featurecache._MODULE_OF)\n"
        "[getattr(featurecache, n) for n in featurecache.__all__]\n"
        "assert 'torch' not in sys.modules  # the reader imports torch only to return tensors\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
