"""The block table in memory: `DoneRecord` (what a finished block commits: rows written,
checksum, skipped keys) and `BlockTable` (every block of a cache as numpy columns, about 110 bytes
per block plus the source names), with the JSON forms the store holds (the plan, snapshots) and
`manifest.Block` objects built on demand. Reading and committing them is
`featurecache.completion`'s.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import numpy as np

from featurecache.errors import ManifestError, UnknownBlockError
from featurecache.format import CHECKSUM_PREFIX, STATUS_DONE, STATUS_PENDING
from featurecache.manifest import Block

RECORD_FIELDS: Final = ("index", "count", "checksum", "skipped")
_SHA_HEX: Final = 64


@dataclass(frozen=True, kw_only=True, slots=True)
class DoneRecord:
    """What a finished block commits: rows written, checksum, skipped keys, and any further
    fields a writer adds (`extra`, kept as JSON)."""

    index: int
    """The block's position in the plan."""
    count: int
    """Rows written: planned samples minus skipped ones."""
    checksum: str
    """"sha256:<hex>" of the written rows (FORMAT.md "Block checksum")."""
    skipped: tuple[str, ...] = ()
    """Keys of the block's source that got no row (bad frames)."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Other JSON fields of the record, carried as they are."""

    def to_json(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "count": self.count,
            "checksum": self.checksum,
            "skipped": list(self.skipped),
            **self.extra,
        }

    @classmethod
    def from_json(cls, d: Any, where: str) -> DoneRecord:
        """Parse and check a record; ManifestError naming `where` for a malformed one."""
        try:
            index, count, checksum = int(d["index"]), int(d["count"]), str(d["checksum"])
            skipped = tuple(str(k) for k in d.get("skipped") or ())
        except (KeyError, TypeError, ValueError) as exc:
            raise ManifestError(
                f"Expected a completion record with index, count, checksum in {where}, got "
                f"{str(d)[:200]!r} ({type(exc).__name__}: {exc})"
            ) from exc
        hexpart = checksum.removeprefix(CHECKSUM_PREFIX)
        if not checksum.startswith(CHECKSUM_PREFIX) or len(hexpart) != _SHA_HEX:
            raise ManifestError(f"Expected checksum 'sha256:<64 hex>' in {where}, got {checksum!r}")
        extra = {k: v for k, v in d.items() if k not in RECORD_FIELDS}
        return cls(index=index, count=count, checksum=checksum, skipped=skipped, extra=extra)

    def same_result(self, other: DoneRecord) -> bool:
        return (self.count, self.checksum, self.skipped) == (
            other.count,
            other.checksum,
            other.skipped,
        )


class BlockTable:
    """The block table as columns (N blocks):

    row_start, row_stop  int64 (N,)   the block's rows, whole shards
    planned              int64 (N,)   samples planned from the source
    count                int64 (N,)   rows written (done) or planned (pending)
    done                 bool  (N,)
    checksum             uint8 (N, 32) sha256 of done blocks (zeros while pending)
    sources              one UTF-8 blob + int64 (N + 1,) offsets
    skipped, extra       dicts for the few blocks that have any
    """

    def __init__(self, sources: Sequence[str], row_start: Any, row_stop: Any, planned: Any) -> None:
        encoded = [str(s).encode() for s in sources]
        self._source_blob = b"".join(encoded)
        self._source_end = np.cumsum([0] + [len(e) for e in encoded], dtype=np.int64)
        self.row_start = np.asarray(row_start, dtype=np.int64)
        self.row_stop = np.asarray(row_stop, dtype=np.int64)
        self.planned = np.asarray(planned, dtype=np.int64)
        n = len(encoded)
        if not (len(self.row_start) == len(self.row_stop) == len(self.planned) == n):
            raise ManifestError(
                f"Expected plan columns of one length, got sources {n}, row_start "
                f"{len(self.row_start)}, row_stop {len(self.row_stop)}, count {len(self.planned)}"
            )
        self.count = self.planned.copy()
        self.done = np.zeros(n, dtype=bool)
        self.checksum = np.zeros((n, 32), dtype=np.uint8)
        self.skipped: dict[int, tuple[str, ...]] = {}
        self.extra: dict[int, dict[str, Any]] = {}

    def __len__(self) -> int:
        return len(self.row_start)

    @property
    def rows(self) -> int:
        return int(self.row_stop[-1]) if len(self) else 0

    @property
    def n_done(self) -> int:
        return int(self.done.sum())

    def nbytes(self) -> int:
        """Bytes the table holds (arrays and the source blob; the dicts not counted)."""
        arrays = (self.row_start, self.row_stop, self.planned, self.count, self.done)
        return sum(a.nbytes for a in arrays) + self.checksum.nbytes + len(self._source_blob)

    def source(self, index: int) -> str:
        a, b = self._source_end[index], self._source_end[index + 1]
        return self._source_blob[a:b].decode()

    def check_index(self, index: int) -> int:
        if not 0 <= int(index) < len(self):
            raise UnknownBlockError(f"Expected a block index in [0, {len(self)}), got {index}")
        return int(index)

    def block_of_row(self, row: int) -> int:
        """The index of the block owning `row`; UnknownBlockError outside [0, rows)."""
        i = int(np.searchsorted(self.row_start, row, side="right")) - 1
        if i < 0 or row >= self.row_stop[i]:
            raise UnknownBlockError(f"Expected a row in [0, {self.rows}), got {row}")
        return i

    def block(self, index: int) -> Block:
        """Block `index` as a manifest.Block (one object, built on demand)."""
        i = self.check_index(index)
        done = bool(self.done[i])
        return Block(
            index=i,
            source=self.source(i),
            row_start=int(self.row_start[i]),
            row_stop=int(self.row_stop[i]),
            count=int(self.count[i]),
            status=STATUS_DONE if done else STATUS_PENDING,
            checksum=CHECKSUM_PREFIX + self.checksum[i].tobytes().hex() if done else None,
            skipped=self.skipped.get(i, ()),
        )

    def blocks(self) -> Iterator[Block]:
        return (self.block(i) for i in range(len(self)))

    def done_indices(self) -> np.ndarray:
        return np.flatnonzero(self.done)

    def record(self, index: int) -> DoneRecord:
        """The completion record of done block `index`."""
        b = self.block(index)
        assert b.checksum is not None, "record() of a pending block"
        extra = self.extra.get(b.index, {})
        return DoneRecord(
            index=b.index, count=b.count, checksum=b.checksum, skipped=b.skipped, extra=extra
        )

    def mark(self, record: DoneRecord, where: str = "the cache") -> None:
        """Set a block done from its record (in memory only)."""
        i = self.check_index(record.index)
        capacity = int(self.row_stop[i] - self.row_start[i])
        if not 0 <= record.count <= capacity:
            raise ManifestError(
                f"Expected a count in [0, {capacity}] for block {i} in {where}, got {record.count}"
            )
        self.done[i] = True
        self.count[i] = record.count
        self.checksum[i] = np.frombuffer(
            bytes.fromhex(record.checksum.removeprefix(CHECKSUM_PREFIX)), np.uint8
        )
        if record.skipped:
            self.skipped[i] = record.skipped
        if record.extra:
            self.extra[i] = dict(record.extra)

    def unmark(self, index: int) -> None:
        """Set a block pending again (in memory only)."""
        i = self.check_index(index)
        self.done[i], self.count[i], self.checksum[i] = False, self.planned[i], 0
        self.skipped.pop(i, None)
        self.extra.pop(i, None)

    def same_plan(self, other: BlockTable) -> bool:
        return (
            len(self) == len(other)
            and np.array_equal(self.row_start, other.row_start)
            and np.array_equal(self.row_stop, other.row_stop)
            and self._source_blob == other._source_blob
            and np.array_equal(self._source_end, other._source_end)
        )

    # ---- JSON forms -------------------------------------------------------------------------
    @classmethod
    def from_blocks(cls, blocks: Sequence[Block]) -> BlockTable:
        """A table from manifest.Block objects (a version-1 manifest, or a plan)."""
        table = cls(
            [b.source for b in blocks],
            [b.row_start for b in blocks],
            [b.row_stop for b in blocks],
            [b.count for b in blocks],
        )
        for b in blocks:
            if b.done:
                table.mark(DoneRecord(index=b.index, count=b.count, checksum=b.checksum or "",
                                      skipped=b.skipped))  # fmt: skip
        return table

    def plan_json(self) -> dict[str, Any]:
        return {
            "source": [self.source(i) for i in range(len(self))],
            "row_start": self.row_start.tolist(),
            "row_stop": self.row_stop.tolist(),
            "count": self.planned.tolist(),
        }

    @classmethod
    def from_plan_json(cls, d: Any, where: str) -> BlockTable:
        try:
            table = cls(d["source"], d["row_start"], d["row_stop"], d["count"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ManifestError(
                f"Expected plan columns source, row_start, row_stop, count in {where}, got "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        starts = np.concatenate([[0], table.row_stop[:-1]]) if len(table) else table.row_start
        if not np.array_equal(table.row_start, starts) or np.any(table.row_stop < table.row_start):
            raise ManifestError(f"Expected contiguous block rows from 0 in {where}, got others")
        return table

    def snapshot_json(self) -> dict[str, Any]:
        """The done blocks' records as columns."""
        idx = self.done_indices()
        return {
            "blocks": len(idx),
            "index": idx.tolist(),
            "count": self.count[idx].tolist(),
            "checksum": [CHECKSUM_PREFIX + self.checksum[i].tobytes().hex() for i in idx],
            "skipped": {str(i): list(s) for i, s in self.skipped.items() if self.done[i]},
            "extra": {str(i): e for i, e in self.extra.items() if self.done[i]},
        }

    def apply_snapshot(self, d: Any, where: str) -> None:
        try:
            skipped, extra = d.get("skipped") or {}, d.get("extra") or {}
            columns = zip(d["index"], d["count"], d["checksum"], strict=True)
            records = [
                DoneRecord(index=int(i), count=int(c), checksum=str(s),
                           skipped=tuple(skipped.get(str(i), ())), extra=extra.get(str(i), {}))
                for i, c, s in columns
            ]  # fmt: skip
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ManifestError(
                f"Expected snapshot columns index, count, checksum in {where}, got "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        for r in records:
            self.mark(r, where)
