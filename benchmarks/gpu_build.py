"""Benchmark: a build against the bare forward of a ViT-B-class teacher, on the device it runs on.

Claim (issues 4 and 21): the whole build (decode, preprocessing, the teacher, the codec on the
teacher's device, the writer) runs at >= 0.9x of the teacher's bare forward throughput, and its
host CPU per frame is what the host must supply to keep a GPU busy. Made for a GPU machine
(`make bench-gpu`): DINOv2-B/14 at 224 px (the issue's teacher: 12 blocks of 768, 256 patch
tokens) built from its real config with random weights, saved and loaded as an `hf:` teacher
(speed does not depend on the weights' values). Without CUDA (this CPU, tests) a tiny DINOv2
(8 blocks of 32) on 64 px frames stands in: the pipeline's figures, not a GPU's.

On one set of procedural PNG frames (sample_data, tar shards), in one run:
- bare forward: `teacher.forward` over batches already decoded, preprocessed and on the
  device; frames/s (CUDA: synchronised);
- the local build (`build_cache`, --local: no Ray start-up) into a fresh cache, with
  `--preprocess host` and `device`: frames/s
  once the teacher is loaded (`frames_per_s_running`) and end to end, their ratio to the bare
  forward, and the build process's CPU ms per frame (all threads).

    python -m featurecache.benchmarks.gpu_build [--json FILE] [--quick]
    featurecache bench gpu_build [--json FILE] [--quick]
"""

from __future__ import annotations

import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from featurecache.benchmarks import harness

TITLE = "Build vs bare teacher forward (DINOv2 from its config, random weights)"
LAYER = "8"
BATCH = 64


def _save_teacher(folder: Path, tiny: bool) -> str:
    """A DINOv2 from its real config, random weights, saved with save_pretrained: its hf: spec."""
    from transformers import Dinov2Config, Dinov2Model

    if tiny:
        config = Dinov2Config(hidden_size=32, num_hidden_layers=8, num_attention_heads=2,
                              intermediate_size=64, image_size=32, patch_size=8)  # fmt: skip
    else:
        config = Dinov2Config(image_size=224, patch_size=14)  # ViT-B: 12 x 768, 12 heads
    torch.manual_seed(0)
    Dinov2Model(config).save_pretrained(folder)
    return f"hf:{folder}"


def _bare_forward(spec: str, frames: Path, device: str, repeats: int) -> list[float]:
    """frames/s of teacher.forward over pre-made batches on `device`, one sample per pass."""
    from featurecache.pipelines.precompute.teachers import load_teacher
    from featurecache.samples import decode_image, iter_samples

    teacher = load_teacher(spec, [LAYER], device=device)
    images = [
        decode_image(*s.image()) for p in sorted(frames.glob("*.tar")) for s in iter_samples(p)
    ]
    batches = [
        teacher.preprocess(images[i : i + BATCH]).to(device) for i in range(0, len(images), BATCH)
    ]
    samples = []
    with torch.inference_mode():
        for _ in range(repeats + 1):  # the first pass warms up (kernels, allocator)
            _sync(device)
            start = time.perf_counter()
            for b in batches:
                teacher.forward(b)
            _sync(device)
            samples.append(len(images) / (time.perf_counter() - start))
    return samples[1:]


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def _build(spec: str, frames: Path, out: Path, n: int, **options: Any) -> tuple[float, ...]:
    """A local build: (frames/s running, frames/s end to end, process CPU ms per frame)."""
    from featurecache.pipelines.precompute.config import BuildConfig
    from featurecache.pipelines.precompute.precompute import build_cache

    config = BuildConfig(frames=[str(frames)], teacher=spec, layers=[LAYER], out=out,
                         batch_size=BATCH, local=True, progress=False, **options)  # fmt: skip
    start, cpu = time.perf_counter(), time.process_time()
    summary = build_cache(config)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    shutil.rmtree(out, ignore_errors=True)
    return summary.frames_per_s_running, n / wall, 1e3 * cpu / n


PLACEMENTS = ("host", "device")  # --preprocess values compared


def run(json_path: str | Path | None = None, quick: bool = False) -> list[harness.Result]:
    """Measure, print the table, write JSON when asked and (unless `quick`) record the table in
    benchmarks/RESULTS.md."""
    from featurecache.pipelines.demo.sample_data import write_sample_data

    device = "cuda" if torch.cuda.is_available() else "cpu"
    name = harness.build_device_name()
    tiny = quick or device == "cpu"
    if quick:
        n, size, repeats = 64, 32, 1
    else:
        n, size, repeats = (4096, 224, 3) if device == "cuda" else (512, 64, 3)
    root = Path(tempfile.mkdtemp(prefix="fcbench-gpu-build-"))
    rows: list[harness.Result] = []
    try:
        spec = _save_teacher(root / "dinov2", tiny)
        frames = root / "frames"
        write_sample_data(frames, frames=n, shard_size=min(n // 2, 512), image_size=size)
        bare = _bare_forward(spec, frames, device, repeats)
        bare_fps = statistics.median(bare)
        model = "tiny DINOv2 (8 x 32)" if tiny else "DINOv2-B/14"
        what = f"{model}, {n} PNG frames {size}px, layer {LAYER}, batch {BATCH}, int8c"
        rows.append(harness.result(what, "bare forward", bare, "frames/s", name))
        for placement in PLACEMENTS:
            builds = [
                _build(spec, frames, root / f"cache-{r}", n, preprocess=placement)
                for r in range(repeats)
            ]
            running, e2e, cpu_ms = (list(column) for column in zip(*builds, strict=True))
            rows.append(harness.result(
                what, f"local build (preprocess {placement})", running, "frames/s", name,
                x_bare_forward=statistics.median(running) / bare_fps,
                end_to_end_fps=statistics.median(e2e), cpu_ms_per_frame=statistics.median(cpu_ms),
            ))  # fmt: skip
    finally:
        shutil.rmtree(root, ignore_errors=True)
    harness.publish(
        rows,
        TITLE,
        json_path,
        None if quick else "gpu_build",
        f"{n} frames, {repeats} passes or builds each (medians). frames/s of the build is "
        "from the teacher loaded to the last block done; x_bare_forward is it over the bare "
        "forward's (target >= 0.9); cpu_ms_per_frame is the build process's CPU over all "
        "threads per frame. " + harness.load_note(),
    )
    return rows


if __name__ == "__main__":
    harness.main(run, __doc__)
