"""`--action-dims`: the action loss covers the named columns only.

Oracle: the same run on frames whose other columns are rewritten to other values trains
identically (losses and weights bit-equal), while without --action-dims the same rewrite changes
the run (so the comparison can fail).
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from featurecache.cli import main
from featurecache.errors import OptionError
from featurecache.pipelines.training.checkpoint import load_run
from featurecache.pipelines.training.config import TrainConfig
from featurecache.pipelines.training.loop import train
from featurecache.pipelines.training.metrics import read_metrics

from ._train_helpers import train_config

LIVE = (0, 1, 2, 5, 6)


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def _rewrite_dead_columns(shards: list[Path], into: Path) -> list[Path]:
    """Copies of `shards` with action columns 3 and 4 set to 5.0 (everything else byte-equal)."""
    into.mkdir()
    out = []
    for shard in shards:
        target = into / shard.name
        with tarfile.open(shard) as src, tarfile.open(target, "w") as dst:
            for member in src.getmembers():
                data = src.extractfile(member).read()
                if member.name.endswith(".action.npy"):
                    action = np.load(io.BytesIO(data), allow_pickle=False)
                    action[..., 3:5] = 5.0
                    buf = io.BytesIO()
                    np.save(buf, action, allow_pickle=False)
                    data = buf.getvalue()
                    member.size = len(data)
                dst.addfile(member, io.BytesIO(data))
        out.append(target)
    return out


def _run(shards: list[Path], out: Path, **kw) -> tuple[list[float], dict[str, torch.Tensor]]:
    config = train_config(
        shards, out, lambda_align=0.0, loss="mse", steps=3, tensorboard=False, **kw
    )
    train(config)
    losses = [r["action_loss"] for r in read_metrics(out / "metrics.jsonl")]
    return losses, load_run(out).student.state_dict()


def test_action_dims_ignore_the_other_columns(shards, tmp_path) -> None:
    shards = shards[:2]
    edited = _rewrite_dead_columns(shards, tmp_path / "edited")
    live_a, weights_a = _run(shards, tmp_path / "a", action_dims=LIVE)
    live_b, weights_b = _run(edited, tmp_path / "b", action_dims=LIVE)
    assert live_a == live_b
    for name, value in weights_a.items():
        assert torch.equal(value, weights_b[name]), name
    # control: over all seven columns the rewrite shows in the loss
    all_a, _ = _run(shards, tmp_path / "c")
    all_b, _ = _run(edited, tmp_path / "d")
    assert all_b[0] > all_a[0] + 1.0


def test_action_dims_are_validated(shards, tmp_path) -> None:
    with pytest.raises(OptionError, match="distinct action indices"):
        TrainConfig(frames=("x",), out="o", lambda_align=0, action_dims=(1, 1))
    with pytest.raises(OptionError, match="below the frames' action width 7, got \\[0, 7\\]"):
        _run(shards[:1], tmp_path / "wide", action_dims=(0, 7))
    saved = TrainConfig.from_json(
        TrainConfig(frames=("x",), out="o", lambda_align=0, action_dims=LIVE).to_json()
    )
    assert saved.action_dims == LIVE


def test_cli_action_dims(shards, tmp_path) -> None:
    args = ["train", str(shards[0]), "--out", str(tmp_path / "r"), "--lambda", "0"]
    bad = CliRunner().invoke(main, [*args, "--action-dims", "0,x"])
    assert bad.exit_code == 2 and "--action-dims" in bad.output
    wide = CliRunner().invoke(main, [*args, "--action-dims", "0,9", "--steps", "1"])
    assert wide.exit_code == 2 and "action width 7" in wide.output, wide.output
