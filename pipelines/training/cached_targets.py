"""`CachedTargets`, the DataLoader `collate_fn` of the alignment API (see
featurecache.pipelines.training.alignment's docstring): each batch gains its cached teacher
targets, joined by key, digest-checked when the samples carry their image bytes, and, with
`view="random"`, one cached augmented view per sample per epoch whose transform is applied to
the sample's frame too (the student sees the pixels the teacher saw).

    collate = CachedTargets("views.zarr", layer="16", view="random", image="image", seed=0)
    for epoch in range(epochs):
        collate.set_epoch(epoch)          # the views replayed this epoch (seed, epoch, key)
        for batch in DataLoader(ds, batch_size=8, collate_fn=collate): ...

With `image=` the sample's decoded frame (PIL or uint8 (H, W, 3); {camera: frame} with several
cameras) is replaced by the pixels the teacher saw (`region.teacher_pixels`: the view's transform,
then the crop to the cache's frame region, e.g. DINOv2's centre crop under `build --frame-region
native`) before `collate`, so the user's processor runs on those pixels. Without it,
batch[TARGETS_FIELD].views says which view each sample got and `cache.view_params(keys, view)`
gives the transforms to apply in the user's own code.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from torch.utils.data import default_collate

from featurecache.errors import OptionError
from featurecache.format import DIGEST_BYTES
from featurecache.pipelines.training.alignment import (
    AlignmentTargets,
    OnMismatch,
    OnMissing,
    check_digests,
    frame_digest,
    lookup_targets,
    require_views,
)
from featurecache.pipelines.training.region import teacher_pixels
from featurecache.pipelines.training.targets import cache_target_spec
from featurecache.pipelines.views import choose_view
from featurecache.reader import FeatureCache, open_cache
from featurecache.samples import DEFAULT_CAMERA, BadFrameError

__all__ = ["TARGETS_FIELD", "CachedTargets"]

TARGETS_FIELD = "teacher"  # the batch field CachedTargets adds to dict batches


class CachedTargets:
    """A DataLoader `collate_fn` that adds each batch's cached teacher targets (see the module
    docstring).

    cache: a cache path or an open FeatureCache. layer: the cache layer (default: its only one).
    key: the sample field holding the key (dict samples) or a function sample -> key.
    on_missing: "error" (raise naming the key) or "skip" (drop the sample, list it in .missing).
    image_bytes: the sample field (or a function of the sample) holding the frame's encoded image
        file bytes as the cache was built from them (the PNG/JPEG member of the tar, not decoded
        pixels): bytes, or {camera: bytes} for a multi-camera cache. Each frame's digest is then
        checked against the cache's (`check_digests`), so another image under a known key is
        caught. digest: instead, the field (or function) holding that digest already computed,
        `featurecache.format.sample_digest(...)`: 16 bytes or 32 hex digits. At most one of the
        two; with neither, frames are not checked.
    on_mismatch: "error" (raise DigestMismatchError naming the key) or "skip" (drop the sample,
        list it in .missing and .mismatched).
    view: which cached view's targets: an int (0 = the frame itself, the default), or "random":
        one augmented view per sample per epoch (`views.choose_view` of (seed, epoch, key):
        the same on every rank and worker, and after a resume; call `set_epoch` each epoch).
    image: the sample field holding the decoded frame (PIL or uint8 (H, W, 3); {camera: frame}
        with several cameras), replaced before `collate` by the pixels the teacher saw: the
        view's transform (view other than 0), then the crop to the cache's frame region (a
        region that is not the whole frame), so the student sees what the targets describe.
        None: the frames are left alone (apply them yourself: targets.views,
        cache.view_params, region_crop with cache.spec.frame_region(camera)).
    seed: the run's seed for view="random".
    collate: collates the kept samples (default_collate; HF: default_data_collator).
    Returns dict batches with batch[TARGETS_FIELD] = AlignmentTargets, or for non-dict samples
    the pair (collated, AlignmentTargets); None when every sample of the batch was dropped.
    """

    def __init__(
        self,
        cache: str | Path | FeatureCache,
        layer: str | None = None,
        *,
        key: str | Callable[[Any], str] = "key",
        on_missing: OnMissing = "error",
        image_bytes: str | Callable[[Any], bytes | Mapping[str, bytes]] | None = None,
        digest: str | Callable[[Any], bytes | str] | None = None,
        on_mismatch: OnMismatch = "error",
        view: int | Literal["random"] = 0,
        image: str | None = None,
        seed: int = 0,
        collate: Callable[[list[Any]], Any] = default_collate,
    ) -> None:
        if on_missing not in ("error", "skip"):
            raise OptionError(f"Expected on_missing 'error' or 'skip', got {on_missing!r}.")
        if on_mismatch not in ("error", "skip"):
            raise OptionError(f"Expected on_mismatch 'error' or 'skip', got {on_mismatch!r}.")
        if image_bytes is not None and digest is not None:
            raise OptionError(
                "Expected at most one of image_bytes= and digest= in CachedTargets, got both; "
                "pass image_bytes= for the encoded images, or digest= for their sample_digest."
            )
        self.cache = cache if isinstance(cache, FeatureCache) else open_cache(cache)
        self.layer = cache_target_spec(self.cache, layer).layer  # checks the name now
        self.key, self.on_missing, self.collate = key, on_missing, collate
        self.image_bytes, self.digest, self.on_mismatch = image_bytes, digest, on_mismatch
        if view == "random":
            require_views(self.cache)
        elif not isinstance(view, int) or not 0 <= view < self.cache.views:
            raise OptionError(
                f"Expected view='random' or an int in [0, {self.cache.views - 1}] for "
                f"{self.cache.location}, got {view!r}."
            )
        self.view, self.image, self.seed, self.epoch = view, image, int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        """The epoch whose views view="random" replays (with DataLoader workers, call it before
        the epoch's iterator is created: workers copy this object)."""
        self.epoch = int(epoch)

    def view_of(self, key: str) -> int:
        """The cached view sample `key` gets in the current epoch."""
        if self.view == "random":
            return choose_view(self.seed, self.epoch, key, self.cache.views)
        return int(self.view)

    def _replay(self, sample: Any, key: str, view: int) -> Any:
        """The sample with its frame (field `image`) replaced by the pixels the teacher saw
        (`region.teacher_pixels`: view `view`'s transform, then the crop to the cache's frame
        region of that camera); unchanged without `image=`, or for view 0 of whole frames."""
        if self.image is None:
            return sample
        regions = self.cache.spec.frame_regions
        if view == 0 and all(r.whole for r in regions.values()):
            return sample
        if not isinstance(sample, Mapping) or self.image not in sample:
            raise OptionError(
                f"Expected dict samples with the frame in field {self.image!r} (CachedTargets "
                f"image=), got {type(sample).__name__} for {key!r}."
            )

        def seen(frame: Any, camera: str | None) -> Any:
            params = self.cache.view_params([key], view, camera)[0] if view else None
            region = self.cache.spec.frame_region(camera or DEFAULT_CAMERA)
            name = f"sample {key!r}{f' camera {camera!r}' if camera else ''}"
            return teacher_pixels(frame, params, region, where=name)

        frame = sample[self.image]
        if isinstance(frame, Mapping):
            new = {c: seen(f, c) for c, f in frame.items()}
        else:
            new = seen(frame, None)
        return {**sample, self.image: new}

    def _field(self, sample: Any, spec: str | Callable[[Any], Any], option: str) -> Any:
        """The value `spec` (a field name or a function) picks from one sample."""
        if callable(spec):
            return spec(sample)
        if isinstance(sample, Mapping) and spec in sample:
            return sample[spec]
        found = sorted(sample) if isinstance(sample, Mapping) else type(sample).__name__
        trainer = (
            " (under transformers.Trainer its remove_unused_columns drops the fields the "
            "model's forward does not name: wrap the dataset in TrainerSamples)"
            if isinstance(sample, dict)
            else ""
        )
        raise OptionError(
            f"Expected samples with a {spec!r} field (CachedTargets {option}=), got {found}; "
            f"pass {option}='field' or {option}=lambda sample: ... to CachedTargets{trainer}."
        )

    def key_of(self, sample: Any) -> str:
        """The cache key of one sample."""
        return str(self._field(sample, self.key, "key"))

    def digest_of(self, sample: Any, key: str) -> bytes:
        """The `format.sample_digest` of one sample's frame, from its image bytes or its digest."""
        if self.image_bytes is not None:
            images = self._field(sample, self.image_bytes, "image_bytes")
            if isinstance(images, bytes | bytearray | memoryview):
                images = {DEFAULT_CAMERA: bytes(images)}
            elif not isinstance(images, Mapping):
                raise BadFrameError(
                    f"Expected the encoded image bytes (or {{camera: bytes}}) of sample {key!r} "
                    f"from image_bytes=, got {type(images).__name__}."
                )
            return frame_digest(self.cache, images, key=key, source="the dataset")
        assert self.digest is not None
        value = self._field(sample, self.digest, "digest")
        raw = bytes.fromhex(value) if isinstance(value, str) and _is_hex(value) else value
        if not isinstance(raw, bytes | bytearray) or len(raw) != DIGEST_BYTES:
            raise BadFrameError(
                f"Expected a {DIGEST_BYTES}-byte digest (featurecache.format.sample_digest, or "
                f"{2 * DIGEST_BYTES} hex digits) for sample {key!r} from digest=, got "
                f"{type(value).__name__} {repr(value)[:60]}."
            )
        return bytes(raw)

    def __call__(self, samples: list[Any]) -> Any:
        keys = [self.key_of(s) for s in samples]
        kept = list(range(len(samples)))
        if self.image_bytes is not None or self.digest is not None:
            kept = check_digests(
                self.cache,
                keys,
                lambda i: self.digest_of(samples[i], keys[i]),
                on_mismatch=self.on_mismatch,
            )
        mismatched = [keys[i] for i in sorted(set(range(len(samples))) - set(kept))]
        targets, present = self._lookup([keys[i] for i in kept])
        if targets is None:
            return None
        targets.missing += mismatched
        targets.mismatched = mismatched
        chosen = [kept[i] for i in present]
        views = zip(chosen, targets.views, strict=True)
        batch = self.collate([self._replay(samples[j], keys[j], v) for j, v in views])
        if isinstance(batch, dict):
            batch[TARGETS_FIELD] = targets
            return batch
        return batch, targets

    def _lookup(self, keys: list[str]) -> tuple[AlignmentTargets | None, list[int]]:
        """lookup_targets of each key's view (one read per view) -> (targets in `keys`' order of
        the present keys, or None when none is; their indices in `keys`)."""
        chosen = [self.view_of(k) if k in self.cache else 0 for k in keys]
        parts: list[tuple[AlignmentTargets, list[int]]] = []
        missing: list[str] = []
        for view in sorted(set(chosen)):
            at = [i for i, v in enumerate(chosen) if v == view]
            targets, present = lookup_targets(
                self.cache, [keys[i] for i in at], self.layer, on_missing=self.on_missing,
                view=view,
            )  # fmt: skip
            if targets is None:
                missing += [keys[i] for i in at]
                continue
            missing += targets.missing
            parts.append((targets, [at[i] for i in present]))
        if not parts:
            return None, []
        index = [i for _, where in parts for i in where]
        order = torch.tensor(sorted(range(len(index)), key=index.__getitem__))

        def cat(name: str) -> torch.Tensor | None:
            if getattr(parts[0][0], name) is None:
                return None
            return torch.cat([getattr(t, name) for t, _ in parts])[order]

        rows = [index[n] for n in order.tolist()]
        merged = AlignmentTargets(
            values=cat("values"),  # type: ignore[arg-type]
            scales=cat("scales"),
            channel_scale=parts[0][0].channel_scale,
            keys=[keys[i] for i in rows],
            missing=missing,
            views=[chosen[i] for i in rows],
        )
        return merged, rows


def _is_hex(text: str) -> bool:
    return len(text) == 2 * DIGEST_BYTES and all(c in "0123456789abcdefABCDEF" for c in text)
