"""Benchmark: the build's host ceiling, with a teacher that costs nothing on the device.

Claim (issue 21): on a GPU node the host side must keep up with a teacher running thousands of
frames/s. With a null teacher (a `py:` plug-in whose forward returns a fixed DINOv2-B- or
ViT-L-shaped output: zero device cost) the whole build is host work, so its frames/s is the
host ceiling and its CPU ms per frame is what a real build costs the host on top of the model.
Target: host CPU per frame <= 1.3x the bare decode of the same frames, with the codec on the
teacher's device (here the device is the CPU, so the codec's cost is counted on the host: a
GPU takes it off) and uint8 pixels sent to the device (its preprocess only stacks the decoded
frames). Beside it, the same null teacher with a real teacher's CPU preprocessing (resize 224
bicubic + ImageNet normalisation to float32, the "before" of issue 21).

Per frame format (PNG, JPEG q90) and size (224, 448 px), output shape, preprocessing and
`--compressor`, in one run: bare decode (CPU ms/frame, one thread), the local build (frames/s;
CPU ms/frame of the whole process: decode pool, forward, codec, writer), that over the bare
decode, the same less the codec measured alone (an estimate of the host's share where a GPU runs
the codec: on a GPU the build measures it directly), and the host cores one GPU needs at GPU_FPS
frames/s (CPU ms/frame * GPU_FPS / 1000). Stages, measured alone
on the same frames: decode + preprocess, the codec (encode_torch on this CPU), the writer
(append + compress + checksum + write of encoded rows). And the preprocessing stage of
`--preprocess host` vs `device` for a DINOv2-style processor (resize 224 bicubic + ImageNet
mean/std, transformers' PIL backend), CPU ms/frame: host (PIL resize + normalise to float32 in the
decode threads), device's host share (stacking uint8 frames: all the decode threads still do)
and device's device share, here run by this CPU's torch (on a GPU it is device time: the saving
on the host is host minus stack, and shows only on a GPU).

    python -m featurecache.benchmarks.ceiling [--json FILE] [--quick]
    featurecache bench ceiling [--json FILE] [--quick]
"""

from __future__ import annotations

import io
import shutil
import tarfile
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from featurecache.benchmarks import harness
from featurecache.pipelines.precompute.teachers.device_preprocess import (
    DevicePreprocess,
    FrameBatch,
)

TITLE = "Build host ceiling: null teacher (zero device cost) vs bare decode"
GPU_FPS = 5000  # a ViT-B-class teacher on one H100 (issue 21): the speed the host must feed
SHAPES = {"DINOv2-B": (256, 768), "ViT-L": (256, 1024)}  # (tokens, dim) at 224 px, patch 14
MAX_BATCH = 64
IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


class NullTeacher:
    """A teacher protocol object (pipelines/precompute/teachers/plugin.py) whose forward costs
    nothing: a fixed (B, tokens, dim) float32 output per layer. `cpu_preprocess` False: frames
    go to the device as uint8 (B, H, W, 3), stacked as decoded; True: resized to 224 (bicubic)
    and normalised to float32 (B, 3, 224, 224) on the host, as a typical teacher's processor."""

    def __init__(
        self, layers: Sequence[str], device: str, shape: tuple[int, int], cpu_preprocess: bool
    ) -> None:
        self.layers, self.device, self.cpu_preprocess = list(layers), device, cpu_preprocess
        gen = torch.Generator().manual_seed(0)
        self.out = torch.randn(MAX_BATCH, *shape, generator=gen).to(device)
        self.shape = shape

    def preprocess(self, images: list[Image.Image]) -> torch.Tensor:
        if not self.cpu_preprocess:
            return torch.from_numpy(np.stack([np.asarray(im) for im in images]))
        sized = [np.asarray(im.resize((224, 224), Image.Resampling.BICUBIC)) for im in images]
        x = torch.from_numpy(np.stack(sized)).permute(0, 3, 1, 2).float() / 255.0
        return (x - IMAGENET_MEAN) / IMAGENET_STD

    def forward(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        return {layer: self.out[: batch.shape[0]] for layer in self.layers}

    def fingerprint(self) -> dict[str, Any]:
        pre = "resize 224 bicubic, ImageNet mean/std" if self.cpu_preprocess else "uint8 as is"
        return {"model": "null", "shape": list(self.shape), "preprocess": pre}


def null_dinov2b(layers: Sequence[str], device: str) -> NullTeacher:
    return NullTeacher(layers, device, SHAPES["DINOv2-B"], cpu_preprocess=False)


def null_vitl(layers: Sequence[str], device: str) -> NullTeacher:
    return NullTeacher(layers, device, SHAPES["ViT-L"], cpu_preprocess=False)


def null_dinov2b_cpu_preprocess(layers: Sequence[str], device: str) -> NullTeacher:
    return NullTeacher(layers, device, SHAPES["DINOv2-B"], cpu_preprocess=True)


FACTORIES = {  # (shape, preprocessing, --compressor) -> the plug-in factory's name here
    ("DINOv2-B", "uint8", "zstd:3"): "null_dinov2b",
    ("DINOv2-B", "uint8", "none"): "null_dinov2b",
    ("ViT-L", "uint8", "zstd:3"): "null_vitl",
    ("DINOv2-B", "cpu resize+normalise", "zstd:3"): "null_dinov2b_cpu_preprocess",
}


def _as_jpeg(src: Path, dst: Path) -> None:
    """Copy the tar shards of `src` into `dst` with every .png member re-encoded as JPEG q90."""
    dst.mkdir(parents=True)
    for shard in sorted(src.glob("*.tar")):
        with tarfile.open(shard) as tin, tarfile.open(dst / shard.name, "w") as tout:
            for member in tin.getmembers():
                data = tin.extractfile(member).read()  # type: ignore[union-attr]
                name = member.name
                if name.endswith(".png"):
                    out = io.BytesIO()
                    Image.open(io.BytesIO(data)).convert("RGB").save(out, "JPEG", quality=90)
                    data, name = out.getvalue(), name[: -len(".png")] + ".jpg"
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tout.addfile(info, io.BytesIO(data))


def _decoded(frames: Path) -> tuple[list[Image.Image], float]:
    """Every frame decoded (one thread) and the CPU ms per frame it took."""
    from featurecache.samples import decode_image, iter_samples

    start = time.process_time()
    images = [
        decode_image(*s.image()) for p in sorted(frames.glob("*.tar")) for s in iter_samples(p)
    ]
    return images, 1e3 * (time.process_time() - start) / len(images)


def _stages(images: list[Image.Image], factory: str, root: Path) -> dict[str, float]:
    """CPU ms per frame of each stage alone: preprocess, the codec on this CPU, the writer."""
    import featurecache as fc
    from featurecache.codecs import calibrate_channel_scale, encode_torch

    teacher = globals()[factory](["x"], "cpu")
    n, batch = len(images), 32
    start = time.process_time()
    inputs = [teacher.preprocess(images[i : i + batch]) for i in range(0, n, batch)]
    pre = time.process_time() - start
    outs = [teacher.forward(b)["x"] for b in inputs]
    scale = calibrate_channel_scale(outs[0][:16].numpy())
    start = time.process_time()
    encoded = [encode_torch(o, "int8c", torch.from_numpy(scale)) for o in outs]
    codec = time.process_time() - start
    spec = fc.CacheSpec((fc.LayerSpec("x", *teacher.shape),), "int8c", 64, {"m": "null"})
    writer = fc.create_cache(root / "stage.zarr", spec, fc.plan_blocks([("s", n)], 64),
                             channel_scales={"x": scale})  # fmt: skip
    start = time.process_time()
    block = writer.open_block(0)
    for i, enc in enumerate(encoded):
        block.append([f"k{i}-{j}" for j in range(len(enc.values))], {"x": enc})
    writer.mark_done(block.finish())
    write = time.process_time() - start
    shutil.rmtree(root / "stage.zarr")
    return {"preprocess": 1e3 * pre / n, "codec": 1e3 * codec / n, "writer": 1e3 * write / n}


def _preprocess_stage(images: list[Image.Image]) -> dict[str, float]:
    """CPU ms per frame of a DINOv2-style processor's preprocessing (224 bicubic, ImageNet),
    batches of 32: on the host (the processor, PIL backend), and with --preprocess device: the
    decode threads' uint8 stack, and the device replay run on this CPU."""
    import transformers

    processor = transformers.ViTImageProcessorPil(
        size={"height": 224, "width": 224},
        resample=Image.Resampling.BICUBIC,
        image_mean=IMAGENET_MEAN.flatten().tolist(),
        image_std=IMAGENET_STD.flatten().tolist(),
    )
    recipe = DevicePreprocess.from_image_processor(processor, where="bench")
    batches = [images[i : i + 32] for i in range(0, len(images), 32)]
    times = {}
    start = time.process_time()
    for b in batches:
        processor(images=b, return_tensors="pt")
    times["pre_host_ms"] = time.process_time() - start
    start = time.process_time()
    stacked = [FrameBatch.stack(b) for b in batches]
    times["pre_stack_ms"] = time.process_time() - start
    start = time.process_time()
    with torch.inference_mode():
        for b in stacked:
            recipe(b)
    times["pre_device_on_cpu_ms"] = time.process_time() - start
    return {k: 1e3 * v / len(images) for k, v in times.items()}


def _build(frames: Path, factory: str, out: Path, n: int, compressor: str) -> tuple[float, float]:
    """A local build with the null teacher: (frames/s, process CPU ms per frame)."""
    from featurecache.pipelines.precompute.config import BuildConfig
    from featurecache.pipelines.precompute.precompute import build_cache

    config = BuildConfig(
        frames=[str(frames)], teacher=f"py:featurecache.benchmarks.ceiling:{factory}",
        layers=["x"], out=out, batch_size=32, local=True, progress=False, compressor=compressor,
    )  # fmt: skip
    start, start_cpu = time.perf_counter(), time.process_time()
    build_cache(config)
    wall, cpu = time.perf_counter() - start, time.process_time() - start_cpu
    shutil.rmtree(out, ignore_errors=True)
    return n / wall, 1e3 * cpu / n


def run(json_path: str | Path | None = None, quick: bool = False) -> list[harness.Result]:
    """Measure, print the table, write JSON when asked and (unless `quick`) record the table in
    benchmarks/RESULTS.md."""
    from featurecache.pipelines.demo.sample_data import write_sample_data

    n, sizes = (32, (64,)) if quick else (256, (224, 448))
    cases = list(FACTORIES.items())[:1] if quick else list(FACTORIES.items())
    device = harness.build_device_name()  # stages alone run on the CPU; builds on the GPU
    root = Path(tempfile.mkdtemp(prefix="fcbench-ceiling-"))
    rows: list[harness.Result] = []
    try:
        for size in sizes:
            png = root / f"png{size}"
            write_sample_data(png, frames=n, shard_size=64, image_size=size)
            _as_jpeg(png, root / f"jpeg{size}")
            for fmt in ("png", "jpeg"):
                frames = root / f"{fmt}{size}"
                images, decode_ms = _decoded(frames)
                prep = _preprocess_stage(images)
                for (shape, pre, compressor), factory in cases:
                    stages = _stages(images, factory, root)
                    fps, cpu_ms = _build(frames, factory, root / "cache.zarr", n, compressor)
                    what = f"{fmt.upper()} {size}px, {shape} {SHAPES[shape]}, {pre}, {compressor}"
                    rows.append(harness.result(
                        what, "local build, null teacher", [1e3 / fps], "ms/frame", device,
                        frames_per_s=fps, cpu_ms_per_frame=cpu_ms, bare_decode_ms=decode_ms,
                        x_bare_decode=cpu_ms / decode_ms, cores_at_gpu_fps=cpu_ms * GPU_FPS / 1e3,
                        x_bare_decode_less_codec=(cpu_ms - stages["codec"]) / decode_ms,
                        preprocess_ms=stages["preprocess"], codec_ms=stages["codec"],
                        writer_ms=stages["writer"], **prep,
                    ))  # fmt: skip
    finally:
        shutil.rmtree(root, ignore_errors=True)
    harness.publish(
        rows,
        TITLE,
        json_path,
        None if quick else "ceiling",
        f"{n} sample frames per case, one local build each (batch 32, int8c). ms/frame is "
        "wall; cpu_ms_per_frame is the process's CPU over all threads; x_bare_decode is it "
        "over the bare decode of the same frames (target <= 1.3x with uint8 to the device "
        "and the codec on it); x_bare_decode_less_codec: the same less the codec measured "
        "alone (an estimate of the host's share where a GPU runs the codec); "
        f"cores_at_gpu_fps: host cores to feed {GPU_FPS} frames/s. "
        "Stages alone (CPU ms/frame): preprocess, codec (on this CPU: on a GPU it is device "
        "time), writer. pre_*: a DINOv2-style processor (224 bicubic, ImageNet) alone: "
        "pre_host_ms with --preprocess host (PIL, float32), pre_stack_ms the decode "
        "threads' share with --preprocess device (uint8 stack), pre_device_on_cpu_ms its "
        "device share run by this CPU's torch (device time on a GPU). " + harness.load_note(),
    )
    return rows


if __name__ == "__main__":
    harness.main(run, __doc__)
