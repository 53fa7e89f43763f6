"""Linear probes of visual tokens: what a representation still knows about the scene.

The paper measures what action fine-tuning does to a VLA's visual representation with a linear
probe (ImageNet-100: 79.9 % pretrained, 77.5 % after action fine-tuning, 82.1 % aligned). In
miniature, on frames of held-out episodes (the probe's train/test split is by episode, so no
episode is on both sides):

- `objects`: which objects (colour + shape) are on the table: one logistic-regression probe per
  object class on the mean-pooled tokens, balanced accuracy (chance 0.5), averaged over classes.
- `colours`: the same per colour (is a red object on the table?).
- `gripper xy`, `plate xy`: ridge regression of the gripper's / the plate's table xy from the
  flattened token grid, held-out R^2 (0 = no better than the mean position).

Features come from a trained run's student at its aligned layer (`run_features`), from a student
at its random init (`student_features`, the untrained reference) or from a teacher cache
(`cache_features`: does the teacher layer carry the positions the student should learn?).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from featurecache.pipelines.training.checkpoint import load_run
from featurecache.pipelines.training.stream import StreamConfig, iter_batches
from featurecache.pipelines.training.students.base import Student
from featurecache.samples import expand_frame_paths

PROBES: tuple[str, ...] = ("objects", "colours", "gripper xy", "plate xy")
CHANCE: dict[str, float] = {"objects": 0.5, "colours": 0.5, "gripper xy": 0.0, "plate xy": 0.0}


@dataclass(frozen=True, slots=True)
class ProbeFeatures:
    """tokens: (N, T, D) float32 visual tokens of N frames; meta: the N frames' json; keys."""

    tokens: np.ndarray
    meta: list[dict]
    keys: list[str]


def student_features(
    student: Student, align_layer: int, frames: Sequence[str], *, batch_size: int = 64
) -> ProbeFeatures:
    """The student's hidden states at `align_layer`, visual positions, for every frame in order."""
    stream = StreamConfig(
        shards=expand_frame_paths(list(frames)),
        image_size=student.image_size,
        batch_size=batch_size,
        shuffle=False,
        require_actions=False,
    )
    tokens, meta, keys = [], [], []
    student.eval()
    with torch.inference_mode():
        for batch in iter_batches(stream):
            if not len(batch):
                continue
            out = student(batch.images, batch.instructions, align_layer)
            tokens.append(out.visual.float().numpy())  # (B, T, D)
            meta += batch.meta
            keys += batch.keys
    if not keys:
        raise ValueError(f"Expected frames to probe, got none from {list(frames)}.")
    return ProbeFeatures(np.concatenate(tokens), meta, keys)


def run_features(run: str | Path, frames: Sequence[str]) -> ProbeFeatures:
    """`student_features` of a trained run at the layer it aligned (or would have aligned)."""
    loaded = load_run(run)
    return student_features(loaded.student, loaded.align_layer, frames)


def cache_features(cache: str | Path, layer: str, frames: Sequence[str]) -> ProbeFeatures:
    """The cached teacher tokens (dequantized) of every frame in `frames`, in order."""
    from featurecache.reader import open_cache
    from featurecache.samples import iter_samples

    samples = [s for tar in expand_frame_paths(list(frames)) for s in iter_samples(tar)]
    keys = [s.key for s in samples]
    tokens = open_cache(cache).read(keys, layer).float().numpy()  # (N, T, D)
    return ProbeFeatures(tokens, [s.meta() for s in samples], keys)


def probe_scores(
    features: ProbeFeatures, *, test_fraction: float = 0.3, seed: int = 0
) -> dict[str, float]:
    """{probe: held-out score} for every probe in PROBES (see the module docstring)."""
    from sklearn.linear_model import LogisticRegression, RidgeCV
    from sklearn.metrics import balanced_accuracy_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    episodes = [
        f"{m.get('split', '')}/{m.get('episode', k)}"
        for m, k in zip(features.meta, features.keys, strict=True)
    ]
    unique = sorted(set(episodes))
    if len(unique) < 4:
        raise ValueError(
            f"Expected frames of at least 4 episodes for the probes, got {len(unique)}."
        )
    random.Random(seed).shuffle(unique)
    test_eps = set(unique[: max(1, round(test_fraction * len(unique)))])
    test = np.array([e in test_eps for e in episodes])
    pooled = features.tokens.mean(axis=1)  # (N, D)
    flat = features.tokens.reshape(len(features.tokens), -1)  # (N, T * D)

    def presence(labels: list[set[str]]) -> float:
        scores = []
        for cls in sorted(set().union(*labels)):
            y = np.array([cls in s for s in labels])
            if len(set(y[~test])) < 2 or len(set(y[test])) < 2:
                continue
            probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
            probe.fit(pooled[~test], y[~test])
            scores.append(balanced_accuracy_score(y[test], probe.predict(pooled[test])))
        return float(np.mean(scores)) if scores else float("nan")

    objects = [set(m["positions"]["objects"]) for m in features.meta]
    colours = [{name.split(" ")[0] for name in s} for s in objects]

    def position(part: str) -> float:
        xy = np.array([m["positions"][part][:2] for m in features.meta])  # (N, 2)
        ridge = make_pipeline(StandardScaler(), RidgeCV(alphas=np.logspace(0, 5, 6)))
        ridge.fit(flat[~test], xy[~test])
        return float(ridge.score(flat[test], xy[test]))

    return {
        "objects": presence(objects),
        "colours": presence(colours),
        "gripper xy": position("gripper"),
        "plate xy": position("plate"),
    }
