"""The drop-in alignment API: CachedTargets (collate_fn) and AlignmentHead, and the README example
that shows them (run here exactly as written in README.md)."""

from __future__ import annotations

import copy
import hashlib
import io
import math
import os
import pickle
import re
from operator import itemgetter
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader

from featurecache.errors import (
    DigestMismatchError,
    OptionError,
    ShapeMismatchError,
    UnknownKeyError,
)
from featurecache.kernels import cosine_alignment_loss
from featurecache.manifest import plan_blocks
from featurecache.pipelines.training import (
    AlignmentHead,
    AlignmentTargets,
    CachedTargets,
    alignment,
    gather_tokens,
    load_run,
)
from featurecache.pipelines.training.config import TrainConfig
from featurecache.pipelines.training.loop import train
from featurecache.pipelines.training.targets import TargetSpec
from featurecache.reader import open_cache
from featurecache.samples import BadFrameError
from featurecache.spec import CacheSpec, LayerSpec
from featurecache.writer import create_cache

from ._train_helpers import TINY_OPTIONS, all_keys, key_features, one_thread, write_cache

README = Path(__file__).resolve().parents[3] / "README.md"
LAYER = LayerSpec("10", 16, 24, (4, 4))

_one_thread = pytest.fixture(autouse=True, scope="module")(one_thread)


@pytest.fixture(scope="module", params=["int8", "fp16"])
def cache(request, shards, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp(f"align-{request.param}") / "cache.zarr"
    return write_cache(path, shards, [LAYER], key_features("10", 16, 24), codec=request.param)


class _Frames(torch.utils.data.Dataset):
    def __init__(self, keys: list[str]) -> None:
        self.keys = keys

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, i: int) -> dict:
        return {"key": self.keys[i], "x": torch.full((2,), float(i))}


def test_collate_adds_the_stored_targets_in_batch_order(cache) -> None:
    """Through 2 DataLoader workers (the cache is pickled into them): raw values and scales
    equal the reader's own read_raw of the batch's keys, in order."""
    reader = open_cache(cache)
    keys = reader.keys[::-1][:20]
    loader = DataLoader(
        _Frames(keys), batch_size=6, num_workers=2, collate_fn=CachedTargets(cache, "10")
    )
    seen = []
    for batch in loader:
        targets = batch["teacher"]
        assert isinstance(targets, AlignmentTargets) and targets.keys == batch["key"]
        want, want_scales = reader.read_raw(batch["key"], "10")
        assert targets.values.dtype == want.dtype  # int8 stays int8: read raw
        torch.testing.assert_close(targets.values, want, rtol=0, atol=0)
        if want_scales is None:
            assert targets.scales is None
        else:
            torch.testing.assert_close(targets.scales, want_scales, rtol=0, atol=0)
        seen += batch["key"]
    assert seen == keys


def test_missing_keys_error_or_skip(cache) -> None:
    keys = open_cache(cache).keys[:4]
    samples = [{"key": k, "x": torch.zeros(1)} for k in [keys[0], "nope-1", keys[1], "nope-2"]]
    with pytest.raises(UnknownKeyError, match="'nope-1'"):
        CachedTargets(cache)(samples)
    batch = CachedTargets(cache, on_missing="skip")(samples)
    assert batch["key"] == keys[:2] and batch["teacher"].missing == ["nope-1", "nope-2"]
    assert len(batch["teacher"]) == 2
    assert CachedTargets(cache, on_missing="skip")(samples[1::2]) is None


def _png(seed: int) -> bytes:
    """The encoded bytes of a small random RGB PNG (one frame's image as a tar holds it)."""
    pixels = np.random.default_rng(seed).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


@pytest.fixture(scope="module")
def digest_cache(tmp_path_factory) -> tuple[Path, dict[str, bytes]]:
    """A cache whose rows record the digests of known PNGs, and those PNGs by key."""
    pngs = {f"f{i:03d}": _png(i) for i in range(8)}
    path = tmp_path_factory.mktemp("digests") / "cache.zarr"
    spec = CacheSpec(layers=(LAYER,), codec="int8", shard_rows=8, fingerprint={"model": "test"})
    writer = create_cache(path, spec, plan_blocks([("frames-000000.tar", len(pngs))], 8))
    block = writer.open_block(0)
    keys = list(pngs)
    features = key_features("10", 16, 24)(keys, [])
    block.append(keys, features, [hashlib.sha256(pngs[k]).digest()[:16] for k in keys])
    writer.mark_done(block.finish())
    return path, pngs


def test_collate_checks_each_frame_against_the_stored_digest(digest_cache) -> None:
    """Same keys, other images (frames 1 and 3 re-drawn): refused naming the first, or left out
    exactly (oracle: which PNG bytes differ); the frames the cache was built from pass. The
    digest from image bytes, or given directly (hashlib's SHA-256[:16], bytes or hex)."""
    path, pngs = digest_cache
    keys = list(pngs)
    same = [{"key": k, "png": pngs[k]} for k in keys]
    redrawn = {1: _png(101), 3: _png(103)}
    other = [{"key": k, "png": redrawn.get(i, pngs[k])} for i, k in enumerate(keys)]
    changed = [s["key"] for s in other if s["png"] != pngs[s["key"]]]
    assert changed == [keys[1], keys[3]]

    batch = CachedTargets(path, image_bytes="png")(same)
    assert batch["key"] == keys and batch["teacher"].mismatched == []  # no false alarm
    with pytest.raises(DigestMismatchError, match=f"sample '{keys[1]}' of the dataset"):
        CachedTargets(path, image_bytes="png")(other)
    sha = lambda s: hashlib.sha256(s["png"])  # the oracle: no featurecache code
    for collate in (
        CachedTargets(path, image_bytes=itemgetter("png"), on_mismatch="skip"),
        CachedTargets(path, digest=lambda s: sha(s).digest()[:16], on_mismatch="skip"),
        CachedTargets(path, digest=lambda s: sha(s).hexdigest()[:32], on_mismatch="skip"),
    ):
        batch = collate(other)
        kept = [k for k in keys if k not in changed]
        assert batch["key"] == kept
        assert batch["teacher"].mismatched == changed and batch["teacher"].missing == changed
        want, _ = open_cache(path).read_raw(kept, "10")
        torch.testing.assert_close(batch["teacher"].values, want, rtol=0, atol=0)
    # every frame of a batch dropped: None, as for missing keys
    assert CachedTargets(path, image_bytes="png", on_mismatch="skip")(other[1:4:2]) is None
    # unchecked without image_bytes= / digest= (the old behaviour), refused with both
    assert CachedTargets(path)(other)["key"] == keys
    with pytest.raises(OptionError, match="at most one of image_bytes= and digest="):
        CachedTargets(path, image_bytes="png", digest="d")
    with pytest.raises(BadFrameError, match="16-byte digest"):
        CachedTargets(path, digest="png")(same)  # image bytes where a digest was expected


def test_tuple_samples_with_a_key_function_and_pickling(cache) -> None:
    keys = open_cache(cache).keys[:3]
    collate = pickle.loads(pickle.dumps(CachedTargets(cache, key=itemgetter(0))))
    data, targets = collate([(k, torch.ones(2)) for k in keys])
    assert list(data[0]) == keys and targets.values.shape == (3, 16, 24)


def _reference_loss(projector, hidden, goal, weight) -> torch.Tensor:
    """fp64 autograd: weight * mean over tokens of 1 - cos(P(h), z)."""
    p = copy.deepcopy(projector).double()(hidden)
    cos = F.cosine_similarity(p, goal.double(), dim=-1)
    return weight * (1 - cos).mean()


@pytest.mark.parametrize("codec", ["int8", "int8c", "fp16"])
def test_head_loss_and_gradient_match_fp64(codec, shards, tmp_path) -> None:
    cache = write_cache(
        tmp_path / "c", shards[:1], [LAYER], key_features("10", 16, 24), codec=codec
    )
    reader = open_cache(cache)
    keys = reader.keys[:5]
    targets = CachedTargets(cache)([{"key": k} for k in keys])["teacher"]
    head = AlignmentHead.for_cache(cache, student_dim=32, student_grid=(4, 4), hidden=48, seed=3)
    head.eval()  # no dropout: the oracle below has none
    # hidden states (B, L=20, 32) with the 16 visual tokens at positions 2..17
    hidden = torch.randn(5, 20, 32, requires_grad=True)
    loss = head(hidden, targets, positions=slice(2, 18))
    loss.backward()
    ref_hidden = hidden.detach().double().requires_grad_(True)
    ref = _reference_loss(head.projector, ref_hidden[:, 2:18], reader.read(keys, "10"), weight=0.2)
    ref.backward()
    assert math.isclose(float(loss.detach()), float(ref.detach()), rel_tol=1e-4, abs_tol=1e-6)
    torch.testing.assert_close(hidden.grad.double(), ref_hidden.grad, rtol=1e-3, atol=1e-6)
    assert not any(p.requires_grad for p in head.parameters())  # frozen by default


def test_head_passes_the_int8c_channel_scale_to_the_kernel(monkeypatch) -> None:
    """int8c targets reach the kernel as stored int8 plus the (D,) channel scale (no
    dequantized copy), and the loss equals the fp64 loss against the dequantized targets."""
    gen = torch.Generator().manual_seed(4)
    values = torch.randint(-127, 128, (3, 16, 24), dtype=torch.int8, generator=gen)
    scales = torch.rand(3, 16, generator=gen) + 0.1
    cscale = torch.rand(24, generator=gen) * 20 + 1
    targets = AlignmentTargets(values=values, scales=scales, channel_scale=cscale)
    spec = TargetSpec(layer="10", tokens=16, dim=24, grid=(4, 4), fingerprint={})
    head = AlignmentHead(32, spec, student_grid=(4, 4), hidden=48, seed=3).eval()
    seen = {}

    def spy(student, target, **kw):
        seen.update(dtype=target.dtype, channel_scale=kw["channel_scale"])
        return cosine_alignment_loss(student, target, **kw)

    monkeypatch.setattr(alignment, "cosine_alignment_loss", spy)
    hidden = torch.randn(3, 16, 32, requires_grad=True)
    loss = head(hidden, targets)
    loss.backward()
    assert seen["dtype"] == torch.int8 and torch.equal(seen["channel_scale"], cscale)
    ref_hidden = hidden.detach().double().requires_grad_(True)
    ref = _reference_loss(head.projector, ref_hidden, targets.dequantize(), weight=0.2)
    ref.backward()
    assert math.isclose(float(loss.detach()), float(ref.detach()), rel_tol=1e-4, abs_tol=1e-6)
    torch.testing.assert_close(hidden.grad.double(), ref_hidden.grad, rtol=1e-3, atol=1e-6)


def test_positions_as_mask_indices_and_slice() -> None:
    hidden = torch.randn(2, 6, 3)
    mask = torch.tensor([[0, 1, 1, 0, 0, 0], [0, 0, 0, 1, 1, 0]], dtype=torch.bool)
    index = torch.tensor([[1, 2], [3, 4]])
    want = torch.stack([hidden[0, 1:3], hidden[1, 3:5]])
    torch.testing.assert_close(gather_tokens(hidden, mask), want)
    torch.testing.assert_close(gather_tokens(hidden, index), want)
    torch.testing.assert_close(gather_tokens(hidden, slice(1, 3)), hidden[:, 1:3])
    with pytest.raises(ShapeMismatchError, match=r"\[2, 1\]"):
        gather_tokens(hidden, torch.tensor([[0, 1, 1, 0, 0, 0], [0, 1, 0, 0, 0, 0]]).bool())


def test_head_refuses_a_grid_it_cannot_meet() -> None:
    spec = TargetSpec("10", 16, 24, (4, 4), {})
    with pytest.raises(ShapeMismatchError, match="--resample"):
        AlignmentHead(8, spec, student_grid=(2, 2))
    head = AlignmentHead(8, spec, student_grid=(2, 2), resample=True, hidden=4)
    assert head(torch.randn(3, 4, 8), torch.randn(3, 16, 24)).shape == ()


def test_featurecache_train_uses_the_head(shards, cache, tmp_path) -> None:
    run = tmp_path / "run"
    train(
        TrainConfig(
            frames=tuple(map(str, shards)), out=str(run), cache=str(cache), steps=2, batch_size=4,
            student_options=TINY_OPTIONS, projector_hidden=16, progress=False, plot=False,
        )
    )  # fmt: skip
    loaded = load_run(run)
    assert isinstance(loaded.head, AlignmentHead) and loaded.head.target.layer == "10"


def test_readme_example_runs(shards, tmp_path, monkeypatch) -> None:
    """The README's example, extracted and run as written, against a 4x4-grid cache."""
    text = README.read_text()
    found = re.search(r"<!-- alignment-example -->\n```python\n(.*?)```", text, re.S)
    assert found, "README.md lost its alignment example"
    source = found.group(1)
    assert 20 <= len(source.strip().splitlines()) <= 45
    write_cache(
        tmp_path / "cache.zarr", shards[:2], [LAYER], key_features("10", 16, 24), codec="int8"
    )
    monkeypatch.chdir(tmp_path)
    scope: dict = {"__name__": "readme_example"}
    exec(compile(source, str(README), "exec"), scope)
    assert torch.isfinite(scope["loss"]) and 0 < float(scope["align_loss"]) < 0.4
    assert len(all_keys(shards[:2])) == len(scope["cache"].keys)
    assert os.getcwd() == str(tmp_path)
