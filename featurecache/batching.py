"""`batched(items, size)`: an iterable in lists of `size` (the last one shorter), lazily; the one
batching rule of the build's worker (frames per teacher batch) and the training join (keys per
cache read). `itertools.batched` (Python 3.12) gives tuples and is not in 3.10."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TypeVar

__all__ = ["batched"]

T = TypeVar("T")


def batched(items: Iterable[T], size: int) -> Iterator[list[T]]:
    """Lists of `size` consecutive items (size >= 1), the last one holding what is left."""
    assert size >= 1, "batches hold at least one item"
    batch: list[T] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
