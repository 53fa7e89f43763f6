"""Encoded features back to the host without stalling the teacher's device.

    copies = HostCopies.start(feats)       # forward thread: {layer: (values, scales)} on device
    encoded = copies.wait()                # write thread: [{layer: EncodedFeatures}, ...]

On CUDA, `start` queues one non_blocking device-to-host copy per tensor into page-locked
(pinned) host buffers and records one event after them; it returns at once, so the forward
thread goes on to the next batch's forward while the copies run. `wait` (in the write thread)
synchronises on that event only, then hands out numpy views of the pinned buffers (they keep
the buffers alive; torch's caching host allocator reuses a buffer once freed and its copy done).
On the CPU there is nothing to copy: `start` wraps the tensors' numpy views, as
`codecs.encode_torch` does, and `wait` returns them.

The bytes are the device's, copied: equal to `codecs.encode_torch` of the same features (tested
under the gpu marker: tests/pipelines/precompute/test_host_copies.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from featurecache.codecs import EncodedFeatures

__all__ = ["HostCopies"]

DeviceFeatures = tuple[torch.Tensor, torch.Tensor | None]  # (values, scales) on the device


class HostCopies:
    """One batch's encoded features on their way to the host: per view, {layer: (values,
    scales)} as `codecs.encode_on_device` returns them (values int8 / float16 (n, tokens, dim),
    scales float32 (n, tokens) or None)."""

    def __init__(self, host: list[dict[str, DeviceFeatures]], event: Any | None) -> None:
        self._host = host
        self._event = event

    @classmethod
    def start(cls, feats: Sequence[dict[str, DeviceFeatures]]) -> HostCopies:
        """Queue the copies (CUDA: non_blocking into pinned buffers, then an event); on the CPU
        the tensors themselves."""
        tensors = [t for view in feats for pair in view.values() for t in pair if t is not None]
        if not any(t.device.type == "cuda" for t in tensors):
            return cls([dict(view) for view in feats], None)
        host = [
            {layer: tuple(_pinned_copy(t) for t in pair) for layer, pair in view.items()}
            for view in feats
        ]
        event = torch.cuda.Event()
        event.record()  # after every copy on the current stream
        return cls(host, event)  # type: ignore[arg-type]

    @property
    def pending(self) -> bool:
        """Whether copies may still be running (CUDA, before `wait`)."""
        return self._event is not None and not self._event.query()

    def wait(self) -> list[dict[str, EncodedFeatures]]:
        """The features on the host, per view: {layer: EncodedFeatures} (blocks until the copies
        are done: call it where the bytes are needed, the write thread)."""
        if self._event is not None:
            self._event.synchronize()
        return [
            {
                layer: EncodedFeatures(values.numpy(), None if scales is None else scales.numpy())
                for layer, (values, scales) in view.items()
            }
            for view in self._host
        ]


def _pinned_copy(x: torch.Tensor | None) -> torch.Tensor | None:
    """A non_blocking copy of the device tensor `x` into a new pinned host tensor."""
    if x is None:
        return None
    out = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
    out.copy_(x, non_blocking=True)
    return out
