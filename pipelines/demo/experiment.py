"""The paper's experiment in miniature (`featurecache demo`), end to end, on built-in data.

    1. sample-data  train + the three OOD splits (vision, semantic, execution)
    2. build        an int8 cache of a real ImageNet-pretrained teacher (efficientnet-lite0), Ray
    3. train        tiny-vla twice, same data and seed: lambda 0 (plain) and lambda 0.2 (aligned);
                    no teacher in the training process, targets come from the cache
    4. evaluate     action error of both runs on every split; the alignment cosine reached; a
                    linear probe of the aligned layer's tokens for object identity (by episode)
    5. report       OUT/report.md (table, cache summary, timings), OUT/losses.png, OUT/report.json

Every number in the report is read from those runs as they happened; nothing is hard-coded.
`DemoConfig.full()` runs larger sizes and several seeds, reported as mean and spread.
"""

from __future__ import annotations

import json
import shutil
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from featurecache.errors import OptionError
from featurecache.store import local_path

SPLITS: tuple[str, ...] = ("train", "ood-vision", "ood-semantic", "ood-execution")
TEACHER = "efficientnet-lite0"
# Block 12 of efficientnet-lite0 at 224 px: stride 32, a 7x7 grid of 192-d tokens; tiny-vla at
# 112 px with patch 16 has the same 7x7 grid of visual tokens, so no resampling is needed.
TEACHER_LAYER = "12"


@dataclass(kw_only=True, slots=True)
class DemoConfig:
    """Sizes of the miniature experiment. The defaults finish in about 10 minutes on 2 CPU cores."""

    out: str = "demo-out"
    """The demo folder: data/, cache.zarr, runs/, report.md, losses.png, report.json."""
    train_frames: int = 1536
    """Frames of the train split (the cache covers them; training streams them)."""
    eval_frames: int = 384
    """Frames of each OOD split (and of the held-out train-distribution split)."""
    shard_size: int = 256
    """Frames per WebDataset tar shard (one build task and one cache block each)."""
    image_size: int = 112
    """Rendered frame size; the student reads it as is, the teacher resizes to 224."""
    steps: int = 400
    """Optimizer steps of each training run."""
    batch_size: int = 16
    """Samples per step."""
    lambda_align: float = 0.2
    """The aligned run's alignment weight (the paper's 0.2)."""
    seeds: tuple[int, ...] = (0,)
    """One pair of runs (plain, aligned) per seed; data stays the same."""
    workers: int = 1
    """Ray teacher actors of the build."""
    progress: bool = True
    """Show progress bars."""

    def __post_init__(self) -> None:
        for name in ("train_frames", "eval_frames", "shard_size", "steps", "batch_size", "workers"):
            if getattr(self, name) < 1:
                raise OptionError(f"Expected `{name}` >= 1, got {getattr(self, name)!r}.")
        if not self.seeds:
            raise OptionError("Expected `seeds` to name at least one seed, got none.")

    @classmethod
    def full(cls, out: str = "demo-out") -> DemoConfig:
        """Larger data, longer runs, three seeds (about an hour on 2 CPU cores)."""
        return cls(out=out, train_frames=4096, eval_frames=1024, steps=1500, seeds=(0, 1, 2))


@dataclass(slots=True)
class DemoReport:
    """What the demo measured. errors[run][split]: action L1 per seed; cosine/probe per run;
    baseline[split]: action L1 of predicting the train split's median action everywhere."""

    config: dict[str, Any]
    errors: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    align_cosine: dict[str, list[float]] = field(default_factory=dict)
    probe: dict[str, list[float]] = field(default_factory=dict)
    baseline: dict[str, float] = field(default_factory=dict)
    final_losses: dict[str, list[dict[str, float]]] = field(default_factory=dict)
    cache: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)


def run_demo(config: DemoConfig, log: Callable[[str], None] = print) -> DemoReport:
    """Run the five steps of the module docstring into `config.out`; return what was measured."""
    from featurecache.audit import inspect_cache
    from featurecache.pipelines.build.plan import BuildConfig
    from featurecache.pipelines.build.precompute import build_cache
    from featurecache.pipelines.demo.sample_data import write_sample_data
    from featurecache.pipelines.training.config import TrainConfig
    from featurecache.pipelines.training.evaluate import evaluate_run
    from featurecache.pipelines.training.loop import train
    from featurecache.pipelines.training.probe import probe_accuracy

    out = local_path(config.out, "the demo folder OUT")
    out.mkdir(parents=True, exist_ok=True)
    report = DemoReport(config=asdict(config))
    clock = _Clock(report.timings, log)

    data = {split: out / "data" / split for split in SPLITS}
    with clock("1. sample-data"):
        for i, (split, folder) in enumerate(data.items()):
            n = config.train_frames if split == "train" else config.eval_frames
            write_sample_data(
                folder, frames=n, shard_size=config.shard_size, image_size=config.image_size,
                seed=i, split=split,
            )  # fmt: skip
        # Held-out episodes of the training distribution: a fresh seed of the train split.
        heldout = out / "data" / "train-heldout"
        write_sample_data(
            heldout, frames=config.eval_frames, shard_size=config.shard_size,
            image_size=config.image_size, seed=100, split="train",
        )  # fmt: skip
    eval_sets = {"train (held-out episodes)": heldout, **{s: data[s] for s in SPLITS[1:]}}

    cache = out / "cache.zarr"
    with clock("2. build cache"):
        summary = build_cache(
            BuildConfig(
                frames=[str(data["train"])], teacher=TEACHER, layers=[TEACHER_LAYER], out=cache,
                codec="int8", workers=config.workers, overwrite=True, progress=config.progress,
            )
        )  # fmt: skip
    report.cache = {**inspect_cache(cache), "build_frames_per_s": summary.frames_per_s}

    runs: dict[str, list[Path]] = {"plain": [], "aligned": []}
    shutil.rmtree(out / "runs", ignore_errors=True)  # the demo's own runs: always start over
    for seed in config.seeds:
        for name, lam in (("plain", 0.0), ("aligned", config.lambda_align)):
            run = out / "runs" / f"{name}-seed{seed}"
            with clock(f"3. train {name} (seed {seed})"):
                result = train(
                    TrainConfig(
                        frames=(str(data["train"]),), out=str(run), cache=str(cache),
                        student="tiny-vla", teacher_layer=TEACHER_LAYER, lambda_align=lam,
                        steps=config.steps, batch_size=config.batch_size, seed=seed,
                        progress=config.progress, resume=False,
                    )
                )  # fmt: skip
            runs[name].append(run)
            report.final_losses.setdefault(name, []).append(result.losses)

    with clock("4. evaluate"):
        # The constant predictor a run must beat: the train split's per-dimension median action
        # (what an L1-trained model that ignores its inputs converges to).
        median = np.median(_actions(data["train"]), axis=0)  # (7,)
        for label, folder in eval_sets.items():
            report.baseline[label] = float(np.abs(_actions(folder) - median).mean())
        for name, run_list in runs.items():
            for run in run_list:
                for label, folder in eval_sets.items():
                    err = evaluate_run(run, [str(folder)])["action_l1"]
                    report.errors.setdefault(name, {}).setdefault(label, []).append(err)
                report.probe.setdefault(name, []).append(
                    probe_accuracy(run, [str(heldout)], label_key="objects")
                )
                if name == "aligned":
                    cos = evaluate_run(run, [str(data["train"])], cache=cache)["align_cosine"]
                    report.align_cosine.setdefault(name, []).append(cos)

    with clock("5. report"):
        _plot_losses(runs, out / "losses.png")
        (out / "report.json").write_text(json.dumps(asdict(report), indent=2))
        (out / "report.md").write_text(format_report(report))
    log(format_table(report))
    log(f"\nreport: {out / 'report.md'}")
    return report


def format_table(report: DemoReport) -> str:
    """The paper's table in miniature: rows = splits, columns = plain, aligned, difference of the
    action L1 error (lower is better), mean over seeds with the spread when there are several."""
    plain, aligned = report.errors["plain"], report.errors["aligned"]
    base = report.baseline
    rows = [
        (f"action L1, {split}", plain[split], aligned[split], base.get(split)) for split in plain
    ]
    probe = "object probe, balanced accuracy (held-out episodes)"
    rows.append((probe, report.probe["plain"], report.probe["aligned"], 0.5))
    lines = [
        "| measure | plain | aligned | aligned - plain | constant baseline |",
        "|---|---|---|---|---|",
    ]
    for label, p, a, b in rows:
        diff = [x - y for x, y in zip(a, p, strict=True)]
        ref = "n/a" if b is None else f"{b:.4f}"
        lines.append(f"| {label} | {_mean(p)} | {_mean(a)} | {_mean(diff, sign=True)} | {ref} |")
    return "\n".join(lines)


def format_report(report: DemoReport) -> str:
    """OUT/report.md: the table, the alignment reached, the cache, the losses plot, timings."""
    cfg, cache = report.config, report.cache
    cos = report.align_cosine.get("aligned", [])
    timings = "\n".join(f"| {k} | {v:.1f} |" for k, v in report.timings.items())
    return f"""# featurecache demo report

Miniature of "Don't Blind Your VLA" (PAPER.md): tiny-vla fine-tuned on {cfg["train_frames"]} frames
of procedural pick-and-place episodes for {cfg["steps"]} steps (batch {cfg["batch_size"]}), plain
(lambda 0) against aligned (lambda {cfg["lambda_align"]}, mid-layer visual tokens pulled towards the
cached {TEACHER} block {TEACHER_LAYER} features), seeds {list(cfg["seeds"])}. Action L1 error per
split, lower is better; with several seeds, mean ± standard deviation. The constant baseline
predicts the train split's median action for every frame (for the probe: chance, 0.5): a run
that does not beat it has not learned to act from what it sees at these sizes.

{format_table(report)}

Alignment cosine reached by the aligned run(s) on the train split: {_mean(cos) if cos else "n/a"}.

Measured as it happened: if aligned is not better here, that is the result of this run at these
sizes (the paper's effect comes from a 7B model and 60k steps).

## Cache

| codec | rows | blocks done | size on disk | compression vs fp16 | build frames/s |
|---|---|---|---|---|---|
| {cache["codec"]} | {cache["rows_written"]} | {cache["blocks_done"]}/{cache["blocks_total"]} \
| {_mib(cache["size_on_disk_bytes"])} | {_num(cache["layers"][0]["ratio_vs_fp16"])} \
| {_num(cache["build_frames_per_s"])} |

## Losses

![losses](losses.png)

## Timings (seconds)

| step | seconds |
|---|---|
{timings}
"""


class _Clock:
    """Times named steps into a dict and logs them."""

    def __init__(self, into: dict[str, float], log: Callable[[str], None]) -> None:
        self.into, self.log = into, log

    def __call__(self, name: str) -> _Clock:
        self.name = name
        return self

    def __enter__(self) -> None:
        self.log(f"== {self.name}")
        self.start = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        self.into[self.name] = time.perf_counter() - self.start
        self.log(f"   {self.name}: {self.into[self.name]:.1f} s")


def _actions(folder: Path) -> np.ndarray:
    """(N, 7) float32: every action of the frame shards in `folder`."""
    from featurecache.samples import expand_frame_paths, iter_samples

    return np.stack(
        [s.array("action") for tar in expand_frame_paths([str(folder)]) for s in iter_samples(tar)]
    )


def _plot_losses(runs: dict[str, list[Path]], path: Path) -> None:
    """Action loss of every run and the aligned runs' alignment loss per step (metrics.jsonl)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from featurecache.pipelines.training.metrics import read_metrics

    fig, (ax_action, ax_align) = plt.subplots(1, 2, figsize=(10, 3.6))
    for name, run_list in runs.items():
        for run in run_list:
            rows = read_metrics(run / "metrics.jsonl")
            steps = [r["step"] for r in rows]
            ax_action.plot(steps, [r["action_loss"] for r in rows], label=run.name, alpha=0.8)
            if name == "aligned":
                ax_align.plot(steps, [r["align_loss"] for r in rows], label=run.name, alpha=0.8)
    ax_action.set(title="action loss (L1)", xlabel="step", yscale="log")
    ax_align.set(title="alignment loss (1 - cos)", xlabel="step")
    for ax in (ax_action, ax_align):
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _mean(values: Sequence[float], sign: bool = False) -> str:
    fmt = "{:+.4f}" if sign else "{:.4f}"
    if len(values) == 1:
        return fmt.format(values[0])
    return fmt.format(statistics.mean(values)) + f" ± {statistics.stdev(values):.4f}"


def _num(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, int | float) else "n/a"


def _mib(value: Any) -> str:
    return f"{value / 2**20:.1f} MiB" if isinstance(value, int | float) else "n/a"


def tiny(config: DemoConfig) -> DemoConfig:
    """The smallest sizes that still exercise every step (tests)."""
    return replace(
        config,
        train_frames=64,
        eval_frames=96,
        shard_size=32,
        steps=6,
        batch_size=8,
        progress=False,
    )
