"""The demo's student learns: tiny-vla beats the constant predictor on a tiny split.

The old ViT-stem tiny-vla sat at the constant (median-action) predictor for hundreds of steps at
demo sizes; this test pins that the conv-stem student leaves it within a bounded step count.
Deterministic (seed 0, one torch thread); the oracle is the constant baseline computed from the
tar members, and the error comes from evaluate_run over the same frames.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from featurecache.pipelines.demo.config import DemoConfig
from featurecache.pipelines.demo.experiment import action_array, live_errors
from featurecache.pipelines.demo.sample_data import LIVE_ACTION_DIMS
from featurecache.pipelines.training.config import TrainConfig
from featurecache.pipelines.training.evaluate import evaluate_run
from featurecache.pipelines.training.loop import train

DEMO = DemoConfig()  # the demo's recipe: MSE over the live dims, its lr and schedule
SMALL = {"image_size": 64, "stem_width": 8, "hidden_size": 64, "num_layers": 2, "num_heads": 2}


def test_tiny_vla_beats_the_constant_baseline(sample_data_dir: Path, tmp_path: Path) -> None:
    torch.set_num_threads(1)
    run = tmp_path / "run"
    train(
        TrainConfig(
            frames=(str(sample_data_dir),), out=str(run), student_options=SMALL,
            lambda_align=0.0, loss="mse", action_dims=LIVE_ACTION_DIMS, lr=DEMO.lr,
            warmup_steps=20, lr_schedule=DEMO.lr_schedule, steps=150, batch_size=16, seed=0,
            progress=False, plot=False,
        )
    )  # fmt: skip
    actions = action_array(sample_data_dir)  # (48, 7)
    median = np.median(actions, axis=0)
    baseline = float(np.abs(actions - median)[:, LIVE_ACTION_DIMS].mean())
    error = float(np.mean(live_errors(evaluate_run(run, [str(sample_data_dir)]))))
    assert error < 0.7 * baseline, (error, baseline)
