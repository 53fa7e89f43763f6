"""Objects of a store read as Python files, and frame URL patterns expanded by listing: how
featurecache.samples reads WebDataset tars from s3://, gs:// and memory:// as it reads local ones.

    f = open_object("s3://bucket/frames/frames-000000.tar")                    # seekable
    f = open_object("s3://bucket/frames/frames-000000.tar", sequential=True)   # one streamed GET
    expand_url("s3://bucket/frames/frames-*.tar")   # ["s3://bucket/frames/frames-000000.tar", ...]

Two ways to read a tar in a store, one per use:
- `sequential=True` (a build worker, the training stream, verify --frames: every member is read):
  one GET, streamed in chunks (StreamReader).
- seekable (planning: tar headers only, through tarfile's random-access mode, which seeks over
  member data): ranged GETs with a read-ahead that doubles while reads stay sequential
  (RangedReader). A tar of small members (images of ~100 kB) is then fetched in a few growing
  windows; the header after a member larger than the window costs one small GET and the member
  itself is never downloaded.

A local path opens as a plain file either way. Credentials and endpoints: featurecache.store.
"""

from __future__ import annotations

import fnmatch
import glob
import io
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Final
from urllib.parse import urlsplit

from featurecache.store import Store, split_url

__all__ = ["RangedReader", "StreamReader", "expand_url", "open_object"]

MIN_READ_AHEAD: Final = 64 << 10  # bytes a ranged read fetches at least (a header + some)
MAX_READ_AHEAD: Final = 8 << 20  # the window stops doubling here (sequential reads)
STREAM_CHUNK: Final = 1 << 20  # bytes per piece of a streamed GET


def open_object(location: str | Path, *, sequential: bool = False) -> IO[bytes]:
    """A read-only binary file over the object (or local file) at `location`; seekable unless
    `sequential`. FileNotFoundError when it does not exist; StorageError when the store fails."""
    store, key = split_url(location)
    if store.local_root is not None:
        return open(store.local_root / key, "rb")
    raw: io.RawIOBase = StreamReader(store, key) if sequential else RangedReader(store, key)
    return io.BufferedReader(raw, buffer_size=STREAM_CHUNK if sequential else 1 << 16)


class RangedReader(io.RawIOBase):
    """A seekable read-only file over one object, each read served from a window fetched with
    one ranged GET. The window starts at MIN_READ_AHEAD bytes and doubles (up to
    MAX_READ_AHEAD) while each fetch starts where the previous one ended or shortly after."""

    def __init__(self, store: Store, key: str) -> None:
        super().__init__()
        self.store, self.key = store, key
        self.length = store.size(key)  # FileNotFoundError for a missing object
        self.name = store.url(key)
        self._pos = 0
        self._start, self._data = 0, b""  # the current window: bytes [start, start + len)
        self._window = MIN_READ_AHEAD
        self.fetches = 0  # GETs made (tests, benchmarks)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self.length}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def _fetch(self, want: int) -> None:
        """Fetch the window that starts at the current position (at least `want` bytes)."""
        end = self._start + len(self._data)
        near = self._start <= self._pos <= end + self._window  # sequential, or a small skip
        self._window = min(MAX_READ_AHEAD, self._window * 2) if near else MIN_READ_AHEAD
        stop = min(self.length, self._pos + max(want, self._window))
        (self._data,) = self.store.read_ranges(self.key, [(self._pos, stop)])
        self._start = self._pos
        self.fetches += 1

    def readinto(self, buffer: memoryview | bytearray) -> int:  # type: ignore[override]
        n = min(len(buffer), self.length - self._pos)
        if n <= 0:
            return 0
        offset = self._pos - self._start
        if offset < 0 or offset + n > len(self._data):
            self._fetch(n)
            offset = 0
        buffer[:n] = self._data[offset : offset + n]
        self._pos += n
        return n


class StreamReader(io.RawIOBase):
    """A sequential read-only file over one object: one GET, streamed in STREAM_CHUNK pieces."""

    def __init__(self, store: Store, key: str) -> None:
        super().__init__()
        self.name = store.url(key)
        self._chunks: Iterator[bytes] = store.iter_chunks(key, STREAM_CHUNK)
        self._data, self._offset = b"", 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview | bytearray) -> int:  # type: ignore[override]
        while self._offset >= len(self._data):
            chunk = next(self._chunks, None)
            if chunk is None:
                return 0
            self._data, self._offset = chunk, 0
        n = min(len(buffer), len(self._data) - self._offset)
        buffer[:n] = self._data[self._offset : self._offset + n]
        self._offset += n
        return n


def expand_url(pattern: str) -> list[str]:
    """The object URLs a frames URL names, sorted: the object itself when it exists; for a glob
    (`*`, `?`, `[...]` in the path; matched segment by segment, as a local glob is) the objects
    it matches; otherwise a "folder": the `*.tar` objects directly under `pattern/`. [] when
    nothing matches. Brace ranges are expanded before (featurecache.samples)."""
    root, key = split_url(pattern)
    url = urlsplit(pattern)
    base = f"{url.scheme}://{url.netloc}/"
    if glob.has_magic(key):
        fixed = key[: min(key.index(c) for c in "*?[" if c in key)]
        prefix = fixed[: fixed.rfind("/") + 1]
        parts = key.split("/")
        return [
            base + k
            for k, _ in root.list(prefix)
            if len(k.split("/")) == len(parts)
            and all(map(fnmatch.fnmatchcase, k.split("/"), parts))
        ]
    if key and root.exists(key):
        return [base + key]
    folder = f"{key.rstrip('/')}/" if key else ""
    return [
        base + k for k, _ in root.list(folder) if k.endswith(".tar") and "/" not in k[len(folder) :]
    ]
