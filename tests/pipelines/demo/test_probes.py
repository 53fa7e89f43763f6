"""The demo's probes on features whose content is known: they find what is there, and only that.

Frames and their metadata come from the real sample-data renderer; the tokens are synthetic:
at each visible object's cell a one-hot of its colour and shape (plus noise), elsewhere noise.
The oracle is the construction itself: colour and shape are then linearly readable (score ~1),
pure noise scores near chance, and the object cell is checked against the rendered image.
"""

from __future__ import annotations

import numpy as np
import pytest

from featurecache.pipelines.demo.probes import (
    CHANCE,
    OCCLUDED,
    ProbeFeatures,
    object_cells,
    probe_scores,
)
from featurecache.pipelines.demo.render import COLORS_RGB
from featurecache.pipelines.demo.sample_data import (
    TRAIN_COLORS,
    TRAIN_SHAPES,
    make_episode,
    render_episode,
)

SIDE, DIM = 7, 16


@pytest.fixture(scope="module")
def frames() -> list:
    return [
        f for i in range(40) for f in render_episode(make_episode("train", i), image_size=112,
                                                     frames=4)
    ]  # fmt: skip


def _features(frames: list, *, encode: bool, seed: int = 0) -> ProbeFeatures:
    rng = np.random.default_rng(seed)
    tokens = rng.normal(0, 0.3, (len(frames), SIDE * SIDE, DIM)).astype(np.float32)
    meta = [f.meta for f in frames]
    if encode:
        cells = object_cells(ProbeFeatures(np.arange(SIDE * SIDE)[None, :, None].repeat(
            len(frames), 0).astype(np.float32), meta, [f.key for f in frames]))  # fmt: skip
        for frame, cell, colour, shape in zip(
            cells.frame, cells.tokens[:, 0].astype(int), cells.colour, cells.shape, strict=True
        ):
            tokens[frame, cell, TRAIN_COLORS.index(colour)] += 1.0
            tokens[frame, cell, 4 + TRAIN_SHAPES.index(shape)] += 1.0
        for i, m in enumerate(meta):  # positions, linearly, in every token
            tokens[i, :, 8:10] += np.asarray(m["positions"]["gripper"][:2], np.float32)
            tokens[i, :, 10:12] += np.asarray(m["positions"]["plate"], np.float32)
    return ProbeFeatures(tokens, meta, [f.key for f in frames])


def test_probes_read_what_the_tokens_hold(frames) -> None:
    scores = probe_scores(_features(frames, encode=True))
    assert scores["object colour"] > 0.95 and scores["object shape"] > 0.95, scores
    assert scores["gripper xy"] > 0.75 and scores["plate xy"] > 0.75, scores


def test_probes_of_noise_stay_near_chance(frames) -> None:
    scores = probe_scores(_features(frames, encode=False))
    for probe, value in scores.items():
        assert value < CHANCE[probe] + 0.12, (probe, scores)


def test_object_cell_shows_the_object(frames) -> None:
    """The cell object_cells picks holds the object's colour in the rendered frame (the image's
    7x7 block of that cell has pixels of that colour), and occluded objects are left out."""
    tokens = np.arange(SIDE * SIDE, dtype=np.float32)[None, :, None].repeat(len(frames), 0)
    cells = object_cells(ProbeFeatures(tokens, [f.meta for f in frames], [f.key for f in frames]))
    assert len(cells.frame) > len(frames)  # most frames show two or three objects
    block = 112 // SIDE
    for frame, cell, colour in zip(cells.frame, cells.tokens[:, 0].astype(int), cells.colour,
                                   strict=True):  # fmt: skip
        image = np.asarray(frames[frame].image, np.int32)
        row, col = divmod(cell, SIDE)
        patch = image[row * block : (row + 1) * block, col * block : (col + 1) * block]
        close = np.abs(patch - np.asarray(COLORS_RGB[colour])).sum(-1) < 40
        assert close.sum() >= 8, (frames[frame].key, colour, cell)
    for frame in set(cells.frame.tolist()):
        gripper = np.asarray(frames[frame].meta["positions"]["gripper"][:2])
        target = np.asarray(frames[frame].meta["positions"]["target"])
        if np.linalg.norm(target - gripper) < OCCLUDED:
            named = frames[frame].meta["color"]
            shown = [c for f, c in zip(cells.frame, cells.colour, strict=True) if f == frame]
            assert len(shown) <= 2 or named not in shown


def test_object_cells_needs_a_square_grid(frames) -> None:
    with pytest.raises(ValueError, match="square token grid"):
        object_cells(ProbeFeatures(np.zeros((1, 12, 4), np.float32), [frames[0].meta], ["k"]))
