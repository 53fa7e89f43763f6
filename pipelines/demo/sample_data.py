"""Sample data: procedural, deterministic robot pick-and-place episodes as WebDataset shards.

The scene, seen from above: a background band (the wall) over a textured table, a plate (the
receptacle), three objects (a shape in a colour, e.g. "red cube") and a two-finger gripper whose
height shows as its size (bigger is higher) over its shadow on the table. The instruction names
one object: "put the red cube on the plate". A scripted planner moves the gripper to that object,
turns to its yaw, descends, closes, lifts it to the plate, lowers it, opens and retreats.

The action of a frame is the planner's command in the state the frame shows, so it is a function
of the image (gripper, object and plate positions, gripper state) and the instruction (which
object). 7-D like the paper's: (dx, dy, dz, droll, dpitch, dyaw, gripper), each in [-1, 1]:
dx, dy in units of MAX_XY of the table width, dz in units of MAX_Z, dyaw in units of MAX_YAW
(droll and dpitch are always 0: the gripper only yaws), gripper +1 = open, -1 = close.
LIVE_ACTION_DIMS are the five that move; losses and metrics of the demo use only those.
The cues the action depends on are drawn to be seen at 112 px: objects 17 px across, a gripper
whose size changes 3x with height, and fingers drawn cyan while closed.

Splits mirror the paper's OOD axes (PAPER.md):
- `train`: plain tables TRAIN_TEXTURES, backgrounds TRAIN_BACKGROUNDS, colours TRAIN_COLORS,
  shapes TRAIN_SHAPES, the named object on the left part of the table (x in TRAIN_TARGET_X).
- `ood-vision`: unseen textured tables and backgrounds, everything else as train.
- `ood-semantic`: the named object has an unseen colour and/or shape (OOD_COLORS, OOD_SHAPES);
  distractors stay in the train vocabulary.
- `ood-execution`: the named object lies in an unseen position range (x in OOD_TARGET_X).

Everything is seeded by (seed, split, episode), so an episode renders identically whatever the
frame count or shard size. Keys are `<split>-e<episode:05d>-s<step:03d>` (unique across splits,
no dots). Rendering is PIL + numpy, several hundred frames/s at 112-224 px.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from featurecache.errors import OptionError
from featurecache.pipelines.demo.config import SPLITS
from featurecache.pipelines.demo.render import Canvas
from featurecache.store import local_path

__all__ = [
    "ACTION_DIM",
    "FRAMES_PER_EPISODE",
    "LIVE_ACTION_DIMS",
    "SPLITS",
    "Episode",
    "Frame",
    "make_episode",
    "render_episode",
    "scripted_action",
    "write_sample_data",
]

_SPLIT_IDS = {name: i for i, name in enumerate(SPLITS)}
ACTION_DIM = 7
LIVE_ACTION_DIMS: tuple[int, ...] = (0, 1, 2, 5, 6)  # dx, dy, dz, dyaw, gripper
FRAMES_PER_EPISODE = 12  # a full pick-and-place takes 8-11 planner steps; the rest is retreat

TRAIN_COLORS = ("red", "green", "blue", "yellow")
OOD_COLORS = ("purple", "orange")
TRAIN_SHAPES = ("cube", "sphere", "triangle")
OOD_SHAPES = ("star", "cross")
# Train tables are plain (one colour, faint noise); the textured ones are unseen nuisances of
# ood-vision, as the paper's new table textures and backgrounds are.
TRAIN_TEXTURES = ("plain-sand", "plain-grey", "plain-sage")
OOD_TEXTURES = ("wood", "checker", "linen", "marble", "dots", "zigzag")
TRAIN_BACKGROUNDS = ("grey-wall", "beige-wall", "blue-wall")
OOD_BACKGROUNDS = ("brick", "curtain")
TRAIN_TARGET_X = (0.08, 0.62)  # table units: 0 = left edge, 1 = right edge
OOD_TARGET_X = (0.72, 0.92)


# Planner limits per step (the action's units) and heights (table units, z = 1 is the top).
MAX_XY = 0.25
MAX_Z = 0.5
MAX_YAW = math.pi / 8
HOVER_Z = 0.5
GRASP_Z = 0.05
PLACE_Z = 0.2
START_Z = 1.0
_TOL = 1e-6

_MIN_SEPARATION = 0.22  # between object/plate centres, table units

_SHARD_RE = re.compile(r"^frames-(\d{6})\.tar$")


@dataclass(frozen=True, slots=True)
class SceneObject:
    color: str
    shape: str
    xy: tuple[float, float]
    yaw: float

    @property
    def name(self) -> str:
        return f"{self.color} {self.shape}"


@dataclass(frozen=True, slots=True)
class Episode:
    """The fixed scene of one episode: objects[0] is the named target."""

    split: str
    index: int
    texture: str
    background: str
    objects: tuple[SceneObject, ...]
    plate: tuple[float, float]
    start: tuple[float, float]
    instruction: str
    seed: int


@dataclass(slots=True)
class _State:
    xy: np.ndarray  # (2,) float64, table units
    z: float
    yaw: float
    held: bool = False
    released: bool = False
    target_xy: np.ndarray | None = None  # where the target object is now


@dataclass(frozen=True, slots=True)
class Frame:
    """One rendered frame: image (RGB), meta (the json), action float32 (7,)."""

    key: str
    image: Image.Image
    meta: dict
    action: np.ndarray


_TEMPLATES = (
    "put the {obj} on the plate",
    "place the {obj} on the plate",
    "move the {obj} onto the plate",
)


def make_episode(split: str, index: int, *, seed: int = 0) -> Episode:
    """The scene of episode `index` of `split` (deterministic in seed, split, index)."""
    if split not in _SPLIT_IDS:
        raise OptionError(f"Expected split in {SPLITS}, got {split!r}.")
    rng = np.random.default_rng([seed, _SPLIT_IDS[split], index])
    textures = OOD_TEXTURES if split == "ood-vision" else TRAIN_TEXTURES
    backgrounds = OOD_BACKGROUNDS if split == "ood-vision" else TRAIN_BACKGROUNDS
    texture = str(rng.choice(textures))
    background = str(rng.choice(backgrounds))

    if split == "ood-semantic":
        mode = int(rng.integers(3))  # 0: new colour, 1: new shape, 2: both
        color = str(rng.choice(OOD_COLORS if mode != 1 else TRAIN_COLORS))
        shape = str(rng.choice(OOD_SHAPES if mode != 0 else TRAIN_SHAPES))
    else:
        color, shape = str(rng.choice(TRAIN_COLORS)), str(rng.choice(TRAIN_SHAPES))
    # Distractors differ from the target in colour or shape (often just one of them), so the
    # instruction, not the scene, decides which object to pick.
    distractors: list[tuple[str, str]] = []
    while len(distractors) < 2:
        kind = int(rng.integers(3))
        c = color if kind == 0 and color in TRAIN_COLORS else str(rng.choice(TRAIN_COLORS))
        s = shape if kind == 1 and shape in TRAIN_SHAPES else str(rng.choice(TRAIN_SHAPES))
        if (c, s) != (color, shape) and (c, s) not in distractors:
            distractors.append((c, s))

    target_x = OOD_TARGET_X if split == "ood-execution" else TRAIN_TARGET_X
    ranges = [(target_x, (0.08, 0.92))] + [((0.08, 0.92), (0.08, 0.92))] * 3
    points = _place(rng, ranges)
    objects = []
    for (c, s), xy in zip([(color, shape), *distractors], points[:3], strict=True):
        yaw = 0.0 if s == "sphere" else float(rng.uniform(-math.pi / 4, math.pi / 4))
        objects.append(SceneObject(c, s, xy, yaw))
    start = (float(rng.uniform(0.2, 0.8)), float(rng.uniform(0.2, 0.8)))
    instruction = str(rng.choice(_TEMPLATES)).format(obj=objects[0].name)
    return Episode(
        split, index, texture, background, tuple(objects), points[3], start, instruction, seed
    )


def _place(
    rng: np.random.Generator, ranges: list[tuple[tuple[float, float], tuple[float, float]]]
) -> list[tuple[float, float]]:
    """Points in the given (x range, y range), pairwise at least _MIN_SEPARATION apart."""
    for _ in range(1000):
        points: list[tuple[float, float]] = []
        for xr, yr in ranges:
            for _ in range(200):
                p = (float(rng.uniform(*xr)), float(rng.uniform(*yr)))
                if all(math.dist(p, q) >= _MIN_SEPARATION for q in points):
                    points.append(p)
                    break
            else:
                break
        if len(points) == len(ranges):
            return points
    raise RuntimeError("could not place the scene objects")  # pragma: no cover


def scripted_action(
    state: _State, target: SceneObject, plate: tuple[float, float]
) -> tuple[np.ndarray, str]:
    """The planner's command in `state`: (action float32 (7,) in [-1, 1], phase name).

    Phases: reach (to above the target, turning to its yaw), descend, grasp (close), carry (to
    above the plate), lower, release (open), retreat (up). Each is decided by the state alone.
    """
    move = np.zeros(2)
    dz = dyaw = 0.0
    grip = 1.0
    if state.released:
        phase, dz = "retreat", START_Z - state.z
    elif not state.held:
        d = np.asarray(target.xy) - state.xy
        dyaw = _wrap(target.yaw - state.yaw)
        dist = float(np.linalg.norm(d))
        if dist > _TOL:
            phase, move, dz = "reach", d, HOVER_Z - state.z
        elif abs(dyaw) > _TOL:
            phase = "reach"  # turn in place until aligned
        elif state.z > GRASP_Z + _TOL:
            phase, dz = "descend", GRASP_Z - state.z
        else:
            phase, grip = "grasp", -1.0
    else:
        grip = -1.0
        d = np.asarray(plate) - state.xy
        if float(np.linalg.norm(d)) > _TOL:
            phase, move, dz = "carry", d, HOVER_Z - state.z
        elif state.z > PLACE_Z + _TOL:
            phase, dz = "lower", PLACE_Z - state.z
        else:
            phase, grip = "release", 1.0
    norm = float(np.linalg.norm(move))
    if norm > MAX_XY:
        move = move * (MAX_XY / norm)
    action = np.array(
        [
            move[0] / MAX_XY,
            move[1] / MAX_XY,
            np.clip(dz, -MAX_Z, MAX_Z) / MAX_Z,
            0.0,
            0.0,
            np.clip(dyaw, -MAX_YAW, MAX_YAW) / MAX_YAW,
            grip,
        ],
        dtype=np.float32,
    )
    return action, phase


def _wrap(angle: float) -> float:
    return (angle + math.pi) % (2 * math.pi) - math.pi


def _apply(state: _State, action: np.ndarray, plate: tuple[float, float]) -> None:
    a = action.astype(np.float64)
    state.xy = state.xy + a[:2] * MAX_XY
    state.z = float(np.clip(state.z + a[2] * MAX_Z, 0.0, 1.0))
    state.yaw = state.yaw + a[5] * MAX_YAW
    if not state.held and not state.released and a[6] < 0:
        state.held = True
    elif state.held and a[6] > 0:
        state.held, state.released = False, True
        state.target_xy = np.asarray(plate, dtype=np.float64)
    if state.held:
        state.target_xy = state.xy.copy()


def _episode_seed(episode: Episode) -> list[int]:
    return [episode.seed, _SPLIT_IDS[episode.split], episode.index]


def render_episode(
    episode: Episode, *, image_size: int = 224, frames: int = FRAMES_PER_EPISODE
) -> Iterator[Frame]:
    """The first `frames` frames of an episode: the planner run from the start pose."""
    canvas = Canvas(image_size)
    base = canvas.base(episode, np.random.default_rng([*_episode_seed(episode), 1]))
    target = episode.objects[0]
    state = _State(np.asarray(episode.start, np.float64), START_Z, 0.0)
    state.target_xy = np.asarray(target.xy, np.float64)
    info = {
        "instruction": episode.instruction,
        "episode": episode.index,
        "object": target.name,
        "color": target.color,
        "shape": target.shape,
        "texture": episode.texture,
        "background": episode.background,
        "split": episode.split,
    }
    for step in range(frames):
        action, phase = scripted_action(state, target, episode.plate)
        image = base.copy()
        draw = ImageDraw.Draw(image)
        lifted = state.held
        assert state.target_xy is not None
        if not lifted:
            canvas.object(draw, target, state.target_xy, 1.0)
        canvas.gripper(draw, state.xy, state.z, state.yaw, closed=state.held)
        if lifted:  # held between the fingers, drawn above the table (bigger)
            canvas.object(draw, target, state.target_xy, 0.8 + 0.4 * state.z)
        key = f"{episode.split}-e{episode.index:05d}-s{step:03d}"
        meta = {
            **info,
            "step": step,
            "phase": phase,
            "positions": {
                "gripper": [round(float(v), 5) for v in (*state.xy, state.z, state.yaw)],
                "gripper_closed": bool(state.held),
                "target": [round(float(v), 5) for v in state.target_xy],
                "plate": [round(v, 5) for v in episode.plate],
                "objects": {
                    o.name: [round(o.xy[0], 5), round(o.xy[1], 5)] for o in episode.objects
                },
            },
        }
        yield Frame(key, image, meta, action)
        _apply(state, action, episode.plate)


def iter_frames(
    n: int,
    *,
    split: str = "train",
    seed: int = 0,
    image_size: int = 224,
    frames_per_episode: int = FRAMES_PER_EPISODE,
) -> Iterator[Frame]:
    """The first `n` frames of a split: episodes 0, 1, ... each giving `frames_per_episode`
    frames (a seeded subset of its steps when fewer than FRAMES_PER_EPISODE, see _kept_steps)."""
    episode = 0
    while n > 0:
        take = min(n, frames_per_episode)
        keep = _kept_steps(split, episode, seed, take)
        frames = render_episode(
            make_episode(split, episode, seed=seed), image_size=image_size, frames=max(keep) + 1
        )
        yield from (f for f in frames if f.meta["step"] in keep)
        n -= take
        episode += 1


def _kept_steps(split: str, episode: int, seed: int, take: int) -> set[int]:
    """The planner steps an episode contributes: all of the first `take` when that covers a whole
    episode, else `take` of its FRAMES_PER_EPISODE steps drawn at random (seeded), so that many
    short episodes still show every phase (reach ... release, retreat)."""
    if take >= FRAMES_PER_EPISODE:
        return set(range(take))
    rng = np.random.default_rng([seed, _SPLIT_IDS[split], episode, 2])
    return {int(i) for i in rng.choice(FRAMES_PER_EPISODE, size=take, replace=False)}


def encode_sample(frame: Frame, image_format: str = "png") -> list[tuple[str, bytes]]:
    """The tar members of a frame sample: (name, bytes) for the image, json and action.npy."""
    buf = io.BytesIO()
    if image_format == "png":
        frame.image.save(buf, format="PNG", compress_level=1)
    elif image_format == "jpg":
        frame.image.save(buf, format="JPEG", quality=95)
    else:
        raise OptionError(f"Expected image_format 'png' or 'jpg', got {image_format!r}.")
    npy = io.BytesIO()
    np.save(npy, frame.action.astype(np.float32), allow_pickle=False)
    return [
        (f"{frame.key}.{image_format}", buf.getvalue()),
        (f"{frame.key}.json", json.dumps(frame.meta, sort_keys=True).encode()),
        (f"{frame.key}.action.npy", npy.getvalue()),
    ]


def write_tar(path: str | Path, members: list[tuple[str, bytes]]) -> None:
    """Write a deterministic tar (mtime 0, uid/gid 0) atomically (temp file + os.replace)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            tar.addfile(info, io.BytesIO(data))
    os.replace(tmp, path)


def write_sample_data(
    out: str | Path,
    *,
    frames: int,
    shard_size: int,
    image_size: int = 224,
    seed: int = 0,
    split: str = "train",
    frames_per_episode: int = FRAMES_PER_EPISODE,
    image_format: str = "png",
) -> list[Path]:
    """Render `frames` frames of `split` into `out/frames-000000.tar`, ... (`shard_size` each).

    Returns the shard paths. Stale `frames-NNNNNN.tar` shards in `out` beyond the new count (from
    an earlier, larger run) are removed so that a folder pattern reads exactly this data set.
    """
    for name, value, low in (
        ("frames", frames, 1),
        ("shard_size", shard_size, 1),
        ("image_size", image_size, 16),
        ("frames_per_episode", frames_per_episode, 1),
    ):
        if not isinstance(value, int) or value < low:
            raise OptionError(f"Expected {name} to be an integer >= {low}, got {value!r}.")
    if split not in _SPLIT_IDS:
        raise OptionError(f"Expected split in {SPLITS}, got {split!r}.")
    out = local_path(out, "the frames folder OUT")
    if out.exists() and not out.is_dir():
        raise OptionError(f"Expected {out} to be a folder for the shards, got a file.")
    out.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    members: list[tuple[str, bytes]] = []
    stream = iter_frames(
        frames, split=split, seed=seed, image_size=image_size, frames_per_episode=frames_per_episode
    )
    for count, frame in enumerate(stream, start=1):
        members += encode_sample(frame, image_format)
        if count % shard_size == 0 or count == frames:
            path = out / f"frames-{len(paths):06d}.tar"
            write_tar(path, members)
            paths.append(path)
            members = []
    for stale in out.iterdir():
        match = _SHARD_RE.match(stale.name)
        if match and int(match.group(1)) >= len(paths):
            stale.unlink()
    return paths
