"""The block table and the version-1 manifest: `Block` (a row block owned by one source, on whole
shards), `plan_blocks`, the table's rules (`check_block_table`), `Manifest` (spec + blocks + rows,
the `featurecache` group attribute of version 1, parsed by `featurecache.completion.load_state`),
and the build lock. Version 2 keeps the table as a plan + completion records
(`featurecache.completion`).
"""

from __future__ import annotations

import fcntl
import math
import os
import re
import socket
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from featurecache.errors import (
    CacheBusyError,
    FormatVersionError,
    ManifestError,
    SpecError,
    UnknownBlockError,
)
from featurecache.format import (
    BUILD_LOCK_FILE,
    CHECKSUM_PREFIX,
    CODEC_SINCE_VERSION,
    FORMAT_VERSION,
    STATUS_DONE,
    STATUS_PENDING,
    STATUSES,
    Status,
)
from featurecache.spec import CacheSpec, is_json_int, json_int

_CHECKSUM = re.compile(rf"^{CHECKSUM_PREFIX}[0-9a-f]{{64}}$")


@dataclass(frozen=True)
class Block:
    """A row block: rows [row_start, row_stop) owned by one source (e.g. one input tar), a whole
    number of shards; rows [row_start, row_start + count) are written, the rest is padding.
    `checksum` ("sha256:<hex>", see FORMAT.md) and `skipped` (keys of bad frames) are set when done.
    """

    index: int
    source: str
    row_start: int
    row_stop: int
    count: int
    status: Status = STATUS_PENDING
    checksum: str | None = None
    skipped: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        what = f"block {self.index!r}"
        for name in ("index", "row_start", "row_stop", "count"):
            value = getattr(self, name)
            if not is_json_int(value) or value < 0:
                raise SpecError(f"Expected {what} {name} to be an integer >= 0, got {value!r}")
        if self.row_stop < self.row_start:
            raise SpecError(
                f"Expected {what} row_stop >= row_start, got rows [{self.row_start}, "
                f"{self.row_stop})"
            )
        if self.count > self.capacity:
            raise SpecError(
                f"Expected {what} count <= its capacity {self.capacity} (rows [{self.row_start}, "
                f"{self.row_stop})), got {self.count}"
            )
        if self.status not in STATUSES:
            raise SpecError(f"Expected {what} status in {STATUSES}, got {self.status!r}")
        if self.done and not (
            isinstance(self.checksum, str) and _CHECKSUM.match(self.checksum) is not None
        ):
            raise SpecError(
                f"Expected done {what} checksum '{CHECKSUM_PREFIX}<64 hex digits>', got "
                f"{self.checksum!r}"
            )
        if not isinstance(self.source, str) or not all(isinstance(k, str) for k in self.skipped):
            raise SpecError(
                f"Expected {what} source and skipped keys to be strings, got {self.source!r}, "
                f"{list(self.skipped)[:3]!r}"
            )

    @property
    def capacity(self) -> int:
        return self.row_stop - self.row_start

    @property
    def done(self) -> bool:
        return self.status == STATUS_DONE

    def same_plan(self, other: Block) -> bool:
        """Whether two blocks describe the same planned rows (status and results aside)."""
        return (self.index, self.source, self.row_start, self.row_stop) == (
            other.index,
            other.source,
            other.row_start,
            other.row_stop,
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "source": self.source,
            "row_start": self.row_start,
            "row_stop": self.row_stop,
            "count": self.count,
            "status": self.status,
            "checksum": self.checksum,
            "skipped": list(self.skipped),
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Block:
        what = f"block {d.get('index')!r}"
        skipped = d.get("skipped") or []
        if not isinstance(skipped, list):
            raise SpecError(f"Expected {what} skipped to be a list of keys, got {skipped!r}")
        return cls(
            index=json_int(d, "index", "a block"),
            source=d["source"],
            row_start=json_int(d, "row_start", what),
            row_stop=json_int(d, "row_stop", what),
            count=json_int(d, "count", what),
            status=d.get("status", STATUS_PENDING),
            checksum=d.get("checksum"),
            skipped=tuple(skipped),
        )


def check_block_table(spec: CacheSpec, blocks: Sequence[Block], rows: int) -> None:
    """The block table's own rules (FORMAT.md): blocks in index order, contiguous from row 0,
    each on whole shards, ending at `rows`. SpecError naming the first block that breaks one."""
    row = 0
    for i, b in enumerate(blocks):
        if b.index != i or b.row_start != row:
            raise SpecError(
                f"Expected block {i} to have index {i} and start at row {row} (blocks contiguous "
                f"from row 0), got index {b.index} rows [{b.row_start}, {b.row_stop})"
            )
        if b.row_start % spec.shard_rows or b.row_stop % spec.shard_rows:
            raise SpecError(
                f"Expected block {i} rows on shard boundaries (multiples of shard_rows "
                f"{spec.shard_rows}), got [{b.row_start}, {b.row_stop})"
            )
        row = b.row_stop
    if not is_json_int(rows) or rows != row:
        raise SpecError(f"Expected rows = {row} (the last block's row_stop), got {rows!r}")


@dataclass(frozen=True)
class Manifest:
    """The parsed `featurecache` group attribute: spec, block table and total rows."""

    spec: CacheSpec
    blocks: tuple[Block, ...]
    rows: int
    version: int = FORMAT_VERSION

    def block(self, index: int) -> Block:
        if not 0 <= index < len(self.blocks):
            raise UnknownBlockError(
                f"Expected a block index in [0, {len(self.blocks)}), got {index}"
            )
        return self.blocks[index]

    def with_block(self, block: Block) -> Manifest:
        blocks = list(self.blocks)
        blocks[block.index] = block
        return replace(self, blocks=tuple(blocks))

    @property
    def done_blocks(self) -> tuple[Block, ...]:
        return tuple(b for b in self.blocks if b.done)

    def to_json(self) -> dict[str, Any]:
        return {
            "version": self.version,
            **self.spec.to_json(),
            "rows": self.rows,
            "blocks": [b.to_json() for b in self.blocks],
        }

    @classmethod
    def from_json(cls, d: dict[str, Any], where: str = "cache") -> Manifest:
        version = d.get("version")
        if not isinstance(version, int) or version < 1:
            raise FormatVersionError(
                f"Expected an integer format version in {where}, got {version!r}"
            )
        if version > FORMAT_VERSION:
            raise FormatVersionError(
                f"Expected format version <= {FORMAT_VERSION} in {where}, got {version} "
                f"(written by a newer featurecache: upgrade to read it)"
            )
        try:
            spec = CacheSpec.from_json(d)
            if not isinstance(d["blocks"], list):
                raise SpecError(f"Expected blocks to be a list, got {d['blocks']!r}")
            blocks = tuple(Block.from_json(b) for b in d["blocks"])
            rows = d["rows"]
            check_block_table(spec, blocks, rows)
        except (KeyError, TypeError, AttributeError) as exc:
            raise ManifestError(
                f"Expected a complete manifest in {where}, got a missing or malformed field "
                f"({type(exc).__name__}: {exc}); restore the file or rebuild the cache"
            ) from exc
        except SpecError as exc:
            raise ManifestError(
                f"{exc} in the manifest of {where} (edited or corrupt: restore the file or "
                f"rebuild the cache)"
            ) from exc
        if version < CODEC_SINCE_VERSION[spec.codec]:
            raise FormatVersionError(
                f"Expected format version >= {CODEC_SINCE_VERSION[spec.codec]} for codec "
                f"{spec.codec!r} in {where}, got {version}"
            )
        return cls(spec=spec, blocks=blocks, rows=rows, version=version)


def plan_blocks(sources: Sequence[tuple[str, int]], shard_rows: int) -> list[Block]:
    """One pending block per (source, sample count), in order; each starts on a shard boundary
    and owns ceil(count / shard_rows) whole shards."""
    if shard_rows <= 0:
        raise SpecError(f"Expected a positive shard_rows, got {shard_rows}")
    blocks, row = [], 0
    for i, (source, count) in enumerate(sources):
        if count < 0:
            raise SpecError(f"Expected a sample count >= 0 for {source!r}, got {count}")
        capacity = math.ceil(count / shard_rows) * shard_rows
        blocks.append(Block(i, str(source), row, row + capacity, int(count)))
        row += capacity
    return blocks


# ---- the build lock ----------------------------------------------------------------------


def acquire_build_lock(folder: str | Path, cache: str | Path) -> int:
    """Take the build lock of the cache `cache` (its file in `folder`: the cache itself, or the
    folder it is being created in) without waiting: returns the open fd that holds it (closing
    it releases it, as does the process's exit). CacheBusyError naming who holds it otherwise."""
    lock_file = Path(folder) / BUILD_LOCK_FILE
    fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 256, 0).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise CacheBusyError(
            f"Expected no other build writing {str(cache)!r}, got one running ({holder}); wait "
            f"for it to finish, then rerun this command: it resumes and writes only what is "
            f"left (do not delete the cache: that would destroy the running build's work)"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode(), 0)
    return fd
