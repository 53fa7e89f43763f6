"""The build: run a frozen teacher once over every frame into a feature cache, in this process
(`local`) or as a Ray job over a pool of workers.

    # BuildConfig: featurecache.pipelines.precompute.config
    summary = build_cache(BuildConfig(frames=["data/train"], teacher="efficientnet-lite0",
                                      layers=["4"], out="cache.zarr"))

    # Python frames: any re-iterable of (key, image), image a PIL image or uint8 HWC array
    shards = [IterableShard(MyEpisodes(i)) for i in range(8)]    # one block each
    build_cache(BuildConfig(frames=shards, teacher="hf:facebook/dinov2-small", layers=["8"],
                            out="cache.zarr", address="auto"))   # or local=True

Driver (this module): `prepare_build` checks the inputs and plans one block per input shard
(plan.py); `create_cache` creates the cache or reopens it (resume: done blocks are skipped;
another fingerprint is refused). Workers (`BuildWorker`, build_worker.py) hold the teacher once
(on a GPU where there is one) and take one pending block at a time: a worker reads the shard
sequentially, decodes and preprocesses batches on a small thread pool that runs ahead of the
model, runs the teacher under inference mode, and hands the features to a write thread that
streams them through a BlockWriter (quantize, compress, write whole Zarr shards), then commits
the block itself (one small completion record: no lock, so dispatch never waits on bookkeeping)
and returns the BlockResult; the driver only takes note, writes a snapshot of the records every
SNAPSHOT_EVERY blocks and at the end. A local build runs one such worker in this process,
with no Ray start-up, block after block: the same code writes the same arrays.

Faults: a Ray worker that dies (RayActorError) is replaced and its block retried from scratch
(shards are replaced whole; shards past the new rows are deleted) up to `max_retries` times. A
driver killed mid-build (local or Ray) leaves done blocks done; rerunning the same command writes
only the rest, and each block is written whole by one worker, so the result equals an
uninterrupted build array for array.
"""

from __future__ import annotations

import collections
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from featurecache.codecs import calibrate_channel_scale
from featurecache.format import CHANNEL_SCALED_CODECS, GROUP_METADATA
from featurecache.manifest import Block
from featurecache.pipelines.precompute.build_worker import (
    BuildWorker,
    Progress,
    RemoteProgress,
    calibration_features,
)
from featurecache.pipelines.precompute.config import BuildConfig, BuildError
from featurecache.pipelines.precompute.frames import FrameShard, IterableShard, TarShard
from featurecache.pipelines.precompute.plan import BuildPlan, prepare_build
from featurecache.store import open_store

__all__ = [
    "BuildSummary",
    "BuildWorker",
    "FrameShard",
    "IterableShard",
    "TarShard",
    "build_cache",
    "gpu_worker_cpus",
    "use_local",
]

SNAPSHOT_EVERY = 1000  # driver: blocks between snapshots of the completion records
_POLL_S = 0.25  # driver: how often the progress bar is refreshed while blocks run


@dataclass(frozen=True)
class BuildSummary:
    """What a build did. frames: rows in the cache's done blocks; new_frames: written by this run;
    skipped: bad frames skipped (all done blocks); seconds: the whole call; run_seconds: from all
    workers holding their teacher to the last block done (steady state: frames_per_s_running);
    raw_bytes: the rows' features as fp16; bytes_written: the cache folder's size;
    compression: raw_bytes / feature bytes on disk."""

    out: str
    frames: int
    new_frames: int
    skipped: int
    blocks: int
    blocks_resumed: int
    seconds: float
    frames_per_s: float
    local: bool
    run_seconds: float
    frames_per_s_running: float
    worker_cpu_seconds: float
    bytes_written: int
    raw_bytes: int
    compression: float
    workers: int
    retries: int

    def __str__(self) -> str:
        return (
            f"{self.frames} frames in {self.blocks} blocks ({self.blocks_resumed} already done, "
            f"{self.skipped} bad frames skipped) -> {self.out}\n"
            f"{self.new_frames} new frames in {self.seconds:.1f} s = {self.frames_per_s:.1f} "
            f"frames/s ({self.frames_per_s_running:.1f} once the teacher was loaded) with "
            f"{self.workers} {'in-process ' if self.local else 'Ray '}worker(s), "
            f"{self.retries} retried block(s)\n"
            f"{_human(self.bytes_written)} on disk, {self.compression:.2f}x smaller than fp16 "
            f"features ({_human(self.raw_bytes)})"
        )


def use_local(config: BuildConfig) -> bool:
    """Whether `config` runs in this process: `config.local` when set; otherwise local unless a
    Ray `address` is given, more than one worker is asked for, or several GPUs are visible
    (benchmarks/build.py: on one device, Ray start-up costs seconds and buys nothing)."""
    if config.local is not None:
        return config.local
    if config.address or (config.workers or 1) > 1:
        return False
    import torch

    return torch.cuda.device_count() <= 1


def build_cache(config: BuildConfig) -> BuildSummary:
    """Run the build described by `config`; see the module docstring. Returns the summary.

    Raises (before any work): FramesNotFoundError, SampleLayoutError, BuildError (empty shard,
    duplicate key), UnknownTeacherError, UnknownLayerError, NotACacheError, SpecMismatchError (a
    cache made with another teacher, layers, codec or input). During the build: BadFrameError
    (on_bad_frame "fail"), BuildError (a block whose Ray worker died max_retries + 1 times).
    """
    from featurecache.writer import create_cache

    start = time.perf_counter()
    local = use_local(config)
    plan, teacher = prepare_build(config)
    channel_scales = _calibrate(config, plan, teacher)
    # exclusive: while this build runs, a second one into the same cache gets CacheBusyError
    writer = create_cache(
        config.out,
        plan.spec,
        list(plan.blocks),
        overwrite=config.overwrite,
        exclusive=True,
        channel_scales=channel_scales,
    )
    try:
        manifest = writer.refresh()
        todo = [b for b in manifest.blocks if not b.done]
        resumed = len(manifest.blocks) - len(todo)
        retries = workers = 0
        run_seconds = cpu_seconds = 0.0
        if todo and local:
            workers, run_seconds, cpu_seconds = _run_local(config, plan, todo, teacher, writer)
        elif todo:
            fingerprint = teacher.fingerprint()
            del teacher  # the driver never runs it
            workers, retries, run_seconds, cpu_seconds = _run_ray(
                config, plan, todo, fingerprint, writer
            )
        if todo:  # every record, then one snapshot covering them: readers open in 3 reads
            writer.refresh()
            writer.snapshot()
    finally:
        writer.close()
    return _summarize(
        config,
        plan,
        writer,
        time.perf_counter() - start,
        run_seconds,
        cpu_seconds,
        todo,
        resumed,
        workers,
        retries,
        local,
    )


def _calibrate(config: BuildConfig, plan: BuildPlan, teacher: Any) -> dict[str, Any] | None:
    """int8c: each layer's channel scale from the driver's teacher (on the CPU, where
    prepare_build loaded it) over the first `calibration_frames` frames of the first shard, or
    None: another codec, or an existing cache that is resumed (it keeps its stored scales)."""
    if plan.spec.codec not in CHANNEL_SCALED_CODECS:
        return None
    if not config.overwrite and open_store(config.out).exists(GROUP_METADATA):
        return None
    shard = plan.shards[0][0]
    feats = calibration_features(config, teacher, shard)
    missing = [layer for layer in plan.spec.layer_names if layer not in feats]
    if missing:
        raise BuildError(
            f"Expected decodable frames in the first shard {shard} to calibrate the int8c "
            f"channel scales of layers {missing}, got none (or use --codec int8)."
        )
    return {layer: calibrate_channel_scale(feats[layer]) for layer in plan.spec.layer_names}


def _run_local(
    config: BuildConfig, plan: BuildPlan, todo: list[Block], teacher: Any, writer: Any
) -> tuple[int, float, float]:
    """One in-process worker over the pending blocks, in order; returns (1, seconds from the
    teacher ready to the last block done, CPU seconds of this process meanwhile)."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    fingerprint = teacher.fingerprint()
    total = plan.frames
    finished = sum(b.count + len(b.skipped) for b in writer.refresh().blocks if b.done)
    bar = _progress_bar(config.progress, total, finished, 1)
    report = None if bar is None else (lambda _index, n: bar.update(n))
    cores = config.num_cpus or len(os.sched_getaffinity(0))
    worker = BuildWorker(
        config, fingerprint, device, report, teacher=teacher if device == "cpu" else None,
        cores=cores,
    )  # fmt: skip
    threads = torch.get_num_threads()
    if device == "cpu" and config.num_cpus:  # as a Ray CPU worker given num_cpus cores
        torch.set_num_threads(config.num_cpus)
    run_start, cpu_start = time.perf_counter(), time.process_time()
    try:
        for n, block in enumerate(todo, 1):
            writer.note_done(worker.run_block(block.index, plan.shards[block.index][0]))
            if n % SNAPSHOT_EVERY == 0:
                writer.snapshot()
    finally:
        torch.set_num_threads(threads)  # the caller's setting, back
        if bar is not None:
            bar.close()
    return 1, time.perf_counter() - run_start, time.process_time() - cpu_start


def _run_ray(
    config: BuildConfig, plan: BuildPlan, todo: list[Block], fingerprint: dict, writer: Any
) -> tuple[int, int, float, float]:
    """Start (or join) Ray and drive the worker pool; see _run_blocks."""
    import ray

    started_ray = False
    if not ray.is_initialized():
        kwargs: dict[str, Any] = {"include_dashboard": False, "logging_level": "ERROR"}
        if config.address:
            kwargs["address"] = config.address
        else:
            kwargs["num_cpus"] = config.num_cpus
            if config.ray_temp_dir:
                kwargs["_temp_dir"] = str(config.ray_temp_dir)
        ray.init(**kwargs)
        started_ray = True
    try:
        return _run_blocks(ray, config, plan, todo, fingerprint, writer)
    finally:
        if started_ray:
            ray.shutdown()


def gpu_worker_cpus(nodes: list[dict], gpus_per_worker: float) -> int:
    """CPU cores to give each GPU worker: on every alive node with GPUs, its cores over the
    workers its GPUs hold (GPU / gpus_per_worker), the smallest such share (so every GPU of the
    cluster can still take a worker), at least 1. `nodes`: `ray.nodes()`."""
    shares = [
        int(node["Resources"].get("CPU", 0) // max(1, node["Resources"]["GPU"] // gpus_per_worker))
        for node in nodes
        if node.get("Alive") and node.get("Resources", {}).get("GPU", 0) > 0
    ]
    return max(1, min(shares, default=1))


def _run_blocks(
    ray: Any,
    config: BuildConfig,
    plan: BuildPlan,
    todo: list[Block],
    fingerprint: dict,
    writer: Any,
) -> tuple[int, int, float, float]:
    """Drive the actor pool over the pending blocks; returns (workers, retries, seconds from all
    workers ready to the last block done, CPU seconds the workers used meanwhile)."""
    from ray.exceptions import RayActorError, RayTaskError

    resources = ray.cluster_resources()
    gpus = float(resources.get("GPU", 0))
    cpus = float(resources.get("CPU", 1))
    if gpus > 0:
        n = config.workers or max(1, int(gpus // config.gpus_per_worker))
        # Each GPU worker takes its share of its node's cores: its decode pool runs on them.
        options = {"num_gpus": config.gpus_per_worker,
                   "num_cpus": gpu_worker_cpus(ray.nodes(), config.gpus_per_worker)}  # fmt: skip
        device = "cuda"
    else:
        n = config.workers or 1
        # One CPU-only worker gets the machine's cores (torch intra-op threads follow num_cpus).
        options = {"num_cpus": max(1, int(cpus // n))}
        device = "cpu"
    n = min(n, len(todo))
    worker_cls = ray.remote(max_restarts=0, max_task_retries=0)(BuildWorker)
    progress = ray.remote(num_cpus=0)(Progress).remote()

    report = RemoteProgress(progress)

    def spawn() -> Any:
        return worker_cls.options(**options).remote(
            config, fingerprint, device, report, cores=int(options["num_cpus"])
        )

    actors: dict[int, Any] = {i: spawn() for i in range(n)}
    try:  # wait for every teacher to load: startup errors surface here, and timing starts
        ray.get([actor.ready.remote() for actor in actors.values()])
    except RayActorError as err:
        raise _cause(err) from None
    run_start = time.perf_counter()
    cpu_start = dict(
        zip(actors, ray.get([a.cpu_seconds.remote() for a in actors.values()]), strict=True)
    )
    idle = collections.deque(range(n))
    queue = collections.deque(todo)
    inflight: dict[Any, tuple[int, Block]] = {}
    attempts: collections.Counter[int] = collections.Counter()
    retries = done_here = 0
    total = plan.frames
    finished = sum(b.count + len(b.skipped) for b in writer.refresh().blocks if b.done)
    bar = _progress_bar(config.progress, total, finished, n)
    try:
        while queue or inflight:
            while queue and idle:
                slot = idle.popleft()
                block = queue.popleft()
                shard = plan.shards[block.index][0]
                inflight[actors[slot].run_block.remote(block.index, shard)] = (slot, block)
            ready, _ = ray.wait(list(inflight), num_returns=1, timeout=_POLL_S)
            for ref in ready:
                slot, block = inflight.pop(ref)
                try:
                    result = ray.get(ref)
                except RayActorError as err:
                    attempts[block.index] += 1
                    retries += 1
                    ray.get(progress.reset.remote(block.index))
                    if attempts[block.index] > config.max_retries:
                        raise BuildError(
                            f"Expected block {block.index} ({block.source}) to finish, got its "
                            f"worker dying {attempts[block.index]} times; last: {err}"
                        ) from None
                    actors[slot] = spawn()  # replace the dead actor, retry the block first
                    cpu_start[slot] = 0.0
                    queue.appendleft(block)
                except RayTaskError as err:
                    raise _cause(err) from None
                else:  # the worker committed its record; the driver only takes note
                    writer.note_done(result)
                    finished += result.count + len(result.skipped)
                    done_here += 1
                    if done_here % SNAPSHOT_EVERY == 0:
                        writer.snapshot()  # a few ms, once per SNAPSHOT_EVERY blocks
                    ray.get(progress.reset.remote(block.index))
                idle.append(slot)
            if bar is not None:
                running = sum(ray.get(progress.get.remote()).values())
                bar.n = min(total, finished + running)
                bar.set_postfix(workers=len(actors), retries=retries, refresh=False)
                bar.refresh()
        run_seconds = time.perf_counter() - run_start
        cpu = sum(ray.get([a.cpu_seconds.remote() for a in actors.values()]))
        cpu -= sum(cpu_start.values())  # a dead actor's CPU time is lost (replacement: from 0)
    finally:
        if bar is not None:
            bar.close()
        for actor in actors.values():
            ray.kill(actor)
        ray.kill(progress)
    return n, retries, run_seconds, cpu


def _cause(err: Any) -> BaseException:
    """The worker's own exception (BadFrameError, FeatureCacheError...) out of a RayTaskError."""
    cause = getattr(err, "cause", None)
    if isinstance(cause, BaseException):
        return cause
    try:
        return err.as_instanceof_cause()
    except Exception:  # pragma: no cover - older Ray
        return err


def _progress_bar(enabled: bool, total: int, initial: int, workers: int) -> Any:
    if not enabled:
        return None
    from tqdm.auto import tqdm

    bar = tqdm(total=total, initial=initial, unit="frame", desc="build", dynamic_ncols=True)
    bar.set_postfix(workers=workers)
    return bar


def _summarize(
    config: BuildConfig,
    plan: BuildPlan,
    writer: Any,
    seconds: float,
    run_seconds: float,
    cpu_seconds: float,
    todo: Sequence[Block],
    resumed: int,
    workers: int,
    retries: int,
    local: bool,
) -> BuildSummary:
    manifest = writer.refresh()
    done = [b for b in manifest.blocks if b.done]
    frames = sum(b.count for b in done)
    todo_ids = {b.index for b in todo}
    new = sum(b.count + len(b.skipped) for b in done if b.index in todo_ids)
    per_row = sum(layer.tokens * layer.dim for layer in plan.spec.layers) * 2  # fp16 bytes
    objects = open_store(config.out).list()  # one listing (local: a walk) for both sizes
    total_bytes = sum(size for _, size in objects)
    feature_bytes = sum(size for key, size in objects if key.startswith(("features/", "scales/")))
    raw = frames * per_row
    return BuildSummary(
        out=str(config.out),
        frames=frames,
        new_frames=new,
        skipped=sum(len(b.skipped) for b in done),
        blocks=len(manifest.blocks),
        blocks_resumed=resumed,
        seconds=seconds,
        frames_per_s=new / seconds if seconds > 0 else 0.0,
        local=local,
        run_seconds=run_seconds,
        frames_per_s_running=new / run_seconds if run_seconds > 0 else 0.0,
        worker_cpu_seconds=cpu_seconds,
        bytes_written=total_bytes,
        raw_bytes=raw,
        compression=raw / feature_bytes if feature_bytes else 0.0,
        workers=workers,
        retries=retries,
    )


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover
