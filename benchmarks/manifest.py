"""Caches at dataset scale: the cost of marking one block done, of opening and verifying the
cache, as the number of blocks grows (synthetic plan, tiny layer, local disk); and read
throughput from a local S3 server against local disk.

    python -m featurecache.benchmarks.manifest [--json FILE] [--quick]

For N blocks (1,000-frame blocks planned, 1 row written in the blocks marked): `mark_done` of a
sample of blocks (ms per block, bytes written per block: the completion record), then
`open_cache` with every block done through one snapshot (what a finished build leaves): its
time, the block table's bytes, and the resident memory it adds to a fresh process (RSS, read
from /proc); `verify_cache` over all N blocks (the marked ones hold a row each, the others are
done with 0 rows: the per-block cost of verify, not the decoding of data); and `load_state` from
records alone (no snapshot) at the smallest N. Target: per-block cost flat from 1k to 100k.

Read throughput (needs the dev extra's moto): one cache (2,048 rows of 49 x 384 int8 tokens,
shards of 64 rows) written to local disk and to a moto S3 server on 127.0.0.1, read back by
`FeatureCache.read` in batches of 32 keys, in row order (sequential: adjacent rows coalesce into
one ranged GET per shard) and shuffled (one GET per row), from a freshly opened cache each
time. Loopback is not a network: no bandwidth limit, ~0.1 ms round trips, and moto is a Python
server sharing this machine's CPU; a cloud bucket adds 10-50 ms per request, which the
sequential order amortises over a shard and the shuffled order would pay per row: the reader
fetches a batch's shards concurrently (featurecache/reader.py, READ_WINDOW), and a third run adds
LATENCY_S to every request of the server to measure shuffled against sequential there (claim of
issue 21: within 1.5x). On that server too, the training stream's join (`CacheJoin`) feeding a
consumer that spends STEP_S per batch of 32 (a training step), without and with its read-ahead
(the next batch's reads run while this batch is consumed): ms per batch delivered, the step
included (the floor is STEP_S). Beside them, serial ranged GETs of 20 kB through obstore (the store
layer) and through s3fs, same server, same run.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from featurecache.audit import verify_cache
from featurecache.benchmarks import harness
from featurecache.block_table import DoneRecord
from featurecache.completion import load_state, record_key
from featurecache.manifest import plan_blocks
from featurecache.reader import open_cache
from featurecache.spec import CacheSpec, LayerSpec
from featurecache.store import open_store
from featurecache.writer import create_cache

SPEC = CacheSpec((LayerSpec("x", 1, 8),), "fp16", 1024, {"model": "bench"})
READ_SPEC = CacheSpec((LayerSpec("x", 49, 384),), "int8", 64, {"model": "bench"})
READ_BATCH = 32
LATENCY_S = 0.015  # added to every request of the latency run: a cloud bucket adds 10-50 ms
STEP_S = 0.1  # the consumer's time per batch in the join runs: a training step
# open_cache in a fresh process: resident memory before and after (bytes), from /proc
_RSS_PROBE = """
import sys
from featurecache.reader import open_cache
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
before = rss()
cache = open_cache(sys.argv[1])
print(before, rss())
"""


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
    probe = subprocess.run(
        [sys.executable, "-c", _RSS_PROBE, str(path)],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    before, after = map(int, probe.stdout.split())
    t = time.perf_counter()
    report = verify_cache(path)
    verify_s = time.perf_counter() - t
    # the blocks plan 1,000 frames and hold one row (or none): verify names each such count
    # ("count"); every other check must pass
    assert all(p.kind == "count" for p in report.problems), report.problems[:3]
    rows = [
        harness.result(f"mark_done, {n_blocks} blocks", "records", samples, "ms", device,
                       record_bytes=float(np.mean(sizes))),
        harness.result(f"open_cache, {n_blocks} blocks", "plan+snapshot", opens, "ms", device,
                       table_bytes=cache.table.nbytes(),
                       table_bytes_per_block=cache.table.nbytes() / n_blocks,
                       rss_added_MiB=(after - before) / 2**20,
                       rss_bytes_per_block=(after - before) / n_blocks),
        harness.result(f"verify_cache, {n_blocks} blocks", "plan+snapshot", [verify_s], "s",
                       device, us_per_block=verify_s / n_blocks * 1e6),
    ]  # fmt: skip
    if n_blocks <= 1000:  # records alone (a crashed build without a snapshot)
        st.delete_prefix("featurecache/snapshots/")
        t = time.perf_counter()
        state = load_state(st)
        rows.append(harness.result(f"load_state, {n_blocks} blocks, {state.records_read} records",
                                   "records only", [(time.perf_counter() - t) * 1e3], "ms",
                                   device))  # fmt: skip
    return rows


def _local_s3(delay_s: float = 0.0) -> tuple[object, str] | None:
    """A moto S3 server on 127.0.0.1 with a fresh bucket, its AWS_* environment set for obstore;
    (server, "s3://bucket"), or None without moto (the dev extra). `delay_s` is added to every
    request before it is served (a bucket's latency; the server is threaded, so requests in
    flight wait at the same time, as over a network)."""
    try:
        from moto.moto_server.werkzeug_app import (
            DomainDispatcherApplication,
            MotoRequestHandler,
            create_backend_app,
        )
        from moto.server import ThreadedMotoServer
        from werkzeug.serving import make_server
    except ImportError:
        return None

    class DelayedServer(ThreadedMotoServer):
        def _server_entry(self) -> None:  # ThreadedMotoServer's, with the app wrapped
            app = DomainDispatcherApplication(create_backend_app)

            def delayed(environ: dict, start_response: Any) -> Any:
                time.sleep(delay_s)
                return app(environ, start_response)

            self._server = make_server(self._ip_address, self._port, delayed, True,
                                       request_handler=MotoRequestHandler)  # fmt: skip
            self._server_ready_event.set()
            self._server.serve_forever()

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = DelayedServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    os.environ.update({"AWS_ENDPOINT_URL": endpoint, "AWS_ALLOW_HTTP": "true",
                       "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
                       "AWS_REGION": "us-east-1"})  # fmt: skip
    bucket = f"fc-bench-{uuid.uuid4().hex[:8]}"
    urllib.request.urlopen(urllib.request.Request(f"{endpoint}/{bucket}", method="PUT")).close()
    return server, f"s3://{bucket}"


def _write_read_cache(location: str | Path, rows: int) -> None:
    """READ_SPEC's cache with `rows` rows (blocks of 256 rows, Gaussian features, seeded)."""
    block = 256
    writer = create_cache(location, READ_SPEC, plan_blocks([(f"s{i}", block) for i in
                                                            range(rows // block)], 64))  # fmt: skip
    layer = READ_SPEC.layers[0]
    for b in range(rows // block):
        rng = np.random.default_rng(b)
        bw = writer.open_block(b)
        keys = [f"b{b:03d}-{i:04d}" for i in range(block)]
        bw.append(keys, {"x": rng.standard_normal((block, layer.tokens, layer.dim), np.float32)})
        writer.mark_done(bw.finish())


def _reads(location: str | Path, provider: str, rows: int, device: str) -> list[harness.Result]:
    """Batches of READ_BATCH keys from a freshly opened cache, in row order and shuffled."""
    layer = READ_SPEC.layers[0]
    row_bytes = layer.tokens * layer.dim + 4 * layer.tokens  # int8 values + float32 scales
    out = []
    warm = open_cache(location)  # process-wide first-use costs (codecs, clients) off the clock
    warm.read(warm.keys[:1], "x")
    for order in ("sequential", "shuffled"):
        cache = open_cache(location)
        keys = list(cache.keys)
        if order == "shuffled":
            keys = [keys[i] for i in np.random.default_rng(0).permutation(len(keys))]
        requests, times = cache.store.requests, []
        for i in range(0, len(keys), READ_BATCH):
            t = time.perf_counter()
            cache.read(keys[i : i + READ_BATCH], "x")
            times.append(time.perf_counter() - t)
        total = sum(times)
        out.append(harness.result(
            f"read batch {READ_BATCH}, {order}, {rows} rows 49x384 int8", provider,
            [t * 1e3 for t in times], "ms", device, rows_per_s=rows / total,
            MB_per_s=rows * row_bytes / total / 1e6,
            requests_per_batch=(cache.store.requests - requests) / len(times)))  # fmt: skip
    return out


def _join_reads(location: str, provider: str, rows: int, device: str) -> list[harness.Result]:
    """The training join over every key, sequential and shuffled, read_ahead 0 and 1, with a
    consumer sleeping STEP_S per READ_BATCH samples: ms per batch delivered (step included)."""
    from featurecache.pipelines.training.join import JOIN_CHUNK, CacheJoin

    assert JOIN_CHUNK == READ_BATCH
    out = []
    for read_ahead in (0, 1):
        per_order = {}
        for order in ("sequential", "shuffled"):
            keys = list(open_cache(location).keys)
            if order == "shuffled":
                keys = [keys[i] for i in np.random.default_rng(1).permutation(len(keys))]
            samples = [{"key": k, "source": "bench", "encoded": {"": b""}} for k in keys]
            join = CacheJoin(location, "x", "error", read_ahead=read_ahead)
            times, t = [], time.perf_counter()
            for i, _sample in enumerate(join(samples), 1):
                if i % READ_BATCH == 0:
                    time.sleep(STEP_S)  # the training step on this batch
                    times.append(time.perf_counter() - t)
                    t = time.perf_counter()
            per_order[order] = result = harness.result(
                f"join batch {READ_BATCH}, {order}, read_ahead {read_ahead}, step "
                f"{STEP_S * 1e3:.0f} ms", provider, [x * 1e3 for x in times], "ms", device,
                rows_per_s=READ_BATCH / float(np.mean(times)),
                x_step=float(np.mean(times)) / STEP_S)  # fmt: skip
            out.append(result)
        per_order["shuffled"].extra["shuffled_vs_sequential"] = (
            per_order["sequential"].extra["rows_per_s"] / per_order["shuffled"].extra["rows_per_s"]
        )
    return out


def _ranged_gets(bucket: str, key: str, device: str, n: int) -> list[harness.Result]:
    """`n` serial ranged GETs of 20 kB at seeded offsets of one object, through obstore (the
    store layer) and through s3fs (fsspec), against the same server: the store layer's choice."""
    import s3fs

    root = open_store(bucket)
    size = root.size(key)
    starts = np.random.default_rng(0).integers(0, size - 20_000, n).tolist()
    out = []
    t_obstore = []
    for a in starts:
        t = time.perf_counter()
        root.read_ranges(key, [(a, a + 20_000)])
        t_obstore.append((time.perf_counter() - t) * 1e3)
    fs = s3fs.S3FileSystem(
        key=os.environ["AWS_ACCESS_KEY_ID"], secret=os.environ["AWS_SECRET_ACCESS_KEY"],
        client_kwargs={"endpoint_url": os.environ["AWS_ENDPOINT_URL"]},
    )  # fmt: skip
    path = f"{bucket.removeprefix('s3://')}/{key}"
    t_s3fs = []
    for a in starts:
        t = time.perf_counter()
        fs.cat_file(path, start=a, end=a + 20_000)
        t_s3fs.append((time.perf_counter() - t) * 1e3)
    for name, times in (("obstore", t_obstore), ("s3fs", t_s3fs)):
        out.append(harness.result("ranged GET 20 kB, serial", name, times, "ms", device,
                                  requests_per_s=1e3 / float(np.median(times))))  # fmt: skip
    return out


def _throughput(folder: Path, rows: int, device: str) -> list[harness.Result]:
    """Read throughput: local disk vs the local S3 server (same cache, same reads), then the
    server with LATENCY_S added to every request: shuffled vs sequential there (target: within
    1.5x, shards fetched concurrently)."""
    s3 = _local_s3()
    if s3 is None:
        print("moto is not installed (pip install 'featurecache[dev]'): no S3 read figures")
        return []
    server, bucket = s3
    try:
        local, remote = folder / "read.zarr", f"{bucket}/caches/read.zarr"
        _write_read_cache(local, rows)
        _write_read_cache(remote, rows)
        local_rows = _reads(local, "local disk", rows, device)
        s3_rows = _reads(remote, "S3 (moto, 127.0.0.1)", rows, device)
        gets = _ranged_gets(bucket, "caches/read.zarr/features/x/c/0/0/0", device, 50 if rows
                            < 1024 else 200)  # fmt: skip
    finally:
        server.stop()  # type: ignore[attr-defined]
    for lr, sr in zip(local_rows, s3_rows, strict=True):
        sr.extra["slower_than_local"] = lr.extra["rows_per_s"] / sr.extra["rows_per_s"]
    slow = _local_s3(LATENCY_S)
    assert slow is not None
    server, bucket = slow
    try:
        remote = f"{bucket}/caches/read.zarr"
        _write_read_cache(remote, rows)
        provider = f"S3 (moto, +{LATENCY_S * 1e3:.0f} ms per request)"
        latency_rows = _reads(remote, provider, rows, device)
        join_rows = _join_reads(remote, provider, rows, device)
    finally:
        server.stop()  # type: ignore[attr-defined]
    sequential, shuffled = latency_rows
    shuffled.extra["shuffled_vs_sequential"] = (
        sequential.extra["rows_per_s"] / shuffled.extra["rows_per_s"]
    )
    return local_rows + s3_rows + latency_rows + join_rows + gets


def run(json_path: str | Path | None = None, quick: bool = False) -> list[harness.Result]:
    """Measure, print the table, write JSON when asked, and (unless `quick`) record it in
    benchmarks/RESULTS.md."""
    device = harness.device_name("cpu")
    sizes, marks = ((200, 1000), 20) if quick else ((1000, 20_000, 100_000), 100)
    rows: list[harness.Result] = []
    with tempfile.TemporaryDirectory(prefix="fc-bench-manifest-") as tmp:
        for n in sizes:
            rows += _one(n, marks, Path(tmp), device)
        rows += _throughput(Path(tmp), 256 if quick else 2048, device)
    harness.publish(
        rows,
        "featurecache bench manifest",
        json_path,
        None if quick else "manifest",
        "Version 1 rewrote the whole manifest per mark: 24 ms at 1k blocks, 623 ms at 20k "
        "(issue 15). Version 2 creates one record per block; open_cache reads the plan and "
        "one snapshot; rss_added is what opening adds to a fresh process. Reads: loopback "
        "is not a network (no bandwidth limit, ~0.1 ms round trips; moto is a Python server "
        "on the same 2 cores); a cloud bucket adds 10-50 ms per request. " + harness.load_note(),
    )
    return rows


if __name__ == "__main__":
    harness.main(run, __doc__)
