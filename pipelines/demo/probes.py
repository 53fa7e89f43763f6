"""Linear probes of visual tokens: what a representation still knows about the scene.

The paper measures what action fine-tuning does to a VLA's visual representation with a linear
probe (ImageNet-100: 79.9 % pretrained, 77.5 % after action fine-tuning, 82.1 % aligned). In
miniature, on frames of held-out episodes (the probe's train/test split is by episode, so no
episode is on both sides):

- `object colour`, `object shape`: what is at an object's place. For every object on the table
  the token of the grid cell holding its centre is one example, labelled with the object's colour
  (4 train colours, chance 0.25) or shape (3 train shapes, chance 1/3); multinomial logistic
  regression, balanced accuracy. Objects under or in the gripper (centre within OCCLUDED table
  units of it) are left out: their cell shows the gripper. The named target is where it is now
  (`positions.target`: it moves once grasped), the others where they were placed. A per-cell
  probe, because presence anywhere on the table is not linear in a token grid: a presence probe
  on mean-pooled tokens stayed at chance even for raw pixels (0.50 objects, 0.57 colours on 7x7
  RGB means).
- `gripper xy`, `plate xy`: ridge regression of the gripper's / the plate's table xy from the
  flattened token grid, held-out R^2 (0 = no better than the mean position).

Features come from a trained run's student at its aligned layer (`run_features`), from a student
at its random init (`student_features`, the untrained reference) or from a teacher cache
(`cache_features`: does the teacher layer carry the positions the student should learn?).
Tokens must be one square, row-major grid over the whole frame (tiny-vla's, the teacher's).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from featurecache.pipelines.demo.render import image_fraction
from featurecache.pipelines.demo.sample_data import TRAIN_COLORS, TRAIN_SHAPES
from featurecache.pipelines.training.checkpoint import load_run
from featurecache.pipelines.training.stream import StreamConfig, iter_batches
from featurecache.pipelines.training.students.base import Student
from featurecache.samples import expand_frame_paths

PROBES: tuple[str, ...] = ("object colour", "object shape", "gripper xy", "plate xy")
CHANCE: dict[str, float] = {
    "object colour": 1 / len(TRAIN_COLORS),
    "object shape": 1 / len(TRAIN_SHAPES),
    "gripper xy": 0.0,
    "plate xy": 0.0,
}
OCCLUDED = 0.12  # table units: an object this close to the gripper is under it or held


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
    test = np.array([e in test_eps for e in episodes])  # (N,) frame in the probe's test set
    scores: dict[str, float] = {}

    cells = object_cells(features)
    cell_test = test[cells.frame]
    for probe, labels in (("object colour", cells.colour), ("object shape", cells.shape)):
        if len(set(labels[~cell_test])) < 2 or len(set(labels[cell_test])) < 2:
            scores[probe] = float("nan")  # too few objects to fit and score
            continue
        classifier = make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000))
        classifier.fit(cells.tokens[~cell_test], labels[~cell_test])
        predicted = classifier.predict(cells.tokens[cell_test])
        scores[probe] = float(balanced_accuracy_score(labels[cell_test], predicted))

    flat = features.tokens.reshape(len(features.tokens), -1)  # (N, T * D)
    for probe, part in (("gripper xy", "gripper"), ("plate xy", "plate")):
        xy = np.array([m["positions"][part][:2] for m in features.meta])  # (N, 2)
        ridge = make_pipeline(StandardScaler(), RidgeCV(alphas=np.logspace(0, 5, 6)))
        ridge.fit(flat[~test], xy[~test])
        scores[probe] = float(ridge.score(flat[test], xy[test]))
    return scores


@dataclass(frozen=True, slots=True)
class ObjectCells:
    """One row per visible object: tokens (M, D) float32 of the cell holding its centre, frame
    (M,) int64 index into the features, colour and shape (M,) str labels."""

    tokens: np.ndarray
    frame: np.ndarray
    colour: np.ndarray
    shape: np.ndarray


def object_cells(features: ProbeFeatures) -> ObjectCells:
    """The token at every visible object's centre (objects within OCCLUDED of the gripper left
    out). The tokens must be a square row-major grid over the whole frame."""
    n, t, _ = features.tokens.shape
    side = round(t**0.5)
    if side * side != t:
        raise ValueError(f"Expected a square token grid for the object probes, got {t} tokens.")
    rows, frames, colours, shapes = [], [], [], []
    for i, meta in enumerate(features.meta):
        gripper = np.asarray(meta["positions"]["gripper"][:2], np.float64)
        for name, xy in meta["positions"]["objects"].items():
            if name == meta.get("object"):  # the named target moves once grasped
                xy = meta["positions"]["target"]
            if np.linalg.norm(np.asarray(xy, np.float64) - gripper) < OCCLUDED:
                continue
            fx, fy = image_fraction(xy)
            col, row = min(int(fx * side), side - 1), min(int(fy * side), side - 1)
            colour, shape = name.split(" ")
            rows.append(features.tokens[i, row * side + col])
            frames.append(i)
            colours.append(colour)
            shapes.append(shape)
    if not rows:
        raise ValueError(f"Expected visible objects in the {n} probe frames, found none.")
    return ObjectCells(
        np.stack(rows), np.asarray(frames, np.int64), np.asarray(colours), np.asarray(shapes)
    )
