"""`batched`: consecutive lists of `size`, the last one shorter, lazily (an endless source works)."""

from __future__ import annotations

import itertools

from featurecache.batching import batched


def test_batches_cover_the_items_in_order() -> None:
    assert list(batched(range(7), 3)) == [[0, 1, 2], [3, 4, 5], [6]]
    assert list(batched(range(6), 3)) == [[0, 1, 2], [3, 4, 5]]
    assert list(batched([], 3)) == []
    assert next(batched(itertools.count(), 2)) == [0, 1]  # lazy
