"""Benchmark: does training notice quantized targets? fp16 vs int8 vs int8c caches, same run.

Claim (issue 11): the alignment loss a short tiny-vla run sees with int8 or int8c targets follows
the fp16 run step for step: the largest difference of the logged alignment cosine over the run
is far below the cosine's own change over the run (and int8c <= int8 where it matters).

One teacher (efficientnet-lite0, layer "10", the demo's offline teacher) is built into three
caches of the same frames (fp16, int8, int8c), through the public build API (local build).
Three `train()` runs with the same seed, student, data order and steps differ only in the cache;
each logs `align_cosine` (mean cosine of the projected tokens to the targets, as the loss sees
them) per step in RUN/metrics.jsonl. Reported per quantized codec: the max and the final
|cosine - fp16's cosine| over the run, the same for the action loss, and the fp16 run's own
cosine range for scale.

    python -m featurecache.benchmarks.target_codecs [--json FILE] [--quick]
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from featurecache.benchmarks import harness

TITLE = "Training on fp16 vs int8 vs int8c targets (same run otherwise)"
CODECS = ("fp16", "int8", "int8c")
TEACHER_LAYER = "10"  # efficientnet-lite0 block 10: stride 16, a 7x7 grid at 112 px, 4x4 at 64


def _sizes(quick: bool) -> dict[str, Any]:
    if quick:
        return {"frames": 32, "shard": 16, "image": 64, "batch": 8, "steps": 6,
                "student": {"stem_width": 8, "hidden_size": 64, "num_layers": 2,
                            "num_heads": 2}}  # fmt: skip
    return {"frames": 256, "shard": 64, "image": 112, "batch": 16, "steps": 200, "student": {}}


def _metrics(run: Path) -> tuple[np.ndarray, np.ndarray]:
    """(align_cosine, action loss) per step from RUN/metrics.jsonl."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r.get("align_cosine") is not None]
    action_key = next(k for k in ("action_loss", "action") if k in rows[0])
    return np.array([r["align_cosine"] for r in rows]), np.array([r[action_key] for r in rows])


def run(json_path: str | Path | None = None, quick: bool = False) -> list[harness.Result]:
    """Build three caches, train three runs, compare; print, write JSON, record (not quick)."""
    from featurecache.pipelines.build.precompute import BuildConfig, build_cache
    from featurecache.pipelines.demo.sample_data import write_sample_data
    from featurecache.pipelines.training.config import TrainConfig
    from featurecache.pipelines.training.loop import train

    sizes = _sizes(quick)
    device = harness.device_name("cpu")
    curves: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    with tempfile.TemporaryDirectory(prefix="fc-bench-codecs-") as tmp:
        root = Path(tmp)
        shards = write_sample_data(
            root / "frames", frames=sizes["frames"], shard_size=sizes["shard"],
            image_size=sizes["image"],
        )  # fmt: skip
        frames = [str(s) for s in shards]
        for codec in CODECS:
            cache = root / f"cache-{codec}"
            build_cache(
                BuildConfig(
                    frames=frames, teacher=f"efficientnet-lite0@{sizes['image']}",
                    layers=[TEACHER_LAYER], out=cache, codec=codec, local=True, progress=False,
                )
            )  # fmt: skip
            out = root / f"run-{codec}"
            train(
                TrainConfig(
                    frames=tuple(frames), out=str(out), cache=str(cache),
                    student_options={"image_size": sizes["image"], **sizes["student"]},
                    steps=sizes["steps"], batch_size=sizes["batch"], seed=0, progress=False,
                    plot=False, device="cpu",
                )
            )  # fmt: skip
            curves[codec] = _metrics(out)
    ref_cos, ref_act = curves["fp16"]
    span = float(ref_cos.max() - ref_cos.min())
    rows = []
    for codec in CODECS[1:]:
        cos, act = curves[codec]
        diff = np.abs(cos - ref_cos)
        rows.append(
            harness.Result(
                what=f"align cosine vs fp16 targets, {len(cos)} steps, tiny-vla "
                f"{sizes['image']}px b{sizes['batch']}",
                provider=codec,
                median=float(diff.max()),
                spread=(float(np.quantile(diff, 0.2)), float(np.quantile(diff, 0.8))),
                unit="max abs d cos",
                device=device,
                revision=harness.git_revision(),
                extra={
                    "final_d_cos": f"{abs(cos[-1] - ref_cos[-1]):.2e}",
                    "max_d_action_loss": f"{float(np.abs(act - ref_act).max()):.2e}",
                    "fp16_cos_range": f"{ref_cos.min():.4f}..{ref_cos.max():.4f}",
                },
            )
        )
    table = harness.report(rows, TITLE, json_path)
    if not quick:
        note = (
            f"Measured on {device} ({harness.load_note()}). One efficientnet-lite0 teacher "
            f"(layer {TEACHER_LAYER}) built into fp16, int8 and int8c caches of the same "
            f"{sizes['frames']} frames; three tiny-vla runs, seed 0, {sizes['steps']} steps, "
            "identical but for the cache. Figures: over the run's logged steps, abs(align_cosine - "
            "the fp16 run's align_cosine) (median column = its max; spread p20..p80), the final "
            "step's difference, the largest action-loss difference, and the fp16 run's cosine "
            f"range ({span:.3g} wide) for scale."
        )
        harness.record("target codecs in training", table, note)
    return rows


if __name__ == "__main__":
    harness.main(run, __doc__)
