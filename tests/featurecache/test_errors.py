"""Each bad input is a typed error whose message names the thing at fault, and leaves what was
written undamaged."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import zarr

import featurecache as fc
from featurecache.format import ATTRS_KEY, FORMAT_VERSION


def _spec(**kw) -> fc.CacheSpec:
    base = dict(layers=(fc.LayerSpec("x", 4, 8),), codec="fp16", shard_rows=4, fingerprint={"m": 1})
    return fc.CacheSpec(**{**base, **kw})


def _feats(n: int, tokens: int = 4, dim: int = 8) -> dict[str, np.ndarray]:
    return {"x": np.ones((n, tokens, dim), np.float32)}


def test_not_a_cache(tmp_path: Path) -> None:
    with pytest.raises(fc.NotACacheError, match="found none"):
        fc.open_cache(tmp_path)
    with pytest.raises(fc.NotACacheError, match="directory"):
        fc.open_cache(tmp_path / "missing")
    zarr.create_group(str(tmp_path / "plain.zarr"))
    with pytest.raises(fc.NotACacheError, match="not a featurecache cache"):
        fc.open_cache(tmp_path / "plain.zarr")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "precious.txt").write_text("keep me")
    with pytest.raises(fc.NotACacheError):
        fc.create_cache(tmp_path / "other", _spec(), fc.plan_blocks([("a", 3)], 4), overwrite=True)
    assert (tmp_path / "other" / "precious.txt").read_text() == "keep me"


def test_newer_version(tmp_path: Path) -> None:
    path = tmp_path / "c.zarr"
    fc.create_cache(path, _spec(), fc.plan_blocks([("a", 3)], 4))
    meta = json.loads((path / "zarr.json").read_text())
    meta["attributes"][ATTRS_KEY]["version"] = FORMAT_VERSION + 1
    (path / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(fc.FormatVersionError, match=f"got {FORMAT_VERSION + 1}"):
        fc.open_cache(path)
    with pytest.raises(fc.FormatVersionError):
        fc.open_writer(path)


def test_unknown_layer_and_key(build_cache) -> None:
    path, _ = build_cache((10,))
    cache = fc.open_cache(path)
    with pytest.raises(
        fc.UnknownLayerError, match=r"Expected a layer in \['4', 'blk.2'\], got 'nope'"
    ):
        cache.read(["s00-0000"], "nope")
    with pytest.raises(fc.UnknownKeyError, match="'missing-key'"):
        cache.read(["s00-0000", "missing-key"], "4")
    with pytest.raises(KeyError):  # also a KeyError, for dict-like callers
        cache.row_of("missing-key")


def test_shape_dtype_key_validation(tmp_path: Path) -> None:
    writer = fc.create_cache(tmp_path / "c.zarr", _spec(), fc.plan_blocks([("a", 6)], 4))
    bw = writer.open_block(0)
    with pytest.raises(
        fc.ShapeMismatchError, match=r"layer 'x' features of shape \(2, 4, 8\), got \(2, 4, 7\)"
    ):
        bw.append(["a", "b"], _feats(2, dim=7))
    with pytest.raises(
        fc.ShapeMismatchError, match="Expected float features for layer 'x', got int64"
    ):
        bw.append(["a", "b"], {"x": np.ones((2, 4, 8), np.int64)})
    with pytest.raises(fc.ShapeMismatchError, match="every layer"):
        bw.append(["a"], {})
    with pytest.raises(fc.UnknownLayerError, match="unknown"):
        bw.append(["a"], {**_feats(1), "y": np.ones((1, 4, 8))})
    with pytest.raises(fc.InvalidKeyError, match="at most key_bytes=128"):
        bw.append(["k" * 129], _feats(1))
    with pytest.raises(fc.InvalidKeyError, match="non-empty"):
        bw.append([""], _feats(1))
    with pytest.raises(fc.InvalidKeyError, match="'a' twice"):
        bw.append(["a", "a"], _feats(2))
    bad = _feats(2)
    bad["x"][1, 0, 0] = np.nan
    with pytest.raises(fc.InvalidFeaturesError, match="key 'b'"):
        bw.append(["a", "b"], bad)
    with pytest.raises(fc.InvalidFeaturesError, match="fp16-range"):
        bw.append(["a"], {"x": np.full((1, 4, 8), 1e6, np.float32)})
    bw.append(["a", "b"], _feats(2))  # nothing of the failed calls was buffered
    with pytest.raises(fc.InvalidKeyError, match="'a' twice"):
        bw.append(["a"], _feats(1))
    with pytest.raises(fc.BlockCapacityError, match="at most 8 rows"):
        bw.append([f"z{i}" for i in range(7)], _feats(7))
    assert writer.mark_done(bw.finish()).count == 2


def test_block_already_done_and_overwrite(build_cache) -> None:
    path, _data = build_cache((10, 4))
    writer = fc.open_writer(path)
    with pytest.raises(fc.BlockAlreadyDoneError, match=r"block 1 .*already done.*overwrite=True"):
        writer.open_block(1)
    assert fc.open_cache(path).read(["s01-0000"], "4").shape == (1, 16, 64)  # untouched
    bw = writer.open_block(1, overwrite=True)
    assert not writer.manifest.block(1).done  # pending while it is rewritten
    with pytest.raises(fc.BlockNotDoneError):  # its old rows are no longer readable
        fc.open_cache(path).read(["s01-0000"], "4")
    layers = fc.open_cache(path).spec.layers
    bw.append(["new"], {x.name: np.zeros((1, x.tokens, x.dim), np.float32) for x in layers})
    writer.mark_done(bw.finish())
    cache = fc.open_cache(path)
    assert "new" in cache and "s01-0000" not in cache and cache.read(["new"], "4").abs().sum() == 0


def test_key_of_pending_block(tmp_path: Path) -> None:
    writer = fc.create_cache(tmp_path / "c.zarr", _spec(), fc.plan_blocks([("a", 3), ("b", 5)], 4))
    bw = writer.open_block(1)
    bw.append([f"b{i}" for i in range(5)], _feats(5))  # first shard flushed, block not done
    with pytest.raises(fc.BlockNotDoneError, match=r"'b1'.*block 1 \(b\) which is pending"):
        fc.open_cache(tmp_path / "c.zarr").read(["b1"], "x")


def test_fingerprint_and_plan_mismatch(tmp_path: Path) -> None:
    path = tmp_path / "c.zarr"
    plan = fc.plan_blocks([("a", 3)], 4)
    fc.create_cache(path, _spec(), plan)
    with pytest.raises(
        fc.SpecMismatchError, match=r"fingerprint: existing \{'m': 1\} vs requested \{'m': 2\}"
    ):
        fc.create_cache(path, _spec(fingerprint={"m": 2}), plan)
    with pytest.raises(fc.SpecMismatchError, match="codec: existing 'fp16' vs requested 'int8'"):
        fc.create_cache(path, _spec(codec="int8"), plan)
    with pytest.raises(fc.SpecMismatchError, match="block plan"):
        fc.create_cache(path, _spec(), fc.plan_blocks([("a", 5)], 4))
    writer = fc.create_cache(path, _spec(fingerprint={"m": 2}), plan, overwrite=True)
    assert writer.spec.fingerprint == {"m": 2}


def test_bad_specs() -> None:
    with pytest.raises(fc.SpecError, match="layer name"):
        fc.LayerSpec("a/b/c", 4, 8)
    with pytest.raises(fc.SpecError, match="tokens"):
        fc.LayerSpec("a", 0, 8)
    with pytest.raises(fc.SpecError, match="codec"):
        _spec(codec="bf16")
    with pytest.raises(fc.SpecError, match="distinct"):
        _spec(layers=(fc.LayerSpec("a", 1, 1), fc.LayerSpec("a", 1, 1)))
    with pytest.raises(fc.UnknownLayerError):
        _spec().layer("y")


def test_corrupt_shard_read(build_cache) -> None:
    path, _data = build_cache((10,))
    shard = path / "features" / "4" / "c" / "1" / "0" / "0"
    raw = bytearray(shard.read_bytes())
    raw[10] ^= 0xFF
    shard.write_bytes(bytes(raw))
    cache = fc.open_cache(path)
    cache.read(["s00-0000", "s00-0009"], "4")  # shard 0 is fine, and so is row 9's chunk
    with pytest.raises(fc.CorruptShardError, match=r"features/4/c/1/0/0.*block 0.*crc32c"):
        cache.read(["s00-0008"], "4")  # byte 10 of the file is in row 8's chunk
    with pytest.raises(fc.CorruptShardError, match=r"features/4/c/1/0/0.*block 0"):
        fc.open_cache(path, direct=False).read(["s00-0009"], "4")  # zarr decodes the shard
    shard.write_bytes(bytes(raw[:-20]))  # truncated: the index at the end is damaged
    with pytest.raises(fc.CorruptShardError, match="index"):
        fc.open_cache(path).read(["s00-0009"], "4")
    shard.unlink()
    with pytest.raises(fc.CorruptShardError, match="no such file"):
        fc.open_cache(path).read(["s00-0009"], "4")


def test_unknown_block_and_row(build_cache) -> None:
    path, _ = build_cache((10,))
    with pytest.raises(fc.UnknownBlockError, match=r"block index in \[0, 1\), got 3"):
        fc.open_writer(path).open_block(3)
    with pytest.raises(IndexError):
        fc.open_cache(path).read_rows_raw([10_000], "4")
    with pytest.raises(fc.BlockNotDoneError, match="row 12"):
        fc.open_cache(path).read_rows_raw([12], "4")  # a padding row
