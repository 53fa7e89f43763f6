"""The training join's read-ahead: the same samples, skip reports and errors as reading each chunk
when it is due (the oracle: read_ahead=0), with the next chunk's read started before the current
chunk's samples are consumed."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from featurecache.errors import OptionError, UnknownKeyError
from featurecache.pipelines.training import join as join_module
from featurecache.pipelines.training.join import CacheJoin
from featurecache.samples import iter_samples
from featurecache.spec import LayerSpec

from ._train_helpers import all_keys, key_features, one_thread, write_cache

LAYER = LayerSpec("mid", 16, 24, (4, 4))
CHUNK = 8  # keys per cache read in these tests: the 48 sample frames make 6 chunks


@pytest.fixture(autouse=True)
def _small_chunks(monkeypatch):
    monkeypatch.setattr(join_module, "JOIN_CHUNK", CHUNK)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    yield from one_thread()


@pytest.fixture(scope="module")
def holey(shards, tmp_path_factory) -> tuple[Path, list[str]]:
    keys = all_keys(shards)
    dropped = [keys[19], keys[40], keys[41]]  # chunks 2 and 5
    path = tmp_path_factory.mktemp("read-ahead") / "cache"
    write_cache(path, shards, [LAYER], key_features("mid", 16, 24), drop_keys=dropped)
    return path, dropped


class _Counted:
    """The stream's samples as the join receives them ({key, source, encoded}), counting how many
    were pulled from upstream."""

    def __init__(self, shards: list[Path]) -> None:
        self.shards, self.pulled = shards, 0

    def __iter__(self) -> Iterator[dict]:
        for shard in self.shards:
            for s in iter_samples(shard):
                self.pulled += 1
                yield {"key": s.key, "source": str(shard), "encoded": {"": s.image()[0]}}


def _joined(shards, cache, read_ahead: int, on_missing: str = "skip") -> list[tuple]:
    join = CacheJoin(cache, "mid", on_missing, read_ahead=read_ahead)  # type: ignore[arg-type]
    out = []
    for s in join(_Counted(shards)):
        target = None if s["key"] is None else s["target"]
        out.append((s["key"], s["missing"], s["mismatched"], target))
    return out


@pytest.mark.parametrize("read_ahead", [1, 3])
def test_same_samples_and_skips_as_reading_each_chunk_when_due(shards, holey, read_ahead) -> None:
    cache, dropped = holey
    want = _joined(shards, cache, 0)
    got = _joined(shards, cache, read_ahead)
    assert [g[:3] for g in got] == [w[:3] for w in want]
    assert all(torch.equal(g[3], w[3]) for g, w in zip(got, want, strict=True) if g[0])
    assert sorted(k for g in got for k in g[1]) == sorted(dropped)
    assert len(all_keys(shards)) > 4 * CHUNK  # several chunks, so reads overlap


def test_the_next_chunk_is_read_before_this_one_is_consumed(shards, holey) -> None:
    cache, _ = holey
    for read_ahead, pulled in ((0, CHUNK), (1, 2 * CHUNK), (2, 3 * CHUNK)):
        samples = _Counted(shards)
        first = next(CacheJoin(cache, "mid", "skip", read_ahead=read_ahead)(samples))
        assert first["key"] is not None
        assert samples.pulled == pulled, read_ahead


def test_an_error_of_a_chunk_read_ahead_surfaces_when_it_is_due(shards, holey) -> None:
    cache, dropped = holey
    got = []
    with pytest.raises(UnknownKeyError, match=dropped[0]):
        for s in CacheJoin(cache, "mid", "error", read_ahead=2)(_Counted(shards)):
            got.append(s["key"])
    keys = all_keys(shards)
    assert got == keys[: keys.index(dropped[0]) // CHUNK * CHUNK]  # chunks before it


def test_negative_read_ahead_refused(holey) -> None:
    with pytest.raises(OptionError, match="read_ahead"):
        CacheJoin(holey[0], "mid", "skip", read_ahead=-1)
