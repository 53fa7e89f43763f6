"""A block writer to run as its own process (crash and concurrency tests):

    python writer_proc.py CACHE BLOCK [BLOCK...] [--sleep S] [--no-done]

Writes each block's deterministic rows (block_data) in batches of 5, printing "appended N" after
each batch (flushed), and marks it done unless --no-done. Also imported by the tests (runpy) for
the reference data, so both sides generate identical rows."""

from __future__ import annotations

import sys
import time

import numpy as np


def block_data(spec, block: int, count: int) -> tuple[list[str], dict[str, np.ndarray]]:
    """Keys and float32 (count, tokens, dim) features of block `block`: a function of the block."""
    rng = np.random.default_rng(1000 + block)
    keys = [f"b{block}-{i:05d}" for i in range(count)]
    feats = {
        x.name: rng.standard_normal((count, x.tokens, x.dim)).astype(np.float32)
        for x in spec.layers
    }
    return keys, feats


def write_block(path: str, block: int, *, sleep: float = 0.0, done: bool = True) -> None:
    import featurecache as fc

    writer = fc.open_writer(path)
    count = writer.manifest.block(block).count
    keys, feats = block_data(writer.spec, block, count)
    bw = writer.open_block(block)
    for i in range(0, count, 5):
        bw.append(keys[i : i + 5], {k: v[i : i + 5] for k, v in feats.items()})
        print(f"appended {block} {min(i + 5, count)}", flush=True)
        time.sleep(sleep)
    result = bw.finish()
    if done:
        writer.mark_done(result)
    print(f"finished {block}", flush=True)


if __name__ == "__main__":
    args = sys.argv[1:]
    sleep = float(args[args.index("--sleep") + 1]) if "--sleep" in args else 0.0
    done = "--no-done" not in args
    blocks = [int(a) for a in args[1:] if a.isdigit()]
    for b in blocks:
        write_block(args[0], b, sleep=sleep, done=done)
