"""Metrics out: TensorBoard event files (read back with tensorboard's own EventAccumulator) and W&B
(a recording stand-in for the `wandb` module) carry the same scalars as metrics.jsonl."""

from __future__ import annotations

import math
import sys
import types
from pathlib import Path

import pytest
from click.testing import CliRunner
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from featurecache.cli.main import main
from featurecache.pipelines.training.config import TrainConfig
from featurecache.pipelines.training.loop import train
from featurecache.pipelines.training.metrics import LOGGED, TENSORBOARD_DIR, read_metrics
from featurecache.spec import LayerSpec

from ._train_helpers import TINY_OPTIONS, key_features, one_thread, write_cache

LAYER = LayerSpec("10", 16, 24, (4, 4))
_one_thread = pytest.fixture(autouse=True, scope="module")(one_thread)


@pytest.fixture(scope="module")
def cache(shards, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("metrics") / "cache.zarr"
    return write_cache(path, shards, [LAYER], key_features("10", 16, 24), codec="int8")


def _config(shards, cache, out, **kw) -> TrainConfig:
    base = dict(
        frames=tuple(map(str, shards)), out=str(out), cache=cache and str(cache), batch_size=4,
        student_options=TINY_OPTIONS, projector_hidden=16, progress=False, plot=False,
    )  # fmt: skip
    return TrainConfig(**(base | kw))


def _tensorboard(run: Path) -> dict[str, list[tuple[int, float]]]:
    events = EventAccumulator(str(run / TENSORBOARD_DIR))
    events.Reload()
    return {
        tag.removeprefix("train/"): [(e.step, e.value) for e in events.Scalars(tag)]
        for tag in events.Tags()["scalars"]
    }


def _jsonl(run: Path) -> dict[str, list[tuple[int, float]]]:
    rows = read_metrics(run / "metrics.jsonl")
    return {k: [(r["step"], r[k]) for r in rows if r[k] is not None] for k in LOGGED}


def _assert_same(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(k for k, v in want.items() if v)
    for name, points in got.items():
        assert [s for s, _ in points] == [s for s, _ in want[name]], name
        for (_, a), (_, b) in zip(points, want[name], strict=True):
            assert math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9), (name, a, b)  # float32


def test_tensorboard_events_match_metrics_jsonl(shards, cache, tmp_path) -> None:
    run = tmp_path / "run"
    train(_config(shards, cache, run, steps=2))
    train(_config(shards, cache, run, steps=4, resume=True))  # resumed: one series, no repeats
    want = _jsonl(run)
    assert [s for s, _ in want["action_loss"]] == [1, 2, 3, 4]
    for name in ("align_cosine", "steps_per_s", "data_wait_s", "lr"):
        assert len(want[name]) == 4, name
    for (_, cos), (_, align) in zip(want["align_cosine"], want["align_loss"], strict=True):
        assert math.isclose(cos, 1 - align, abs_tol=1e-9)
    _assert_same(_tensorboard(run), want)


def test_no_alignment_logs_no_cosine(shards, tmp_path) -> None:
    run = tmp_path / "plain"
    train(_config(shards, None, run, steps=2, lambda_align=0.0))
    rows = read_metrics(run / "metrics.jsonl")
    assert all(r["align_cosine"] is None for r in rows)
    assert "align_cosine" not in _tensorboard(run)


def test_no_tensorboard_writes_no_events(shards, cache, tmp_path) -> None:
    run = tmp_path / "quiet"
    train(_config(shards, cache, run, steps=1, tensorboard=False))
    assert not (run / TENSORBOARD_DIR).exists() and (run / "metrics.jsonl").is_file()


class _WandbRun:
    def __init__(self, calls: list) -> None:
        self.calls = calls

    def log(self, data: dict, step: int) -> None:
        self.calls.append(("log", step, dict(data)))

    def finish(self) -> None:
        self.calls.append(("finish",))


def test_wandb_gets_the_same_scalars(shards, cache, tmp_path, monkeypatch) -> None:
    calls: list = []
    fake = types.ModuleType("wandb")
    fake.__spec__ = types.SimpleNamespace(name="wandb")  # for importlib.util.find_spec
    fake.util = types.SimpleNamespace(generate_id=lambda: "abc123")
    fake.init = lambda **kw: calls.append(("init", kw)) or _WandbRun(calls)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    run = tmp_path / "wb"
    train(_config(shards, cache, run, steps=3, wandb=True, wandb_project="p"))
    init = calls[0][1]
    assert calls[0][0] == "init" and init["project"] == "p" and init["id"] == "abc123"
    assert init["config"]["lambda_align"] == 0.2 and calls[-1] == ("finish",)
    logged = {}
    for _, step, data in (c for c in calls if c[0] == "log"):
        for tag, value in data.items():
            logged.setdefault(tag.removeprefix("train/"), []).append((step, value))
    _assert_same(logged, _jsonl(run))
    assert (run / "wandb-id.txt").read_text().strip() == "abc123"


def test_wandb_missing_is_refused_before_the_work(shards, cache, tmp_path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed
    out = tmp_path / "nowb"
    args = ["train", *map(str, shards), "--cache", str(cache), "--out", str(out), "--wandb"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and "--wandb" in result.output
    assert "pip install wandb" in result.output
    assert not out.exists()
