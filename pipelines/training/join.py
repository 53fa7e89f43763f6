"""The training stream's join: each sample gains its cached targets (every camera's cache layer,
of view 0 or of the view replayed this epoch), read `JOIN_CHUNK` keys per cache call through the
public API's rules (`alignment.lookup_targets`, `alignment.check_digests`). With replay, each
sample also carries its view's transforms (`view_params`, one per camera) for
`stream.student_frame`.

The join reads one chunk ahead (`read_ahead`): the next chunk's targets are fetched in a
background thread while the current chunk's samples go downstream (decode, the training step),
so a bucket's per-request latency hides behind the work the stream does anyway.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

from featurecache.batching import batched
from featurecache.errors import OptionError
from featurecache.format import camera_layer
from featurecache.pipelines.training.alignment import (
    OnMismatch,
    OnMissing,
    check_digests,
    frame_digest,
    lookup_targets,
    require_views,
)
from featurecache.pipelines.views import choose_view
from featurecache.reader import FeatureCache, open_cache
from featurecache.samples import DEFAULT_CAMERA

__all__ = ["JOIN_CHUNK", "CacheJoin"]

JOIN_CHUNK = 32  # keys per cache read: amortises the per-call cost, stays within a Zarr shard
READ_AHEAD = 1  # chunks whose reads run in the background while the current one is consumed


class CacheJoin:
    """Attach each sample's cached target, reading `JOIN_CHUNK` keys per cache call, in order,
    through `alignment.lookup_targets` (the join of the public API: one missing-key rule), after
    checking that each frame's image bytes are those its cache row was built from
    (`alignment.check_digests`, the public API's digest rule; `on_mismatch`).

    read_ahead: chunks read in a background thread ahead of the one being consumed (0: each
    chunk is read when its samples are asked for). Samples, skip reports and errors come out in
    the same order either way; an error of a chunk read ahead surfaces when that chunk is due.
    """

    def __init__(
        self,
        cache: str | Path,
        layer: str,
        on_missing: OnMissing,
        on_mismatch: OnMismatch = "error",
        cameras: Sequence[str] = (DEFAULT_CAMERA,),
        replay: tuple[int, int] | None = None,
        read_ahead: int = READ_AHEAD,
    ) -> None:
        if read_ahead < 0:
            raise OptionError(f"Expected read_ahead >= 0 chunks, got {read_ahead}")
        self.read_ahead = read_ahead
        self.cache_path, self.layer, self.on_missing = cache, layer, on_missing
        self.on_mismatch = on_mismatch
        self.cameras = tuple(cameras)
        self.replay = replay  # (seed, epoch) with augment="views", else None: view 0
        self.layers = [camera_layer(c, layer) for c in cameras]  # one cache layer per camera
        self.camera_axis = tuple(cameras) != (DEFAULT_CAMERA,)

    def __call__(self, samples: Iterable[dict]) -> Iterator[dict]:
        cache = open_cache(self.cache_path)  # opened here: once per worker process
        if self.replay is not None:
            require_views(cache)
        if not self.read_ahead:
            for chunk in batched(samples, JOIN_CHUNK):
                yield from self._read(cache, chunk)
            return
        # One thread reads the chunks in order (the cache is used by it alone); at most
        # read_ahead reads are queued beyond the chunk being yielded.
        reader = ThreadPoolExecutor(1, thread_name_prefix="fc-join")
        pending: list[Future] = []
        try:
            for chunk in batched(samples, JOIN_CHUNK):
                pending.append(reader.submit(lambda c=chunk: list(self._read(cache, c))))
                if len(pending) > self.read_ahead:
                    yield from pending.pop(0).result()
            while pending:
                yield from pending.pop(0).result()
        finally:
            reader.shutdown(wait=True, cancel_futures=True)

    def _check_digests(self, cache: FeatureCache, chunk: list[dict]) -> tuple[list[dict], list]:
        """(the samples to join, the keys left out because their images are not the cache's):
        one digest per frame the cache holds (SHA-256 of its encoded image bytes), one
        stored-digest lookup per chunk."""
        encoded = [s.pop("encoded") for s in chunk]
        keys = [s["key"] for s in chunk]
        sources = {s["key"]: s["source"] for s in chunk}
        kept = check_digests(
            cache,
            keys,
            lambda i: frame_digest(cache, encoded[i], key=keys[i], source=chunk[i]["source"]),
            on_mismatch=self.on_mismatch,
            source=sources.__getitem__,
        )
        if len(kept) == len(chunk):
            return chunk, []
        left_out = set(range(len(chunk))) - set(kept)
        return [chunk[i] for i in kept], [keys[i] for i in sorted(left_out)]

    def _read(self, cache: FeatureCache, chunk: list[dict]) -> Iterator[dict]:
        chunk, mismatched = self._check_digests(cache, chunk)
        if not chunk:
            yield {"key": None, "missing": mismatched, "mismatched": mismatched}
            return
        if self.replay is None:
            yield from self._read_view(cache, chunk, mismatched, 0)
            return
        seed, epoch = self.replay
        chosen = [choose_view(seed, epoch, s["key"], cache.views) for s in chunk]
        joined: dict[str, dict] = {}
        missing: list[str] = []
        for view in sorted(set(chosen)):  # one read per view of the chunk
            group = [s for s, v in zip(chunk, chosen, strict=True) if v == view]
            for s in self._read_view(cache, group, [], view):
                missing += s.get("missing", [])
                if s["key"] is not None:
                    joined[s["key"]] = s
        ordered = [joined[s["key"]] for s in chunk if s["key"] in joined]  # the chunk's order
        if not ordered:
            yield {"key": None, "missing": missing + mismatched, "mismatched": mismatched}
            return
        for i, s in enumerate(ordered):  # skips reported once, with the first sample
            s["missing"] = missing + mismatched if i == 0 else []
            s["mismatched"] = mismatched if i == 0 else []
            yield s

    def _read_view(
        self, cache: FeatureCache, chunk: list[dict], mismatched: list[str], view: int
    ) -> Iterator[dict]:
        """Join `chunk`'s targets of cached view `view` (with replay, also each present sample's
        `view_params`: one ViewParams per camera, for `student_frame`)."""
        sources = {s["key"]: s["source"] for s in chunk}
        per_layer = [
            lookup_targets(
                cache,
                [s["key"] for s in chunk],
                layer,
                on_missing=self.on_missing,
                where=lambda key: f"of {sources[key]}",
                view=view,
            )
            for layer in self.layers  # the same keys, so the same rows, for every camera
        ]
        targets, present = per_layer[0]
        if targets is None:  # report skips that no sample of this chunk can carry
            missing = [s["key"] for s in chunk] + mismatched
            yield {"key": None, "missing": missing, "mismatched": mismatched}
            return
        found = [t for t, _ in per_layer]
        params = None
        if self.replay is not None:
            keys = [chunk[at]["key"] for at in present]
            params = [cache.view_params(keys, view, camera) for camera in self.cameras]
        for i, at in enumerate(present):
            s = chunk[at]
            if params is not None:
                s["view"], s["view_params"] = view, [p[i] for p in params]
            s["target"] = self._stack([t.values[i] for t in found])
            s["scales"] = (
                None if targets.scales is None else self._stack([t.scales[i] for t in found])
            )
            channel = [t.channel_scale for t in found]
            s["channel_scale"] = None if channel[0] is None else self._stack(channel)
            s["missing"] = targets.missing + mismatched if i == 0 else []
            s["mismatched"] = mismatched if i == 0 else []
            yield s

    def _stack(self, per_camera: list[torch.Tensor]) -> torch.Tensor:
        """One camera's tensor as is, several stacked on a camera axis (C, ...)."""
        return torch.stack(per_camera) if self.camera_axis else per_camera[0]
