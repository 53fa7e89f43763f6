"""The encoded features' way back to the host (host_copies.HostCopies) and the uint8 frames' way
to the device (FrameBatch): byte for byte `codecs.encode_torch` / the CPU path. The CPU case
here; the CUDA ones (pinned buffers, non_blocking copies, one event) under the gpu marker."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from featurecache.codecs import encode_on_device, encode_torch
from featurecache.pipelines.precompute.host_copies import HostCopies
from featurecache.pipelines.precompute.teachers import load_teacher
from featurecache.pipelines.precompute.teachers.device_preprocess import FrameBatch

CODECS = ("fp16", "int8", "int8c")


def _features(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 (5, 7, 33) with an outlier channel, and a positive channel scale (33,)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(5, 7, 33, generator=gen)
    x[..., 3] *= 40
    return x, torch.rand(33, generator=gen) + 0.5


def _assert_equal(got, want) -> None:
    assert got.values.dtype == want.values.dtype
    np.testing.assert_array_equal(got.values, want.values)
    if want.scales is None:
        assert got.scales is None
    else:
        np.testing.assert_array_equal(got.scales, want.scales)


@pytest.mark.parametrize("codec", CODECS)
def test_cpu_copies_are_encode_torch(codec: str) -> None:
    x, c = _features()
    copies = HostCopies.start(
        [{"a": encode_on_device(x, codec, c)}, {"a": encode_on_device(-x, codec, c)}]
    )
    assert not copies.pending
    views = copies.wait()
    _assert_equal(views[0]["a"], encode_torch(x, codec, c))
    _assert_equal(views[1]["a"], encode_torch(-x, codec, c))


@pytest.mark.gpu
@pytest.mark.parametrize("codec", CODECS)
def test_cuda_copies_are_pinned_and_equal_encode_torch(codec: str) -> None:
    x, c = _features()
    x, c = x.cuda(), c.cuda()
    copies = HostCopies.start([{"a": encode_on_device(x, codec, c)}])
    values, scales = copies._host[0]["a"]  # the host buffers the copies land in
    assert values.is_pinned() and (scales is None or scales.is_pinned())
    got = copies.wait()[0]["a"]
    assert not copies.pending
    _assert_equal(got, encode_torch(x, codec, c))
    _assert_equal(got, encode_torch(x.cpu(), codec, c.cpu()))  # CUDA's codec == the CPU's


@pytest.mark.gpu
def test_cuda_frames_are_pinned_and_preprocessed_as_on_the_cpu() -> None:
    gen = np.random.default_rng(0)
    images = [Image.fromarray(gen.integers(0, 256, (48, 48, 3), dtype=np.uint8)) for _ in range(4)]
    images += [im.resize((64, 40)) for im in images[:2]]  # a second size in the batch
    cuda = load_teacher("efficientnet-lite0@48", ["4"], device="cuda", preprocess="device")
    cpu = load_teacher("efficientnet-lite0@48", ["4"], preprocess="device")
    batch = cuda.prepare(images)
    assert all(frames.is_pinned() for _, frames in batch.groups)
    on_gpu = batch.to("cuda", non_blocking=True)
    torch.cuda.synchronize()
    for (_, a), (_, b) in zip(batch.groups, on_gpu.groups, strict=True):
        assert b.is_cuda and torch.equal(a, b.cpu())
    with torch.inference_mode():
        got = cuda.model_input(cuda.prepare(images)).cpu()
        want = cpu.model_input(FrameBatch.stack(images))
    assert torch.equal(got[:4], want[:4])  # at the size: the lookup table only, bit-identical
    assert (got[4:] - want[4:]).abs().max().item() <= 1 / 128 + 1e-6  # resized: <= 1 step
