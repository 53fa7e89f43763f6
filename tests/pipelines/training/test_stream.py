"""The training stream: WebDataset frames joined by key with a real cache."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from featurecache.errors import UnknownKeyError
from featurecache.pipelines.training.stream import StreamConfig, check_shards_per_rank, iter_batches
from featurecache.spec import LayerSpec

from ._train_helpers import all_keys, key_features, key_vector, one_thread, write_cache

LAYER = LayerSpec("mid", 16, 24, (4, 4))


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    yield from one_thread()


@pytest.fixture(scope="module", params=["fp16", "int8"])
def keyed_cache(request, shards, tmp_path_factory) -> tuple[Path, str]:
    path = tmp_path_factory.mktemp("keyed") / f"cache-{request.param}"
    write_cache(path, shards, [LAYER], key_features("mid", 16, 24), codec=request.param)
    return path, request.param


def _config(shards, **kw) -> StreamConfig:
    base = {"shards": shards, "image_size": 32, "batch_size": 8, "shuffle_buffer": 20}
    return StreamConfig(**(base | kw))


def test_every_sample_gets_its_own_keys_target(shards, keyed_cache) -> None:
    cache, codec = keyed_cache
    batches = list(iter_batches(_config(shards, cache=cache, layer="mid", seed=3)))
    keys = [k for b in batches for k in b.keys]
    assert sorted(keys) == sorted(all_keys(shards))  # each frame once
    assert keys != all_keys(shards)  # and shuffled
    for b in batches:
        assert b.images.shape == (len(b), 3, 32, 32) and b.images.dtype == torch.float32
        assert b.actions.shape == (len(b), 7) and b.actions.dtype == torch.float32
        assert len(b.instructions) == len(b) and all(b.instructions)
        if codec == "int8":
            assert b.target.dtype == torch.int8 and b.scales.shape == (len(b), 16)
            got = b.target.float() * b.scales.unsqueeze(-1)
            tol = 0.02
        else:
            assert b.target.dtype == torch.float16 and b.scales is None
            got, tol = b.target.float(), 2e-3
        want = torch.from_numpy(np.stack([key_vector(k, 16, 24) for k in b.keys]))
        err = (got - want).abs().amax(dim=(1, 2)) / want.abs().amax(dim=(1, 2))
        assert err.max() < tol, (codec, err.max())


def test_same_seed_same_order_and_epochs_differ(shards, keyed_cache) -> None:
    cache, _ = keyed_cache
    run = lambda **kw: [
        k for b in iter_batches(_config(shards, cache=cache, layer="mid", **kw)) for k in b.keys
    ]
    assert run(seed=1) == run(seed=1)
    assert run(seed=1) != run(seed=1, epoch=1)
    assert run(shuffle=False) == all_keys(shards)


def test_resume_skip_drops_exactly_the_consumed_batches(shards, keyed_cache) -> None:
    cache, _ = keyed_cache
    full = [b.keys for b in iter_batches(_config(shards, cache=cache, layer="mid", seed=5))]
    rest = [
        b.keys
        for b in iter_batches(_config(shards, cache=cache, layer="mid", seed=5, skip_batches=2))
    ]
    assert rest == full[2:]


def test_workers_read_every_sample_once(shards, keyed_cache) -> None:
    cache, _ = keyed_cache
    batches = list(iter_batches(_config(shards, cache=cache, layer="mid", num_workers=2)))
    keys = [k for b in batches for k in b.keys]
    assert sorted(keys) == sorted(all_keys(shards))
    for b in batches:
        want = torch.from_numpy(np.stack([key_vector(k, 16, 24) for k in b.keys]))
        got = b.target.float() if b.scales is None else b.target.float() * b.scales[..., None]
        assert torch.allclose(got, want, atol=0.05, rtol=0.02)


@pytest.fixture(scope="module")
def holey_cache(shards, tmp_path_factory) -> tuple[Path, list[str]]:
    keys = all_keys(shards)
    dropped = [keys[3], keys[20], keys[21]]
    path = tmp_path_factory.mktemp("holey") / "cache"
    write_cache(path, shards, [LAYER], key_features("mid", 16, 24), drop_keys=dropped)
    return path, dropped


def test_missing_key_is_an_error_naming_it(shards, holey_cache) -> None:
    cache, dropped = holey_cache
    with pytest.raises(UnknownKeyError, match=dropped[0]) as err:
        list(iter_batches(_config(shards, cache=cache, layer="mid", shuffle=False)))
    assert "--on-missing skip" in str(err.value)


def test_missing_keys_skipped_and_counted(shards, holey_cache) -> None:
    cache, dropped = holey_cache
    batches = list(iter_batches(_config(shards, cache=cache, layer="mid", on_missing="skip")))
    assert sorted(k for b in batches for k in b.missing) == sorted(dropped)
    keys = [k for b in batches for k in b.keys]
    assert sorted(keys) == sorted(set(all_keys(shards)) - set(dropped))


def test_no_cache_gives_frames_only_and_pil_on_request(shards) -> None:
    (b, *_) = iter_batches(_config(shards, keep_images=True, batch_size=4))
    assert b.target is None and b.scales is None
    assert len(b.images_pil) == 4 and b.images_pil[0].mode == "RGB"


def test_pickle_members_are_never_decoded(tmp_path) -> None:
    import io
    import pickle
    import tarfile

    from featurecache.pipelines.demo.sample_data import write_sample_data

    (src,) = write_sample_data(tmp_path / "d", frames=2, shard_size=2, image_size=32)
    bomb = pickle.dumps(_Bomb())
    out = tmp_path / "evil.tar"
    with tarfile.open(src) as tin, tarfile.open(out, "w") as tout:
        for m in tin.getmembers():
            tout.addfile(m, tin.extractfile(m))
            if m.name.endswith(".json"):
                info = tarfile.TarInfo(m.name.replace(".json", ".pyd"))
                info.size = len(bomb)
                tout.addfile(info, io.BytesIO(bomb))
    (b,) = iter_batches(_config([out], batch_size=2))
    assert len(b) == 2  # the .pyd members were dropped unread


class _Bomb:
    def __reduce__(self):
        return (pytest.fail, ("a pickle was decoded",))


def test_shards_per_rank_checked() -> None:
    with pytest.raises(ValueError, match="at least 2 shards"):
        check_shards_per_rank(["a.tar"], world_size=2, num_workers=0)
    with pytest.raises(ValueError, match="num-workers"):
        check_shards_per_rank(["a.tar", "b.tar"], world_size=2, num_workers=2)
