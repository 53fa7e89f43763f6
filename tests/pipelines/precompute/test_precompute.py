"""The build, Ray and local: correctness against direct teacher forwards, local == Ray == Python
iterables array for array, resume, dead workers, bad inputs.

The fast Ray tests share one local Ray instance (module fixture; build_cache reuses a running Ray
and leaves it running). The slow subprocess tests (driver SIGKILL, a two-node cluster) are in
test_precompute_processes.py.
"""

from __future__ import annotations

import io
import os
import tarfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from featurecache import open_cache
from featurecache.errors import (
    FeatureCacheError,
    NotACacheError,
    SpecMismatchError,
    UnknownLayerError,
)
from featurecache.pipelines.precompute import precompute
from featurecache.pipelines.precompute.build_worker import BuildWorker
from featurecache.pipelines.precompute.config import BuildConfig, BuildError
from featurecache.pipelines.precompute.precompute import IterableShard, build_cache
from featurecache.pipelines.precompute.teachers import UnknownTeacherError, load_teacher
from featurecache.samples import BadFrameError, FramesNotFoundError, decode_image, iter_samples

from ._build_helpers import assert_same_cache, cache_arrays, read_manifest


@pytest.fixture(scope="module")
def ray_session() -> Iterator[None]:
    import shutil
    import tempfile

    import ray

    temp = tempfile.mkdtemp(prefix="fcray", dir="/tmp")
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=temp, logging_level="ERROR")
    yield
    ray.shutdown()
    shutil.rmtree(temp, ignore_errors=True)


def _config(frames: Path | list, out: Path, **kw) -> BuildConfig:
    base = {
        "teacher": "efficientnet-lite0@64",
        "layers": ["4"],
        "batch_size": 8,
        "shard_rows": 8,
        "progress": False,
        "local": False,
    }
    base.update(kw)
    items = frames if isinstance(frames, list) else [frames]
    frames = [str(f) if isinstance(f, Path) else f for f in items]
    return BuildConfig(frames=frames, out=out, **base)


def _direct(teacher_spec: str, layers: list[str], frames_dir: Path) -> tuple[list, dict]:
    teacher = load_teacher(teacher_spec, layers)
    keys, images = [], []
    for shard in sorted(frames_dir.glob("*.tar")):
        for s in iter_samples(shard):
            keys.append(s.key)
            images.append(decode_image(*s.image()))
    return keys, teacher(images)


# ---------------------------------------------------------------- real builds (fast suite)


def test_build_hf_teacher_equals_direct_forward(
    ray_session: None, sample_data_dir: Path, tiny_vit_path: Path, tmp_path: Path
) -> None:
    spec = f"hf:{tiny_vit_path}"
    summary = build_cache(
        _config(sample_data_dir, tmp_path / "c8", teacher=spec, layers=["2", "4"], workers=2)
    )
    assert summary.frames == summary.new_frames == 48 and summary.blocks == 3
    assert summary.workers == 2 and summary.retries == 0 and summary.compression > 1
    keys, want = _direct(spec, ["2", "4"], sample_data_dir)
    cache = open_cache(tmp_path / "c8")
    assert cache.keys == keys  # every key, in shard order
    assert cache.spec.fingerprint == load_teacher(spec, ["2", "4"]).fingerprint()
    for layer in ("2", "4"):
        got = cache.read(keys, layer)
        # int8c (the default; int8 has c = 1): error <= scale * c / 2, scale = absmax(x / c) / 127
        c = cache.channel_scale(layer)
        c = torch.ones(want[layer].shape[-1]) if c is None else torch.from_numpy(c)
        bound = (want[layer] / c).abs().amax(-1, keepdim=True) / 254 * c + 1e-6
        assert ((got - want[layer]).abs() <= bound * 1.01).all()


@pytest.fixture(scope="module")
def eff_cache(
    ray_session: None, sample_data_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """An uninterrupted fp16 efficientnet-lite0@64 build of `sample_data_dir` (layer 4)."""
    out = tmp_path_factory.mktemp("eff") / "cache"
    summary = build_cache(_config(sample_data_dir, out, codec="fp16"))
    assert summary.frames == 48 and summary.retries == 0
    return out


def test_build_efficientnet_equals_direct_forward_and_resumes(
    eff_cache: Path, sample_data_dir: Path
) -> None:
    keys, want = _direct("efficientnet-lite0@64", ["4"], sample_data_dir)
    cache = open_cache(eff_cache)
    assert cache.keys == keys
    got = cache.read(keys, "4")
    assert got.dtype == torch.float16
    torch.testing.assert_close(got.float(), want["4"], atol=2e-3, rtol=2e-3)
    before = cache_arrays(eff_cache)
    again = build_cache(_config(sample_data_dir, eff_cache, codec="fp16"))  # nothing left to do
    assert again.blocks_resumed == 3 and again.new_frames == 0 and again.frames == 48
    after = cache_arrays(eff_cache)
    assert all(np.array_equal(before[k], after[k]) for k in before)
    assert [b.done for b in read_manifest(eff_cache).blocks] == [True] * 3


def test_local_and_iterable_builds_equal_the_ray_build(
    eff_cache: Path, sample_data_dir: Path, tmp_path: Path
) -> None:
    local = build_cache(_config(sample_data_dir, tmp_path / "local", codec="fp16", local=True))
    assert local.local and local.workers == 1 and local.frames == 48
    assert_same_cache(eff_cache, tmp_path / "local")
    # the same frames as Python iterables: one list of (key, PIL image) per tar, and one
    # map-style dataset of (key, uint8 array); one block each, like the tars
    shards = []
    for i, tar in enumerate(sorted(sample_data_dir.glob("*.tar"))):
        pairs = [(s.key, decode_image(*s.image())) for s in iter_samples(tar)]
        if i == 1:
            shards.append(_MapStyle([(k, np.asarray(im)) for k, im in pairs]))
        else:
            shards.append(pairs)
    for mode, out in ((True, "iter-local"), (False, "iter-ray")):
        summary = build_cache(_config(shards, tmp_path / out, codec="fp16", local=mode))
        assert summary.frames == 48 and summary.local == mode
        assert_same_cache(eff_cache, tmp_path / out, encoded=False)
    assert read_manifest(tmp_path / "iter-ray").blocks[1].source == "iterable-000001"
    # a one-shot generator is refused (it would be read twice), keys with dots too
    with pytest.raises(FeatureCacheError, match="one-shot generator"):
        IterableShard(x for x in shards[0])
    with pytest.raises(FeatureCacheError, match=r"item 0 of iterable-000000.*'a\.1'"):
        build_cache(_config([[("a.1", np.zeros((4, 4, 3), np.uint8))]], tmp_path / "dots"))


def test_local_build_resumes_after_a_failure(
    eff_cache: Path, sample_data_dir: Path, tmp_path: Path
) -> None:
    """A local build stopped by a bad frame in its last block keeps the blocks it finished; the
    same command on the repaired shard writes only that block and equals the uninterrupted
    build (the manifest, the writer and the fingerprint are the Ray build's)."""
    frames = tmp_path / "frames"
    frames.mkdir()
    for tar in sorted(sample_data_dir.glob("*.tar")):
        (frames / tar.name).write_bytes(tar.read_bytes())
    last = frames / "frames-000002.tar"
    good = last.read_bytes()
    with tarfile.open(sample_data_dir / last.name) as src, tarfile.open(last, "w") as dst:
        for info in src:
            data = src.extractfile(info).read()
            if info.name.endswith(".png"):
                data = b"\x89PNG broken"
            info.size = len(data)
            dst.addfile(info, io.BytesIO(data))
    config = _config(frames, tmp_path / "cache", codec="fp16", local=True)
    with pytest.raises(BadFrameError):
        build_cache(config)
    assert [b.done for b in read_manifest(tmp_path / "cache").blocks] == [True, True, False]
    last.write_bytes(good)
    summary = build_cache(_config(frames, tmp_path / "cache", codec="fp16", local=True))
    assert summary.blocks_resumed == 2 and summary.new_frames == 16
    assert_same_cache(eff_cache, tmp_path / "cache")


class _MapStyle:
    """A map-style dataset (like torch.utils.data.Dataset): __len__ and __getitem__ only."""

    def __init__(self, items: list) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple:
        return self.items[i]


def _dying_worker(marker: Path) -> type[BuildWorker]:
    """A BuildWorker whose process dies (os._exit, as a crashed node would) right after writing
    its first batch of block 1, once: the first actor to get there creates `marker` and dies; the
    block's retry finds the marker and goes on. A class local to this function, so Ray ships it to
    the actors by value (cloudpickle) and the fault lives in the test alone."""

    class DyingWorker(BuildWorker):
        def __init__(self, config, fingerprint, device, report=None, teacher=None, cores=1):
            def die_then_report(index: int, frames: int) -> None:
                # called after each batch is written, before the block is done
                if index == 1 and not marker.exists():
                    marker.write_text(str(os.getpid()))
                    os._exit(1)
                if report is not None:
                    report(index, frames)

            super().__init__(config, fingerprint, device, die_then_report, teacher, cores)

    return DyingWorker


def test_dead_worker_is_replaced_and_result_unchanged(
    eff_cache: Path, sample_data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    marker = tmp_path / "killed"
    monkeypatch.setattr(precompute, "BuildWorker", _dying_worker(marker))  # the driver's actors
    summary = build_cache(_config(sample_data_dir, tmp_path / "faulty", codec="fp16"))
    assert marker.exists()  # the actor did die mid-block (after its first batch of block 1)
    assert summary.retries == 1 and summary.frames == 48
    assert_same_cache(eff_cache, tmp_path / "faulty")


def test_bad_frames_fail_or_skip(ray_session: None, sample_data_dir: Path, tmp_path: Path) -> None:
    shard = tmp_path / "frames" / "frames-000000.tar"
    shard.parent.mkdir()
    with (
        tarfile.open(sample_data_dir / "frames-000000.tar") as src,
        tarfile.open(shard, "w") as dst,
    ):
        for info in src:
            data = src.extractfile(info).read()
            if info.name == "train-e00000-s005.png":
                data = b"\x89PNG broken"
            info.size = len(data)
            dst.addfile(info, io.BytesIO(data))
    with pytest.raises(BadFrameError, match=r"'train-e00000-s005' of .*frames-000000\.tar"):
        build_cache(_config(shard.parent, tmp_path / "fail"))
    summary = build_cache(_config(shard.parent, tmp_path / "skip", on_bad_frame="skip"))
    assert summary.frames == 15 and summary.skipped == 1
    manifest = read_manifest(tmp_path / "skip")
    assert manifest.blocks[0].skipped == ("train-e00000-s005",)
    cache = open_cache(tmp_path / "skip")
    assert "train-e00000-s005" not in cache and len(cache.keys) == 15


def test_cli_build_and_fingerprint_mismatch(
    ray_session: None, sample_data_dir: Path, tmp_path: Path
) -> None:
    from click.testing import CliRunner

    from featurecache.cli import main

    out = tmp_path / "cli"
    args = [
        "build",
        str(sample_data_dir / "frames-{000001..000001}.tar"),
        "--teacher",
        "efficientnet-lite0@64",
        "--layers",
        "4,7",
        "--out",
        str(out),
        "--batch-size",
        "8",
        "--shard-rows",
        "16",
        "--quiet",
    ]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "16 frames in 1 blocks" in result.output and "smaller than fp16" in result.output
    assert open_cache(out).spec.layer("7").grid == (4, 4)
    # another teacher's features are refused, showing both fingerprints
    args[args.index("4,7")] = "4"
    result = CliRunner().invoke(main, args)
    assert result.exit_code != 0 and "Expected" in result.output
    with pytest.raises(SpecMismatchError, match=r"'7'"):
        build_cache(_config(sample_data_dir / "frames-000001.tar", out, shard_rows=16))
    # --overwrite starts over
    result = CliRunner().invoke(main, [*args, "--overwrite"])
    assert result.exit_code == 0, result.output
    assert open_cache(out).spec.layer_names == ("4",)


# ---------------------------------------------------------------- checked before any work


def _tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_bad_inputs_fail_before_ray(sample_data_dir: Path, tmp_path: Path) -> None:
    first = sample_data_dir / "frames-000000.tar"
    cases = [
        (_config(tmp_path / "missing", tmp_path / "o1"), FramesNotFoundError, "missing"),
        (
            _config(_tar(tmp_path / "e" / "empty.tar", []), tmp_path / "o2"),
            BuildError,
            r"none in .*empty\.tar",
        ),
        (
            _config([first, _dup(first, tmp_path / "dup" / "copy.tar")], tmp_path / "o3"),
            BuildError,
            r"'train-e00000-s000' in .*frames-000000\.tar and in .*copy\.tar",
        ),
        (_config(first, tmp_path / "o4", teacher="vit-huge"), UnknownTeacherError, "vit-huge"),
        (_config(first, tmp_path / "o5", layers=["99"]), UnknownLayerError, "got '99'"),
    ]
    (tmp_path / "o6").mkdir()
    (tmp_path / "o6" / "notes.txt").write_text("mine")
    cases.append((_config(first, tmp_path / "o6"), NotACacheError, "not a cache"))
    (tmp_path / "o7").write_text("a file")
    cases.append((_config(first, tmp_path / "o7"), NotACacheError, "got a file"))
    for config, error, match in cases:
        with pytest.raises(error, match=match):
            build_cache(config)
    assert (tmp_path / "o6" / "notes.txt").read_text() == "mine"  # never deleted
    with pytest.raises(BuildError, match="codec"):
        _config(first, tmp_path / "o8", codec="bf16")
    with pytest.raises(BuildError, match="on-bad-frame"):
        _config(first, tmp_path / "o8", on_bad_frame="ignore")


def _dup(src: Path, dst: Path) -> Path:
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_bytes(src.read_bytes())
    return dst


@pytest.mark.gpu
def test_build_on_gpu_matches_cpu_forward(
    sample_data_dir: Path, tmp_path: Path, ray_temp_dir: str
) -> None:
    """With a GPU, workers ask for one (--gpus-per-worker) and run the teacher on it."""
    ray = pytest.importorskip("ray")  # a GPU machine may lack it (make bench-gpu)
    if ray.is_initialized():  # the module's CPU-only session (this test runs last)
        ray.shutdown()
    ray.init(num_cpus=2, num_gpus=1, include_dashboard=False, _temp_dir=ray_temp_dir)
    try:
        summary = build_cache(_config(sample_data_dir, tmp_path / "gpu", codec="fp16"))
    finally:
        ray.shutdown()
    assert summary.frames == 48
    keys, want = _direct("efficientnet-lite0@64", ["4"], sample_data_dir)
    got = open_cache(tmp_path / "gpu").read(keys, "4").float()
    torch.testing.assert_close(got, want["4"], atol=1e-2, rtol=1e-2)


def test_cli_rejects_a_bad_grid(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from featurecache.cli import main

    args = ["build", str(tmp_path), "--teacher", "efficientnet-lite0", "--layers", "4"]
    result = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "c"), "--grid", "16by16"])
    assert result.exit_code == 2 and "Expected HxW" in result.output
