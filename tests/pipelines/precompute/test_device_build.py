"""Local builds with `--preprocess device` end to end: the cache reads back what the teacher gives
with its device preprocessing, close to the host-preprocessed forward; host and device caches
never mix; plug-ins keep working. On the CPU (the device is the CPU's torch); the CUDA build is
under the gpu marker."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from featurecache import open_cache
from featurecache.cli import main
from featurecache.errors import SpecMismatchError
from featurecache.pipelines.precompute.config import BuildConfig, BuildError
from featurecache.pipelines.precompute.precompute import build_cache
from featurecache.pipelines.precompute.teachers import load_teacher
from featurecache.samples import decode_image, iter_samples

from ._build_helpers import assert_same_cache


@pytest.fixture
def on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """Local builds on the CPU even where CUDA is visible (these tests compare bit for bit with
    CPU forwards; the CUDA build has its own test)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


TEACHER = "efficientnet-lite0@48"  # the 64 px sample frames are resized: the resize is replayed
FIRST_SHARD = "frames-000000.tar"


def _frames(folder: Path) -> tuple[list[str], list]:
    samples = [s for p in sorted(folder.glob("*.tar")) for s in iter_samples(p)]
    return [s.key for s in samples], [decode_image(*s.image()) for s in samples]


def _build_args(frames: Path, out: Path, *extra: str) -> list[str]:
    return [
        "build",
        str(frames),
        "--teacher",
        TEACHER,
        "--layers",
        "4",
        "--out",
        str(out),
        "--codec",
        "fp16",
        "--batch-size",
        "8",
        "--shard-rows",
        "8",
        "--local",
        "--quiet",
        *extra,
    ]


def test_device_build_reads_back_the_device_forward(
    sample_data_dir: Path, tmp_path: Path, on_cpu: None
) -> None:
    frames = sample_data_dir / FIRST_SHARD
    out = tmp_path / "device.zarr"
    result = CliRunner().invoke(main, _build_args(frames, out, "--preprocess", "device"))
    assert result.exit_code == 0, result.output
    cache = open_cache(out)
    assert cache.spec.fingerprint["preprocess"]["device"]["frames"] == "uint8 (B, H, W, 3)"
    keys, images = _frames(frames.parent)
    keys, images = keys[:16], images[:16]  # the first shard's frames
    got = cache.read(keys, "4").float()
    device = load_teacher(TEACHER, ["4"], preprocess="device")
    host = load_teacher(TEACHER, ["4"])
    with torch.inference_mode():  # in the build's batches of 8: CPU kernels block by batch
        want_device = torch.cat([device(images[i : i + 8])["4"] for i in (0, 8)])
        want_host = host(images)["4"]
    torch.testing.assert_close(got, want_device.half().float(), rtol=0, atol=0)
    cos = torch.nn.functional.cosine_similarity(got, want_host, dim=-1)
    assert cos.min().item() > 0.999


def test_a_ray_device_build_equals_the_local_one(
    sample_data_dir: Path, tmp_path: Path, ray_temp_dir: str, on_cpu: None
) -> None:
    """The Ray worker loads its own teacher with device preprocessing: its fingerprint must
    equal the driver's, and it writes the local build's arrays (CPU-only Ray: num_gpus=0)."""
    import ray

    frames = sample_data_dir / FIRST_SHARD
    local, ray_out = tmp_path / "local.zarr", tmp_path / "ray.zarr"
    assert (
        CliRunner().invoke(main, _build_args(frames, local, "--preprocess", "device")).exit_code
        == 0
    )
    config = BuildConfig(
        frames=[str(frames)],
        teacher=TEACHER,
        layers=["4"],
        out=ray_out,
        codec="fp16",
        batch_size=8,
        shard_rows=8,
        local=False,
        workers=1,
        progress=False,
        preprocess="device",
    )
    ray.init(num_cpus=1, num_gpus=0, include_dashboard=False, _temp_dir=ray_temp_dir)
    try:
        summary = build_cache(config)  # joins the running Ray
    finally:
        ray.shutdown()
    assert not summary.local
    assert_same_cache(local, ray_out)


def test_host_and_device_caches_never_mix(
    sample_data_dir: Path, tmp_path: Path, on_cpu: None
) -> None:
    frames = sample_data_dir / FIRST_SHARD
    out = tmp_path / "host.zarr"
    assert CliRunner().invoke(main, _build_args(frames, out)).exit_code == 0
    assert "device" not in open_cache(out).spec.fingerprint["preprocess"]
    config = BuildConfig(
        frames=[str(frames)],
        teacher=TEACHER,
        layers=["4"],
        out=out,
        codec="fp16",
        batch_size=8,
        shard_rows=8,
        local=True,
        progress=False,
        preprocess="device",
    )
    with pytest.raises(SpecMismatchError, match="device"):
        build_cache(config)


def test_preprocess_option_is_checked(tmp_path: Path) -> None:
    with pytest.raises(BuildError, match=r"--preprocess in \('host', 'device'\), got 'gpu'"):
        BuildConfig(frames=["x"], teacher=TEACHER, layers=["4"], out=tmp_path, preprocess="gpu")
    result = CliRunner().invoke(main, _build_args(tmp_path, tmp_path / "o", "--preprocess", "x"))
    assert result.exit_code != 0 and "--preprocess" in result.output


def test_a_plugin_builds_the_same_cache_with_device_preprocess(
    sample_data_dir: Path, tmp_path: Path, on_cpu: None
) -> None:
    plugin = tmp_path / "mine.py"
    plugin.write_text(
        "import numpy as np, torch\n"
        "class Mine:\n"
        "    def __init__(self, layers, device):\n"
        "        self.layers, self.device = list(layers), device\n"
        "    def preprocess(self, images):\n"
        "        x = np.stack([np.asarray(im.resize((16, 16))) for im in images])\n"
        "        return torch.from_numpy(x).float() / 255\n"
        "    def forward(self, batch):\n"
        "        return {'x': batch.flatten(1, 2)}\n"  # (B, 256, 3)
        "    def fingerprint(self):\n"
        "        return {'model': 'mine'}\n"
    )
    frames = sample_data_dir / FIRST_SHARD
    caches = []
    for mode in ("host", "device"):
        out = tmp_path / f"{mode}.zarr"
        args = _build_args(frames, out, "--preprocess", mode)
        args[args.index(TEACHER)] = f"py:{plugin}:Mine"
        args[args.index("4")] = "x"
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 0, result.output
        caches.append(out)
    assert_same_cache(*caches)  # its preprocess ran on the host both times


@pytest.mark.gpu
def test_device_build_on_cuda_matches_the_cpu_device_build(
    sample_data_dir: Path, tmp_path: Path
) -> None:
    """A local build on CUDA with uint8 frames pinned and copied non_blocking, resized and
    normalised on the GPU, and its encoded features copied back into pinned buffers: close to
    the same build's recipe run on the CPU (the same fingerprint: one cache could hold both)."""
    frames = sample_data_dir / FIRST_SHARD
    out = tmp_path / "cuda.zarr"
    result = CliRunner().invoke(main, _build_args(frames, out, "--preprocess", "device"))
    assert result.exit_code == 0, result.output
    keys, images = _frames(frames.parent)
    cpu = load_teacher(TEACHER, ["4"], preprocess="device")
    assert open_cache(out).spec.fingerprint == cpu.fingerprint()
    with torch.inference_mode():
        want = cpu(images[:16])["4"]
    got = open_cache(out).read(keys[:16], "4").float()
    cos = torch.nn.functional.cosine_similarity(got, want, dim=-1)
    assert cos.min().item() > 0.999
