"""Look at a cache (`inspect_cache`) and check it end to end (`verify_cache`).

verify_cache decodes every done block shard by shard, exactly as FORMAT.md describes (so Zarr's
per-chunk crc32c is checked), recomputes each block's sha256, checks values are finite and keys
non-empty and unique, and optionally that every frame of given WebDataset tars has a row (or was
recorded as skipped) and holds the image bytes its row's stored digest was computed from. First of
all it checks that the manifest agrees with the arrays (integrity.py). Each problem names its
block, the shard file and the key range.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from featurecache.completion import CacheState, load_state
from featurecache.errors import FeatureCacheError
from featurecache.format import (
    CHANNEL_SCALED_CODECS,
    CHECKSUM_PREFIX,
    DIGESTS_ARRAY,
    FEATURE_DTYPE,
    FORMAT_VERSION,
    KEYS_ARRAY,
    SCALE_DTYPE,
    SCALED_CODECS,
    VIEWS_GROUP,
    array_ndim,
    cache_cameras,
    channel_scale_arrays,
    channel_scales_path,
    checksum_arrays,
    features_path,
    sample_digest,
    scales_path,
    shard_file,
)
from featurecache.integrity import array_problems, table_problems
from featurecache.manifest import Block
from featurecache.reader import decode_keys
from featurecache.samples import BadFrameError, expand_frame_paths, iter_keys, iter_samples
from featurecache.store import Store, open_store


def _stored_bytes(st: Store, prefix: str) -> int:
    """Bytes of every object under `prefix` ("" = the whole cache)."""
    return sum(size for _, size in st.list(prefix))


def inspect_cache(path: str | Path) -> dict[str, Any]:
    """A JSON-able summary: spec, rows, layers, codec, blocks done/total, rows written, size on
    disk and compression ratio (decoded bytes of the stored dtype / bytes on disk), per layer and
    overall. Decoded bytes count written rows only; disk bytes are what the files take."""
    st = open_store(path)
    m = load_state(st)
    spec, table = m.spec, m.table
    written = int(table.count[table.done].sum())
    itemsize = np.dtype(FEATURE_DTYPE[spec.codec]).itemsize
    layers = []
    decoded_total = 0
    disk_total = _stored_bytes(st, f"{KEYS_ARRAY}/c/")  # chunk files only, not zarr.json
    for layer in spec.layers:
        decoded = written * layer.tokens * layer.dim * itemsize
        disk = _stored_bytes(st, f"{features_path(layer.name)}/c/")
        if spec.codec in SCALED_CODECS:
            decoded += written * layer.tokens * np.dtype(SCALE_DTYPE).itemsize
            disk += _stored_bytes(st, f"{scales_path(layer.name)}/c/")
        if spec.codec in CHANNEL_SCALED_CODECS:
            decoded += layer.dim * np.dtype(SCALE_DTYPE).itemsize
            disk += _stored_bytes(st, f"{channel_scales_path(layer.name)}/c/")
        fp16 = written * layer.tokens * layer.dim * 2
        layers.append(
            {
                **layer.to_json(),
                "decoded_bytes": decoded,
                "disk_bytes": disk,
                "compression_ratio": decoded / disk if disk else None,
                "ratio_vs_fp16": fp16 / disk if disk else None,
            }
        )
        decoded_total += decoded
        disk_total += disk
    decoded_total += written * spec.key_bytes
    done = table.n_done
    return {
        "path": str(path),
        "layout": m.layout,
        "format_version": m.version,
        "reader_version": FORMAT_VERSION,
        "codec": spec.codec,
        "shard_rows": spec.shard_rows,
        "compressor": spec.compressor,
        "key_bytes": spec.key_bytes,
        "rows": m.rows,
        "rows_written": written,
        "skipped": sum(len(k) for i, k in table.skipped.items() if table.done[i]),
        "blocks_done": done,
        "blocks_total": len(table),
        "pending_blocks": np.flatnonzero(~table.done).tolist(),
        "fingerprint": spec.fingerprint,
        "frame_regions": {c: r.to_json() for c, r in spec.frame_regions.items()},
        "layers": layers,
        "views": spec.views,
        "augment": spec.augment,
        # views 1..V-1 (features, scales, params), all layers: bytes on disk per extra view
        "disk_bytes_per_extra_view": (
            _stored_bytes(st, f"{VIEWS_GROUP}/") / (spec.views - 1) if spec.views > 1 else None
        ),
        "size_on_disk_bytes": _stored_bytes(st, ""),
        "decoded_bytes": decoded_total,
        "compression_ratio": decoded_total / disk_total if disk_total else None,
    }


@dataclass
class Problem:
    """One thing wrong with a cache: which block, what kind, a sentence, the file and keys."""

    kind: str  # "corrupt" | "missing-file" | "checksum" | "non-finite" | "bad-key" | ...
    message: str
    block: int | None = None
    source: str | None = None
    file: str | None = None
    rows: tuple[int, int] | None = None
    keys: tuple[str, str] | None = None

    def __str__(self) -> str:
        where = [f"block {self.block} ({self.source})"] if self.block is not None else []
        if self.file:
            where.append(self.file)
        if self.rows:
            where.append(f"rows [{self.rows[0]}, {self.rows[1]})")
        if self.keys:
            where.append(f"keys {self.keys[0]!r}..{self.keys[1]!r}")
        return f"{self.kind}: {self.message}" + (f" [{', '.join(where)}]" if where else "")


@dataclass
class VerifyReport:
    """What verify_cache found. `ok` only when there is no problem at all."""

    path: str
    blocks_checked: int = 0
    rows_checked: int = 0
    frames_checked: int = 0
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["ok"] = self.ok
        d["problems"] = [{**asdict(p), "text": str(p)} for p in self.problems]
        return d


def _channel_scales_prefix(st: Store, m: CacheState, store: Any, report: VerifyReport) -> bytes:
    """The int8c channel scale vectors as the block checksums' leading bytes (FORMAT.md), each
    checked to decode (crc32c) and to hold `dim` finite positive values; b"" for other codecs."""
    prefix = b""
    for name in channel_scale_arrays(m.spec):
        dim = m.spec.layer(name.split("/", 1)[1]).dim
        file = st.url(f"{name}/c/0")
        try:
            c = np.asarray(zarr.open_array(store, path=name, mode="r")[:])
        except Exception as exc:
            msg = f"{name} does not decode: {type(exc).__name__}: {exc}"
            report.problems.append(Problem("corrupt", msg, file=file))
            continue
        if c.shape != (dim,) or not (np.isfinite(c).all() and (c > 0).all()):
            msg = f"Expected {dim} finite positive values in {name}, got shape {c.shape}"
            report.problems.append(Problem("non-finite", msg, file=file))
        prefix += np.ascontiguousarray(c, dtype="<f4").tobytes()
    return prefix


def _check_block(
    st: Store,
    m: CacheState,
    block: Block,
    arrays: dict[str, zarr.Array],
    report: VerifyReport,
    prefix: bytes = b"",
) -> list[str]:
    """Decode a done block shard by shard; append problems; return its keys ([] if unreadable).
    `prefix`: the bytes the block's checksum stream starts with (int8c channel scales)."""
    spec, sr = m.spec, m.spec.shard_rows
    stop = block.row_start + block.count
    digest = hashlib.sha256(prefix)
    keys: list[str] = []
    failed = False

    def problem(kind: str, msg: str, file: str, rows: tuple[int, int], keys: Any) -> None:
        report.problems.append(Problem(kind, msg, block.index, block.source, file, rows, keys))

    for s in range(block.row_start // sr, (stop - 1) // sr + 1 if block.count else 0):
        rows = (s * sr, min((s + 1) * sr, stop))
        shard_keys: list[str] = []
        for name in checksum_arrays(spec, m.version):
            ndim = array_ndim(name)
            file = st.url(shard_file(name, ndim, s))
            span = (shard_keys[0], shard_keys[-1]) if shard_keys else None
            if not st.exists(shard_file(name, ndim, s)):
                problem("missing-file", f"shard file of {name} is missing", file, rows, span)
                failed = True
                continue
            try:
                data = np.asarray(arrays[name][rows[0] : rows[1]])
            except Exception as exc:
                msg = f"{name} does not decode: {type(exc).__name__}: {exc}"
                problem("corrupt", msg, file, rows, span)
                failed = True
                continue
            digest.update(np.ascontiguousarray(data).tobytes())
            if name == KEYS_ARRAY:
                shard_keys = decode_keys(data)
                if not all(shard_keys):
                    problem("bad-key", "a written row has an empty key", file, rows, None)
                keys.extend(shard_keys)
            elif data.dtype.kind == "f" and not np.isfinite(data).all():
                bad = np.flatnonzero(~np.isfinite(data.reshape(len(data), -1)).all(axis=1))
                first = (
                    shard_keys[bad[0]] if len(shard_keys) > bad[0] else f"row {rows[0] + bad[0]}"
                )
                msg = f"{name} holds NaN/Inf in {len(bad)} row(s), first {first!r}"
                problem("non-finite", msg, file, rows, span)
    if not failed and block.count:
        got = CHECKSUM_PREFIX + digest.hexdigest()
        if got != block.checksum:
            report.problems.append(
                Problem(
                    "checksum",
                    f"Expected checksum {block.checksum}, got {got}",
                    block.index,
                    block.source,
                    st.url(
                        shard_file(features_path(spec.layer_names[0]), 3, block.row_start // sr)
                    ),
                    (block.row_start, stop),
                    (keys[0], keys[-1]) if keys else None,
                )
            )
    if len(keys) != block.count and not failed:
        report.problems.append(
            Problem(
                "bad-key",
                f"Expected {block.count} keys, got {len(keys)}",
                block.index,
                block.source,
            )
        )
    report.rows_checked += block.count
    return keys


def verify_cache(path: str | Path, frames: Sequence[str | Path] | None = None) -> VerifyReport:
    """Check every done block (decodable, checksum, finite, keys non-empty and unique, as many
    frames written + skipped as planned), that no
    block is pending, and with `frames` that every frame key of those tars is in the cache or
    recorded as skipped. NotACacheError / FormatVersionError when `path` is not a readable cache."""
    st = open_store(path)
    m = load_state(st)
    report = VerifyReport(path=str(path))
    where = st.url("zarr.json")
    mismatch = table_problems(m, where) + array_problems(
        st.read, st.location, m.spec, m.rows, m.version
    )
    if mismatch:  # the arrays are not what the manifest says: decoding them would mislead
        report.problems += [Problem("manifest", msg) for msg in mismatch]
        return report
    store = st.zarr_store(read_only=True)
    names = checksum_arrays(m.spec, m.version)
    arrays = {name: zarr.open_array(store, path=name, mode="r") for name in names}
    prefix = _channel_scales_prefix(st, m, store, report)
    seen: dict[str, int] = {}
    for index in range(len(m.table)):
        block = m.table.block(index)  # one at a time: memory stays that of the table
        if not block.done:
            rows = (block.row_start, block.row_stop)
            msg = "block is not done (cache incomplete)"
            report.problems.append(Problem("pending", msg, block.index, block.source, rows=rows))
            continue
        keys = _check_block(st, m, block, arrays, report, prefix)
        report.blocks_checked += 1
        planned = int(m.table.planned[index])
        read = block.count + len(block.skipped)
        if m.layout == "records" and read != planned:  # version 1 kept no planned count
            msg = (
                f"Expected {planned} frames as planned, got {read} in the done record "
                f"({block.count} written, {len(block.skipped)} skipped): frames were lost"
            )
            report.problems.append(Problem("count", msg, block.index, block.source))
        for i, key in enumerate(keys):
            if key in seen and key:
                report.problems.append(
                    Problem(
                        "duplicate-key",
                        f"key {key!r} also at row {seen[key]}",
                        block.index,
                        block.source,
                        st.url(
                            shard_file(KEYS_ARRAY, 2, (block.row_start + i) // m.spec.shard_rows)
                        ),
                        (block.row_start + i, block.row_start + i + 1),
                        (key, key),
                    )
                )
            seen.setdefault(key, block.row_start + i)
    if frames:
        _check_frames(m, arrays, seen, frames, report)
    return report


def _check_frames(
    m: CacheState,
    arrays: dict[str, zarr.Array],
    seen: dict[str, int],
    frames: Sequence[str | Path],
    report: VerifyReport,
) -> None:
    """Every frame of the `frames` tars has a row (or was recorded as skipped) and, where the
    cache stores digests, holds the image bytes its row was computed from (format.sample_digest
    over the cache's cameras). A tar that does not read (truncated, empty, not a tar) is a
    problem naming it; the other tars are still checked."""
    skipped = {k for keys in m.table.skipped.values() for k in keys}
    digests = np.asarray(arrays[DIGESTS_ARRAY][:]) if DIGESTS_ARRAY in arrays else None
    cameras = cache_cameras(m.spec)
    for tar in expand_frame_paths(frames):
        missing: list[str] = []
        mismatched: list[str] = []
        try:
            for sample in iter_keys(tar) if digests is None else iter_samples(tar):
                key = sample if isinstance(sample, str) else sample.key
                report.frames_checked += 1
                row = seen.get(key)
                if row is None:
                    if key not in skipped:
                        missing.append(key)
                    continue
                if digests is None or not digests[row].any():
                    continue  # no digest recorded for this row (Python frames)
                try:
                    got = sample_digest({c: sample.image(c)[0] for c in cameras})
                except BadFrameError:
                    got = b""
                if got != digests[row].tobytes():
                    mismatched.append(key)
        except FeatureCacheError as exc:
            report.problems.append(Problem("bad-tar", str(exc), file=str(tar)))
        if missing:
            report.problems.append(
                Problem(
                    "missing-frame",
                    f"{len(missing)} frame key(s) of {str(tar)!r} have no row and were not "
                    f"skipped, e.g. {missing[:3]}",
                    file=str(tar),
                    keys=(missing[0], missing[-1]),
                )
            )
        if mismatched:
            report.problems.append(
                Problem(
                    "digest-mismatch",
                    f"Expected the frames of {str(tar)!r} to hold the images the cache was "
                    f"built from, got other image bytes under {len(mismatched)} key(s), e.g. "
                    f"{mismatched[:3]}: the frames and the cache come from different data",
                    file=str(tar),
                    keys=(mismatched[0], mismatched[-1]),
                )
            )
