"""Block completion at scale: the cost of marking one block done, and of opening the cache, as
the number of blocks grows (synthetic plan, tiny layer, local disk).

    python -m featurecache.benchmarks.manifest [--json FILE] [--quick]

For N blocks (1,000-frame blocks planned, 1 row written in the blocks marked): `mark_done` of a
sample of blocks (ms per block, bytes written per block: the completion record), then
`open_cache` with every block done through one snapshot (what a finished build leaves), its
time and the block table's bytes; and `load_state` from records alone (no snapshot) at the
smallest N. Target: per-block cost flat from 1k to 100k blocks. Not measured here: verify at
100k blocks (it decodes every block: linear by construction) and object-store read throughput.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np

from featurecache.benchmarks import harness
from featurecache.completion import DoneRecord, load_state, record_key
from featurecache.format import CacheSpec, LayerSpec, plan_blocks
from featurecache.reader import open_cache
from featurecache.store import open_store
from featurecache.writer import create_cache

SPEC = CacheSpec((LayerSpec("x", 1, 8),), "fp16", 1024, {"model": "bench"})


def _one(n_blocks: int, marks: int, folder: Path, device: str) -> list[harness.Result]:
    path = folder / f"c{n_blocks}.zarr"
    plan = plan_blocks([(f"/data/frames/frames-{i:06d}.tar", 1000) for i in range(n_blocks)], 1024)
    writer = create_cache(path, SPEC, plan)
    st = open_store(path)
    picks = np.linspace(0, n_blocks - 1, marks).astype(int).tolist()
    samples, sizes = [], []
    for i in picks:
        bw = writer.open_block(i)
        bw.append([f"k{i}"], {"x": np.ones((1, 1, 8), np.float32)})
        result = bw.finish()
        t = time.perf_counter()
        writer.mark_done(result)
        samples.append((time.perf_counter() - t) * 1e3)
        sizes.append(st.size(record_key(i)))
    table = writer.manifest.table
    for i in range(n_blocks):  # the rest: as a finished build's snapshot records them
        if not table.done[i]:
            table.mark(DoneRecord(index=i, count=0, checksum="sha256:" + "0" * 64))
    writer.snapshot()
    opens = []
    for _ in range(3):
        t = time.perf_counter()
        cache = open_cache(path)
        opens.append((time.perf_counter() - t) * 1e3)
    rows = [
        harness.result(f"mark_done, {n_blocks} blocks", "records", samples, "ms", device,
                       record_bytes=float(np.mean(sizes))),
        harness.result(f"open_cache, {n_blocks} blocks", "plan+snapshot", opens, "ms", device,
                       table_bytes=cache.table.nbytes(),
                       table_bytes_per_block=cache.table.nbytes() / n_blocks),
    ]  # fmt: skip
    if n_blocks <= 1000:  # records alone (a crashed build without a snapshot)
        st.delete_prefix("featurecache/snapshots/")
        t = time.perf_counter()
        state = load_state(st)
        rows.append(harness.result(f"load_state, {n_blocks} blocks, {state.records_read} records",
                                   "records only", [(time.perf_counter() - t) * 1e3], "ms",
                                   device))  # fmt: skip
    return rows


def run(json_path: str | Path | None = None, quick: bool = False) -> list[harness.Result]:
    """Measure, print the table, write JSON when asked, and (unless `quick`) record it in
    benchmarks/RESULTS.md."""
    device = harness.device_name("cpu")
    sizes, marks = ((200, 1000), 20) if quick else ((1000, 20_000, 100_000), 100)
    rows: list[harness.Result] = []
    with tempfile.TemporaryDirectory(prefix="fc-bench-manifest-") as tmp:
        for n in sizes:
            rows += _one(n, marks, Path(tmp), device)
    table = harness.report(rows, "featurecache bench manifest", json_path)
    if not quick:
        harness.record(
            "manifest",
            table,
            "Version 1 rewrote the whole manifest per mark: 24 ms at 1k blocks, 623 ms at 20k "
            "(issue 15). Version 2 creates one record per block; open_cache reads the plan and "
            "one snapshot. " + harness.load_note(),
        )
    return rows


if __name__ == "__main__":
    harness.main(run, __doc__)
