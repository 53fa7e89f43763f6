"""A linear probe on a trained run's aligned-layer visual tokens (the paper's representation test).

The paper measures what action fine-tuning does to the VLA's visual representations with linear
probes; here: mean-pool the student's visual tokens at its `--align-layer` (frozen, no projector),
fit a logistic regression predicting a frame attribute (the named object, by default) and report
its accuracy on held-out episodes (train/test split by episode, so no episode is in both).

`label_key="objects"` probes object identity as the scene shows it: which of the objects (colour +
shape) are on the table, one binary probe per object class, scored by balanced accuracy (chance is
0.5 whatever the class frequency) and averaged over classes. In tiny-vla the visual tokens come
before the instruction, so they cannot know which object the instruction names; what they can
know is which objects are in view.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from featurecache.errors import FeatureCacheError
from featurecache.pipelines.training.checkpoint import load_run
from featurecache.pipelines.training.stream import StreamConfig, iter_batches
from featurecache.samples import BadFrameError, expand_frame_paths


def probe_features(
    run: str | Path,
    frames: Sequence[str],
    *,
    label_key: str = "object",
    batch_size: int = 32,
    device: str = "cpu",
) -> tuple[np.ndarray, list[str], list[str]]:
    """(features (N, hidden) float32 mean-pooled visual tokens, labels, episode ids)."""
    loaded = load_run(run, device)
    stream = StreamConfig(
        shards=expand_frame_paths(list(frames)),
        image_size=loaded.student.image_size,
        batch_size=batch_size,
        shuffle=False,
        require_actions=False,
    )
    feats, labels, episodes = [], [], []
    with torch.inference_mode():
        for batch in iter_batches(stream):
            if not len(batch):
                continue
            out = loaded.student(batch.images.to(device), batch.instructions, loaded.align_layer)
            feats.append(out.visual.float().mean(dim=1).cpu().numpy())  # (B, hidden)
            for key, meta in zip(batch.keys, batch.meta, strict=True):
                labels.append(_label(meta, label_key, key))
                episodes.append(f"{meta.get('split', '')}/{meta.get('episode', key)}")
    return np.concatenate(feats), labels, episodes


def _label(meta: dict, label_key: str, key: str) -> str:
    """The frame's label: a json field, or for "objects" the sorted object classes, '|'-joined."""
    if label_key == "objects":
        objects = meta.get("positions", {}).get("objects")
        if not isinstance(objects, dict) or not objects:
            raise BadFrameError(
                f"Expected positions.objects in the json of frame {key!r}, got none."
            )
        return "|".join(sorted(objects))
    if label_key not in meta:
        raise BadFrameError(
            f"Expected a {label_key!r} field in the json of frame {key!r}, "
            f"got fields {sorted(meta)}."
        )
    return str(meta[label_key])


def probe_accuracy(
    run: str | Path,
    frames: Sequence[str],
    label_key: str = "object",
    *,
    test_fraction: float = 0.3,
    seed: int = 0,
    device: str = "cpu",
) -> float:
    """Held-out accuracy of a logistic-regression probe predicting `label_key` from the run's
    mean-pooled aligned-layer visual tokens; episodes are split train/test (`test_fraction`)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x, y, episodes = probe_features(run, frames, label_key=label_key, device=device)
    unique = sorted(set(episodes))
    if len(unique) < 2:
        raise FeatureCacheError(
            f"Expected frames from at least 2 episodes for a train/test split, got {len(unique)}."
        )
    random.Random(seed).shuffle(unique)
    n_test = min(len(unique) - 1, max(1, round(test_fraction * len(unique))))
    test_eps = set(unique[:n_test])
    is_test = np.array([e in test_eps for e in episodes])
    labels = np.array(y)
    if len(set(labels[~is_test])) < 2:
        raise FeatureCacheError(
            f"Expected at least 2 values of {label_key!r} among the probe's training episodes, "
            f"got {sorted(set(labels[~is_test]))}."
        )
    if label_key == "objects":
        return _presence_accuracy(x, labels, is_test)
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    probe.fit(x[~is_test], labels[~is_test])
    return float((probe.predict(x[is_test]) == labels[is_test]).mean())


def _presence_accuracy(x: np.ndarray, labels: np.ndarray, is_test: np.ndarray) -> float:
    """Mean balanced accuracy of one binary probe per object class (present in the frame or not),
    over the classes seen both present and absent in the training and the test episodes."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    sets = [set(label.split("|")) for label in labels]
    scores = []
    for cls in sorted(set().union(*sets)):
        y = np.array([cls in s for s in sets])
        if len(set(y[~is_test])) < 2 or len(set(y[is_test])) < 2:
            continue
        probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
        probe.fit(x[~is_test], y[~is_test])
        scores.append(balanced_accuracy_score(y[is_test], probe.predict(x[is_test])))
    if not scores:
        raise FeatureCacheError(
            "Expected an object class both present and absent in train and test episodes."
        )
    return float(np.mean(scores))
