"""The build's Ray actors: `BuildWorker` (holds the teacher, writes whole blocks) and
`Progress` (frames done per block, for the driver's progress bar).

Both are plain classes, turned into actors by the driver with `ray.remote(...)`; Ray pickles them
by reference to this module, which every node imports from the installed package.
"""

from __future__ import annotations

import collections
import json
import os
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from featurecache.errors import SpecMismatchError
from featurecache.pipelines.build.frames import BadFrameError, FrameSample, decode_image, iter_samples
from featurecache.pipelines.build.plan import BuildConfig

__all__ = ["BuildWorker", "Progress"]


class BuildWorker:
    """A Ray actor (created with `ray.remote(BuildWorker)`): holds the teacher and writes blocks.

    The teacher is loaded once, on `device`, and checked against the driver's fingerprint (so
    nodes with different package versions or weights cannot mix features into one cache).
    """

    def __init__(self, config: BuildConfig, fingerprint: dict, device: str, progress: Any) -> None:
        import torch

        from featurecache.pipelines.build.teachers import load_teacher
        from featurecache.writer import open_writer

        if device == "cpu" and os.environ.get("OMP_NUM_THREADS"):
            torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
        self.config = config
        self.teacher = load_teacher(
            config.teacher,
            config.layers,
            device=device,
            trust_remote_code=config.trust_remote_code,
            grid=config.grid,
            prompt=config.prompt,
        )
        mine = self.teacher.fingerprint()
        if _canonical(mine) != _canonical(fingerprint):
            raise SpecMismatchError(
                f"Expected the worker's teacher fingerprint to equal the driver's, got\n"
                f"  worker: {mine}\n  driver: {fingerprint}"
            )
        self.writer = open_writer(config.out)
        self.progress = progress

    def ready(self) -> str:
        """The node this actor runs on (also: a cheap call to wait for the teacher to load)."""
        import socket

        return socket.gethostname()

    def cpu_seconds(self) -> float:
        """CPU time this actor process has used (all its threads: torch, decode, write)."""
        import time

        return time.process_time()

    def run_block(self, index: int, source: str) -> Any:
        """Write block `index` from tar shard `source`; returns the BlockResult (not done yet)."""
        cfg = self.config
        block = self.writer.open_block(index, overwrite=False)
        # Three stages overlap: decode + preprocess (decode_threads batches ahead), the teacher
        # (this thread), quantize + compress + write (one thread, in order, 2 batches behind).
        decode = ThreadPoolExecutor(cfg.decode_threads, thread_name_prefix="decode")
        write = ThreadPoolExecutor(1, thread_name_prefix="write")
        inputs: collections.deque[Future] = collections.deque()
        outputs: collections.deque[Future] = collections.deque()
        try:
            for batch in _batched(iter_samples(source), cfg.batch_size):
                inputs.append(decode.submit(self._prepare, batch, source))
                if len(inputs) > cfg.decode_threads:
                    self._forward(block, inputs.popleft().result(), index, write, outputs)
            while inputs:
                self._forward(block, inputs.popleft().result(), index, write, outputs)
            while outputs:
                outputs.popleft().result()
            return block.finish()
        finally:
            decode.shutdown(wait=False, cancel_futures=True)
            write.shutdown(wait=True, cancel_futures=True)

    def _prepare(self, batch: list[FrameSample], source: str) -> tuple[list[str], Any, list[str]]:
        """Decode + preprocess (thread pool): (good keys, input tensor or None, bad keys)."""
        keys, images, bad = [], [], []
        for sample in batch:
            try:
                images.append(decode_image(sample.image_bytes, sample.image_ext))
                keys.append(sample.key)
            except BadFrameError as err:
                if self.config.on_bad_frame == "fail":
                    raise BadFrameError(
                        f"Bad frame in shard {source} key {sample.key!r}: {err} "
                        f"(use --on-bad-frame skip to skip and record such frames)"
                    ) from None
                bad.append(sample.key)
        return keys, (self.teacher.preprocess(images) if images else None), bad

    def _forward(
        self,
        block: Any,
        prepared: tuple,
        index: int,
        write: ThreadPoolExecutor,
        outputs: collections.deque[Future],
    ) -> None:
        """Run the teacher on a prepared batch; hand the features to the write thread."""
        import torch

        keys, inputs, bad = prepared
        feats = {}
        if keys:
            with torch.inference_mode():
                out = self.teacher.forward(inputs.to(self.teacher.device))
            feats = {name: value.cpu() for name, value in out.items()}
        outputs.append(write.submit(self._write, block, keys, feats, bad, index))
        while len(outputs) > 2:
            outputs.popleft().result()  # bounded: at most 2 batches of features wait

    def _write(self, block: Any, keys: list[str], feats: dict, bad: list[str], index: int) -> None:
        for key in bad:
            block.skip(key)
        if keys:
            block.append(keys, feats)
        self._maybe_die(index)
        if self.progress is not None:
            self.progress.add.remote(index, len(keys) + len(bad))

    def _maybe_die(self, index: int) -> None:
        marker = self.config.fault_kill_marker
        if marker and index == 1 and not os.path.exists(marker):
            Path(marker).write_text(str(os.getpid()))
            os._exit(1)  # fault injection: the actor process dies mid-block


class Progress:
    """A tiny Ray actor: frames processed per block, reported by workers after each batch."""

    def __init__(self) -> None:
        self.frames: dict[int, int] = {}

    def add(self, block: int, n: int) -> None:
        self.frames[block] = self.frames.get(block, 0) + n

    def reset(self, block: int) -> None:
        self.frames.pop(block, None)

    def get(self) -> dict[int, int]:
        return dict(self.frames)


def _batched(samples: Iterator[FrameSample], size: int) -> Iterator[list[FrameSample]]:
    batch: list[FrameSample] = []
    for sample in samples:
        batch.append(sample)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _canonical(fingerprint: dict) -> Any:
    return json.loads(json.dumps(fingerprint, sort_keys=True))
