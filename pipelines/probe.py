"""A linear probe on a trained run's aligned-layer visual tokens (the paper's representation test).

The paper measures what action fine-tuning does to the VLA's visual representations with linear
probes; here: mean-pool the student's visual tokens at its `--align-layer` (frozen, no projector),
fit a logistic regression predicting a frame attribute (the named object, by default) and report
its accuracy on held-out episodes (train/test split by episode, so no episode is in both).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from featurecache.pipelines.stream import StreamConfig, iter_batches
from featurecache.pipelines.train import load_run


def probe_features(
    run: str | Path,
    frames: Sequence[str],
    *,
    label_key: str = "object",
    batch_size: int = 32,
    device: str = "cpu",
) -> tuple[np.ndarray, list[str], list[str]]:
    """(features (N, hidden) float32 mean-pooled visual tokens, labels, episode ids)."""
    from featurecache.pipelines.frames import expand_frame_paths

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
                if label_key not in meta:
                    raise KeyError(
                        f"Expected a {label_key!r} field in the json of frame {key!r}, got "
                        f"fields {sorted(meta)}."
                    )
                labels.append(str(meta[label_key]))
                episodes.append(f"{meta.get('split', '')}/{meta.get('episode', key)}")
    return np.concatenate(feats), labels, episodes


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
        raise ValueError(
            f"Expected frames from at least 2 episodes for a train/test split, got {len(unique)}."
        )
    random.Random(seed).shuffle(unique)
    n_test = min(len(unique) - 1, max(1, round(test_fraction * len(unique))))
    test_eps = set(unique[:n_test])
    is_test = np.array([e in test_eps for e in episodes])
    labels = np.array(y)
    if len(set(labels[~is_test])) < 2:
        raise ValueError(
            f"Expected at least 2 values of {label_key!r} among the probe's training episodes, "
            f"got {sorted(set(labels[~is_test]))}."
        )
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    probe.fit(x[~is_test], labels[~is_test])
    return float((probe.predict(x[is_test]) == labels[is_test]).mean())
