"""Benchmark: training with augmentation, three ways to get the teacher's targets (issue 20).

Claim: a student trained on augmented frames against cached views (`train --augment views`) is
aligned to the pixels it sees, as with a resident teacher on fresh augmentations, at the cost of
a cache read; the naive cache (augmented student, the plain frame's target) is aligned to another
picture. Measured on the demo's procedural data (same seed, same steps, one run each):

- views:          `build --views 4 --augment openvla`, `train --augment views`
- resident fresh: `train --resident-teacher ... --augment fresh --augment-recipe openvla`
- naive cache:    the same cache's view 0, `train --augment fresh --augment-recipe openvla`
- no alignment:   `--lambda 0 --augment fresh --augment-recipe openvla` (the reference)

Per run: steps/s while training (two runs at a time, one torch thread each), held-out and OOD
action L1 over the live dimensions (`evaluate_run`), and the alignment cosine on the
un-augmented train frames against the cache's view 0 (`evaluate_run(..., cache=)`).

    python -m featurecache.benchmarks.augment [--json FILE] [--quick]
    featurecache bench augment [--json FILE]
"""

from __future__ import annotations

import multiprocessing
import shutil
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from featurecache.benchmarks import harness

TITLE = "Augmented training: cached views vs a resident teacher on fresh augmentations vs naive"
TEACHER, LAYER, RECIPE, VIEWS = "efficientnet-lite0", "10", "openvla", 4
SPLITS = ("train-heldout", "ood-vision", "ood-semantic", "ood-execution")


def _one_thread() -> None:
    import torch

    torch.set_num_threads(1)


def _train(config) -> dict[str, float]:
    from featurecache.pipelines.training.loop import train

    summary = train(config)
    return {"steps_per_s": summary.steps / summary.seconds, **summary.losses}


def run(json_path: str | Path | None = None, quick: bool = False) -> list[harness.Result]:
    """Measure, print the table, write JSON when asked and (unless `quick`) record the table in
    benchmarks/RESULTS.md."""
    from featurecache.pipelines.demo.sample_data import LIVE_ACTION_DIMS, write_sample_data
    from featurecache.pipelines.precompute.config import BuildConfig
    from featurecache.pipelines.precompute.precompute import build_cache
    from featurecache.pipelines.training.config import TrainConfig
    from featurecache.pipelines.training.evaluate import evaluate_run

    size = 64 if quick else 112
    train_n, eval_n, steps = (64, 32, 4) if quick else (1536, 384, 800)
    teacher = f"{TEACHER}@{size}"
    device = harness.device_name("cpu")
    root = Path(tempfile.mkdtemp(prefix="fc-bench-augment-"))
    rows: list[harness.Result] = []
    try:
        data = {}
        for i, split in enumerate(("train", *SPLITS)):
            name = "train" if split == "train-heldout" else split
            data[split] = root / split
            write_sample_data(data[split], frames=train_n if split == "train" else eval_n,
                              shard_size=512, image_size=size, seed=100 if split ==
                              "train-heldout" else i, split=name,
                              frames_per_episode=4)  # fmt: skip
        cache = root / "views.zarr"
        build_cache(BuildConfig(frames=[str(data["train"])], teacher=teacher, layers=[LAYER],
                                out=cache, views=VIEWS, augment=RECIPE, local=True,
                                progress=False))  # fmt: skip
        common = dict(
            frames=(str(data["train"]),), student="tiny-vla",
            student_options={"image_size": size}, teacher_layer=LAYER, lambda_align=0.2,
            loss="mse", action_dims=LIVE_ACTION_DIMS, lr=1e-3, warmup_steps=min(50, steps),
            lr_schedule="cosine", steps=steps, batch_size=16, seed=0, progress=False,
            resample=True, plot=False, tensorboard=False,
        )  # fmt: skip
        fresh = {"augment": "fresh", "augment_recipe": RECIPE}
        setups = {
            "views (cache)": {"cache": str(cache), "augment": "views"},
            "resident fresh": {"resident_teacher": teacher, **fresh},
            "naive cache": {"cache": str(cache), **fresh},
            "no alignment": {"lambda_align": 0.0, **fresh},
        }
        runs = {
            name: TrainConfig(**(common | kw), out=str(root / "runs" / name.split()[0]))
            for name, kw in setups.items()
        }
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(2, mp_context=context, initializer=_one_thread) as pool:
            trained = dict(zip(runs, pool.map(_train, runs.values()), strict=True))
        for name, config in runs.items():
            errors = {
                split: _live(evaluate_run(config.out, [str(data[split])]), LIVE_ACTION_DIMS)
                for split in SPLITS
            }
            cosine = (
                evaluate_run(config.out, [str(data["train"])], cache=cache)["align_cosine"]
                if config.lambda_align > 0 else float("nan")
            )  # fmt: skip
            rows.append(harness.result(
                f"tiny-vla {steps} steps, {RECIPE} augmentation, {train_n} frames {size}px",
                name, [trained[name]["steps_per_s"]], "steps/s", device,
                align_cosine=f"{cosine:.4f}", heldout_l1=f"{errors['train-heldout']:.4f}",
                **{f"{s.replace('-', '_')}_l1": f"{errors[s]:.4f}" for s in SPLITS[1:]},
            ))  # fmt: skip
    finally:
        shutil.rmtree(root, ignore_errors=True)
    harness.publish(
        rows,
        TITLE,
        json_path,
        None if quick else "augment",
        f"`featurecache bench augment`: the demo's procedural data ({train_n} train frames, "
        f"{eval_n} per evaluation split, {size} px), {teacher} block {LAYER}, tiny-vla, "
        f"lambda 0.2, seed 0, {steps} steps of 16, openvla augmentation; two runs at a time, "
        f"one torch thread each; {harness.load_note()}. align_cosine: on the un-augmented "
        f"train frames against the cache's view 0; l1: action L1 over the live dimensions.",
    )
    return rows


def _live(evaluation: dict, dims: tuple[int, ...]) -> float:
    """Mean action L1 over the live dimensions of an `evaluate_run` result."""
    return float(np.mean([evaluation["per_dim_l1"][d] for d in dims]))


if __name__ == "__main__":
    harness.main(run, __doc__)
